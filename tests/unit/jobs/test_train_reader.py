"""jobs/train_reader.py: the shipped variants and the driver's example writing (no training, no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from jobs.train_reader import PRETRAIN_CONFIG, parse_args, selected, write_examples
from medrag_ray.config import ConfigError, PretrainVisionConfig, TrainReaderConfig
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.reader.sft import read_sft_examples
from tests.unit.jobs.eval_fixtures import tiny_synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_synthetic(tmp_path_factory.mktemp("d") / "syn", ("radiology", "pathology"), n_per_domain=20)


def test_shipped_variants() -> None:
    assert parse_args([]) == TrainReaderConfig()
    pre = parse_args(["--config", str(PRETRAIN_CONFIG)])
    assert pre.finetune == "full" and pre.rag_fraction == 0.0 and pre.meta_filter == {"finding_kind": "visible"}
    assert pre.freeze_vision_tower and not TrainReaderConfig().freeze_vision_tower
    assert pre.reader_dir == PretrainVisionConfig().out_dir and pre.out_dir == TrainReaderConfig().reader_dir
    with pytest.raises(ConfigError, match="finetune must be one of"):
        parse_args(["finetune=qlora"])


def test_selected_filters_tasks_and_meta(dataset: Path) -> None:
    samples = read_parquet(dataset / "samples_train.parquet", Sample)
    visible = selected(samples, TrainReaderConfig(meta_filter={"finding_kind": "visible"}))
    closed = selected(samples, TrainReaderConfig())
    expected = [s for s in samples if s.answer_type == "closed" and json.loads(s.meta)["finding_kind"] == "visible"]
    assert visible == expected and 0 < len(visible) < len(closed)
    assert all(s.answer_type == "closed" for s in closed) and len(closed) + sum(
        s.answer_type == "report" for s in samples
    ) == len(samples)


def test_write_examples_without_retrieval_spreads_val_over_domains(dataset: Path, tmp_path: Path) -> None:
    # rag_fraction=0 must not touch the router or the index: they do not exist here
    cfg = parse_args(["--config", str(PRETRAIN_CONFIG), f"dataset_dir={dataset}", f"data_dir={tmp_path / 'sft'}",
                      "context.router_dir=/nonexistent/router", "context.index_dir=/nonexistent/index", "max_val=10"])
    out = write_examples(cfg)
    train = read_sft_examples(out / "train.parquet")
    val = read_sft_examples(out / "val.parquet")
    expected_train = selected(read_parquet(dataset / "samples_train.parquet", Sample), cfg)
    assert [e.id for e in train] == [s.id for s in expected_train]
    assert not any(e.use_rag or e.context_texts for e in train + val)
    assert len(val) == 10 and set(Counter(e.domain for e in val)) == {"radiology", "pathology"}

    empty = parse_args([f"dataset_dir={dataset}", f"data_dir={tmp_path / 'none'}", "rag_fraction=0",
                        "meta_filter={finding_kind: invisible}"])
    with pytest.raises(ValueError, match="meta_filter"):
        write_examples(empty)
