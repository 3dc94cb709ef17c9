"""eval/report.md: every table's plot is written as a PNG and linked from the report."""

from __future__ import annotations

import numpy as np

from medrag_ray.eval.rag_pt_eval import ClosedPredictions, ablation_rows
from medrag_ray.eval.report import PLOTS_DIR, REPORT_NAME, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def payload() -> dict:
    labels, kinds = ("yes", "no", "yes", "no"), ("visible", "subtle", "subtle", "visible")
    a = ClosedPredictions(("d",) * 4, labels, np.array([0.9, 0.6, 0.2, 0.1]), kinds)
    b = ClosedPredictions(("d",) * 4, labels, np.array([0.9, 0.2, 0.8, 0.1]), kinds)
    rows = ablation_rows({"none": a, "rag": b})
    rates = {"cr_rate": 0.5, "or_rate": 0.6}
    return {
        "name": "unit", "rows": rows, "diagnostics": rows,
        "adaptive_k": {"kept": {"gap": {"1": 3, "3": 1}, "ratio": {"3": 4}}, "similarity_curve": [1.0, 0.8, 0.7],
                       "top_k": 3, "fixed_k": 3, "rule": "gap"},
        "alignment": {"rag_sft": rates, "rag_pt": {"cr_rate": 0.3, "or_rate": 0.4}},
    }


def jomed() -> dict:
    subset = {"n": 2, "oracle_accuracy": 1.0, "methods": {"ft_rag": {"accuracy": 0.5}, "jomed": {"accuracy": 1.0}}}
    return {"all": subset, "consistent": subset, "inconsistent": subset}


def test_report_links_a_png_per_figure(tmp_path) -> None:  # noqa: ANN001
    path = write_report(tmp_path, payload(), "TABLE-A", jomed(), "TABLE-J")
    assert path == tmp_path / REPORT_NAME
    text = path.read_text()
    figures = ["ablation", "diagnostics", "similarity_drop", "alignment", "jomed"]
    for name in figures:
        png = tmp_path / PLOTS_DIR / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
        assert f"]({PLOTS_DIR}/{name}.png)" in text
    assert "TABLE-A" in text and "TABLE-J" in text
    assert "gap keeps 1: 75%, 3: 25%; ratio keeps 3: 100%" in text


def test_report_without_the_optional_parts(tmp_path) -> None:  # noqa: ANN001
    p = payload()
    p.update(diagnostics=[], adaptive_k=None, alignment={})
    text = write_report(tmp_path, p, "TABLE-A").read_text()
    assert sorted(x.name for x in (tmp_path / PLOTS_DIR).iterdir()) == ["ablation.png"]
    assert "jomed" not in text and "Fig. 2" not in text
