"""jobs/train_reader.py: the shipped variants and the driver's example writing (no training, no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from jobs.train_reader import PRETRAIN_CONFIG, READING_CONFIG, parse_args, selected, write_examples
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
    assert pre.finetune == "full" and pre.rag_fraction == 0.0 and pre.meta_filter == {"finding_kind": "visible"}
    assert pre.freeze_vision_tower and not TrainReaderConfig().freeze_vision_tower
    assert pre.reader_dir == PretrainVisionConfig().out_dir
    reading = parse_args(["--config", str(READING_CONFIG)])
    assert reading.context_source == "phenotype" and reading.finetune == "full" and reading.freeze_vision_tower
    assert reading.meta_filter == {} and reading.dataset_dir == pre.dataset_dir
    assert reading.reader_dir == pre.out_dir == TrainReaderConfig().reader_dir
    assert reading.out_dir == "artifacts/models/reader_reading"
    with pytest.raises(ConfigError, match="context_source must be one of"):
        parse_args(["context_source=oracle"])
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


def test_write_examples_reading_curriculum(dataset: Path, tmp_path: Path) -> None:
    """context_source=phenotype: no router or index is read; subtle questions always carry their phenotype's
    reports, a share of visible ones random reports; a dataset without a manifest gets the fix named."""
    cfg = parse_args(["--config", str(READING_CONFIG), f"dataset_dir={dataset}", f"data_dir={tmp_path / 'read'}",
                      "context.router_dir=/nonexistent/router", "context.index_dir=/nonexistent/index"])
    train = read_sft_examples(write_examples(cfg) / "train.parquet")
    samples = {s.id: s for s in read_parquet(dataset / "samples_train.parquet", Sample)}
    kinds = Counter((json.loads(samples[e.id].meta)["finding_kind"], e.use_rag) for e in train)
    assert kinds[("subtle", False)] == 0 and kinds[("subtle", True)] > 0
    with_reports = kinds[("visible", True)] / (kinds[("visible", True)] + kinds[("visible", False)])
    assert 0.6 < with_reports < 0.95  # rag_fraction 0.8 of the visible questions
    assert all(len(e.context_texts) == 3 for e in train if e.use_rag)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("samples_train.parquet", "samples_val.parquet", "corpus.parquet"):
        (bare / name).write_bytes((dataset / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="context_source=phenotype needs"):
        write_examples(parse_args(["--config", str(READING_CONFIG), f"dataset_dir={bare}",
                                   f"data_dir={tmp_path / 'bare_sft'}"]))
