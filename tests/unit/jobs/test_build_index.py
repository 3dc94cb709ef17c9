"""jobs/build_index.py without starting Ray: config file, and failures that must come before any work."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import ray

from jobs import build_index
from medrag_ray.config import BuildIndexConfig, to_dict
from medrag_ray.data.schema import CorpusDoc, write_parquet
from medrag_ray.data.synthetic import encode_png
from medrag_ray.retrieval.index import IndexConfig
from tests.unit.retrieval.embed_fixtures import save_tiny_encoder


def test_default_yaml_matches_the_config_defaults():
    cfg = build_index.parse_args([])
    defaults = BuildIndexConfig()
    assert cfg.index_config() == IndexConfig()
    assert {k: v for k, v in to_dict(cfg).items() if k != "index"} == {
        k: v for k, v in to_dict(defaults).items() if k != "index"
    }
    cfg = build_index.parse_args(["encoder_dir=enc", "index.kind=ivf", "index.nlist=8", "index.nprobe=4"])
    assert cfg.index_config() == IndexConfig(kind="ivf", nlist=8, nprobe=4)
    assert cfg.encoder_dir == "enc" and cfg.retrievers_dir == defaults.retrievers_dir


@pytest.fixture()
def corpus_path(tmp_path):
    png = encode_png(np.zeros((8, 8), dtype=np.uint8))
    docs = [
        CorpusDoc(id=f"{d}-{i}", domain=d, split="train", source="t", text="report", image_bytes=png)
        for d in ("radiology", "pathology")
        for i in range(3)
    ]
    path = tmp_path / "corpus.parquet"
    write_parquet(docs, CorpusDoc, path)
    return path


def test_missing_retriever_dir_fails_before_ray_starts(tmp_path, corpus_path):
    (tmp_path / "retrievers" / "radiology").mkdir(parents=True)
    cfg = BuildIndexConfig(
        corpus_path=str(corpus_path), out_dir=str(tmp_path / "idx"), retrievers_dir=str(tmp_path / "retrievers")
    )
    assert not ray.is_initialized()
    with pytest.raises(FileNotFoundError) as err:
        build_index.main(cfg)
    msg = str(err.value)
    assert str(tmp_path / "retrievers" / "pathology") in msg
    assert "python jobs/train_retriever.py" in msg and "encoder_dir=" in msg
    assert not ray.is_initialized()
    assert not (tmp_path / "idx").exists()


def test_existing_store_without_overwrite_fails_before_ray_starts(tmp_path, corpus_path):
    enc = save_tiny_encoder(tmp_path / "enc")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "keep.txt").write_text("previous")
    cfg = BuildIndexConfig(corpus_path=str(corpus_path), out_dir=str(tmp_path / "idx"), encoder_dir=str(enc))
    with pytest.raises(FileExistsError, match="overwrite"):
        build_index.main(cfg)
    with pytest.raises(FileNotFoundError, match="not an index store"):
        build_index.main(dataclasses.replace(cfg, mode="add"))
    assert not ray.is_initialized()
    assert (tmp_path / "idx" / "keep.txt").read_text() == "previous"
