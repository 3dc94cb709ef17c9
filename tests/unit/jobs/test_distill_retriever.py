"""jobs/distill_retriever.py: parsing, which questions are scored, and the checks before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import distill_retriever
from medrag_ray.config import ConfigError
from medrag_ray.data.schema import Sample, write_parquet


def sample(i: int, domain: str, answer: str = "yes", answer_type: str = "closed") -> Sample:
    return Sample(id=f"{domain}-{i:03d}", domain=domain, split="train", source="t", question="Is there X?",
                  answer=answer, answer_type=answer_type, image_bytes=b"png", image_available=True)


def test_defaults_and_errors() -> None:
    cfg = distill_retriever.parse_args([])
    assert cfg.k == 4 and cfg.out_dir == "artifacts/models/retriever_jomed"
    with pytest.raises(ConfigError, match="k must be >= 2"):
        distill_retriever.parse_args(["k=1"])
    with pytest.raises(ConfigError, match="temperature"):
        distill_retriever.parse_args(["temperature=0"])


def test_limit_spreads_over_the_file_and_skips_unscorable_rows(tmp_path: Path) -> None:
    rows = [sample(i, d) for d in ("ophthalmology", "pathology", "radiology") for i in range(10)]
    rows += [sample(99, "radiology", answer="maybe"), sample(98, "radiology", answer="", answer_type="report")]
    write_parquet(rows, Sample, tmp_path / "s.parquet")
    every = distill_retriever.selected_ids(tmp_path / "s.parquet", 0)
    assert len(every) == 30 and "radiology-099" not in every and "radiology-098" not in every
    picked = distill_retriever.selected_ids(tmp_path / "s.parquet", 6)
    assert len(picked) == 6 and {i.split("-")[0] for i in picked} == {"ophthalmology", "pathology", "radiology"}


def test_missing_inputs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset_dir: .*jobs/pipeline.py"):
        distill_retriever.main(distill_retriever.parse_args([f"dataset_dir={tmp_path}", f"out_dir={tmp_path / 'o'}"]))
