"""jobs/evaluate.py: parsing and the checks that run before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import evaluate
from medrag_ray.config import ConfigError


def test_defaults_name_the_pipeline_artifacts() -> None:
    cfg = evaluate.parse_args([])
    assert cfg.rag_pt_reader_dirs == ("artifacts/data/dpo/stage1/reader", "artifacts/models/reader_dpo")
    assert cfg.jomed_retriever_dir == "artifacts/models/retriever_jomed" and cfg.fixed_k == 3
    with pytest.raises(ConfigError, match="jomed_temperature"):
        evaluate.parse_args(["jomed_temperature=0"])
    with pytest.raises(ConfigError, match="fixed_k"):
        evaluate.parse_args(["fixed_k=0"])


def test_missing_input_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="reader_dir: .*jobs/pipeline.py"):
        evaluate.main(evaluate.parse_args([f"reader_dir={tmp_path / 'none'}", f"out_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()
