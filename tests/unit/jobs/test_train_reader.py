"""jobs/train_reader.py: the shipped variants and the driver's example writing (no training, no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from jobs.train_reader import PRETRAIN_CONFIG, parse_args, selected, write_examples
from medrag_ray.config import ConfigError, PretrainVisionConfig, SyntheticDataConfig, TrainReaderConfig
from medrag_ray.data.schema import Sample, read_parquet
from medrag_ray.data.synthetic import generate, write_dataset
from medrag_ray.reader.sft import read_sft_examples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic dataset as make_data writes it (samples, corpus and manifest)."""
    cfg = SyntheticDataConfig(domains=("radiology", "pathology"), n_per_domain=20, n_phenotypes=2, image_size=32)
    return write_dataset(generate(cfg), tmp_path_factory.mktemp("d") / "syn")


def test_shipped_variants() -> None:
    assert parse_args([]) == TrainReaderConfig()
    pre = parse_args(["--config", str(PRETRAIN_CONFIG)])
    assert pre.finetune == "full" and pre.context_source == "phenotype" and pre.meta_filter == {}
    assert pre.freeze_vision_tower and not TrainReaderConfig().freeze_vision_tower
    assert pre.reader_dir == PretrainVisionConfig().out_dir and pre.out_dir == TrainReaderConfig().reader_dir
    assert pre.draws > 1 and TrainReaderConfig().draws == 1
    with pytest.raises(ConfigError, match="context_source must be one of"):
        parse_args(["context_source=oracle"])
    with pytest.raises(ConfigError, match="draws must be an integer >= 1"):
        parse_args(["draws=0"])
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
    cfg = parse_args([f"dataset_dir={dataset}", f"data_dir={tmp_path / 'sft'}", "rag_fraction=0",
                      "context.router_dir=/nonexistent/router", "context.index_dir=/nonexistent/index", "max_val=10"])
    out = write_examples(cfg)
    train = read_sft_examples(out / "train.parquet")
    val = read_sft_examples(out / "val.parquet")
    expected_train = selected(read_parquet(dataset / "samples_train.parquet", Sample), cfg)
    assert [e.id for e in train] == [s.id for s in expected_train]
    assert not any(e.use_rag or e.context_texts or e.follow_ups for e in train + val)
    assert len(val) == 10 and set(Counter(e.domain for e in val)) == {"radiology", "pathology"}

    empty = parse_args([f"dataset_dir={dataset}", f"data_dir={tmp_path / 'none'}", "rag_fraction=0",
                        "meta_filter={finding_kind: invisible}"])
    with pytest.raises(ValueError, match="meta_filter"):
        write_examples(empty)


def test_write_examples_pretraining_conversations(dataset: Path, tmp_path: Path) -> None:
    """context_source=phenotype: no router or index is read; ``draws`` conversations per train case, one per val
    case; every finding of a case is a turn; a dataset without a manifest gets the fix named."""
    cfg = parse_args(["--config", str(PRETRAIN_CONFIG), f"dataset_dir={dataset}", f"data_dir={tmp_path / 'read'}",
                      "context.router_dir=/nonexistent/router", "context.index_dir=/nonexistent/index", "draws=3"])
    out = write_examples(cfg)
    train, val = read_sft_examples(out / "train.parquet"), read_sft_examples(out / "val.parquet")
    samples = read_parquet(dataset / "samples_train.parquet", Sample)
    cases = {json.loads(s.meta)["case_id"] for s in samples}
    assert len(train) == 3 * len(cases) and all(e.id.endswith(("-d0", "-d1", "-d2")) for e in train)
    assert {e.id[:-3] for e in val}.isdisjoint(cases) and all(e.id.endswith("-d0") for e in val)
    assert all(len(e.context_texts) == 3 for e in train if e.use_rag)
    assert 0.5 < sum(e.use_rag for e in train) / len(train) < 0.95  # rag_fraction 0.75
    assert all(1 + len(e.follow_ups) >= 3 for e in train)  # the visible findings at least
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("samples_train.parquet", "samples_val.parquet", "corpus.parquet"):
        (bare / name).write_bytes((dataset / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="context_source=phenotype needs"):
        write_examples(parse_args(["--config", str(PRETRAIN_CONFIG), f"dataset_dir={bare}",
                                   f"data_dir={tmp_path / 'bare_sft'}"]))
