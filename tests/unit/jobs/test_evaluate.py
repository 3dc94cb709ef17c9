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


def run_evaluate(root: Path, out: Path, *args: str) -> dict:
    data = root / "data" / "synthetic"
    return evaluate.main(evaluate.parse_args([
        f"samples_path={data / 'samples_test.parquet'}", f"reader_dir={root / 'models' / 'reader'}",
        "rag_pt_reader_dirs=[]", f"context.router_dir={root / 'models' / 'router'}",
        f"context.index_dir={root / 'index'}", "jomed_retriever_dir=", f"out_dir={out}", "limit=12", *args,
    ]))


def test_real_data_style_run_without_routing_or_ground_truth(tiny_artifacts: Path, tmp_path: Path) -> None:
    # as the README prints it for VQA-RAD: route=false (the labelled domain), and the default ground_truth_dir holds
    # a synthetic manifest of other cases: its diagnostics do not apply and are skipped
    other = tmp_path / "other_synthetic"
    other.mkdir()
    (other / "manifest.json").write_text('{"cases": []}')
    out = run_evaluate(tiny_artifacts, tmp_path / "eval", "route=false", f"ground_truth_dir={other}")
    rag_pt = out["rag_pt"]
    assert [r["name"] for r in rag_pt["rows"]] == ["reader, no retrieval", "+ retrieval (fixed k=3)",
                                                   "+ adaptive-k (gap)"]
    assert rag_pt["retrieval"] == {} and len(rag_pt["diagnostics"]) == 2 and rag_pt["routed_unknown"] == 0
    assert rag_pt["alignment"]["rag_sft"]["n"] == rag_pt["rows"][0]["n"] > 0
    assert (tmp_path / "eval" / "report.md").is_file() and (tmp_path / "eval" / "plots" / "ablation.png").is_file()


def test_synthetic_run_adds_the_diagnostics(tiny_artifacts: Path, tmp_path: Path) -> None:
    data = tiny_artifacts / "data" / "synthetic"
    out = run_evaluate(tiny_artifacts, tmp_path / "eval", f"ground_truth_dir={data}", "alignment=false")["rag_pt"]
    names = [r["name"] for r in out["diagnostics"]]
    assert names[-1] == "reader, oracle context (3 reports of the query's phenotype)"
    assert out["diagnostics"][-1]["vs_above"]["row"] == "reader, no retrieval"
    assert set(out["retrieval"]) == {"text head, fixed k=3", "text head, gap", "image head, fixed k=3"}
    assert set(out["rows"][1]["by_kind"]) == {"visible", "subtle"}
    text = (tmp_path / "eval" / "rag_pt.md").read_text()
    assert "## Diagnostics" in text and "phenotype precision" in text
