"""``eval/report.md``: the evaluation as a person reads it -- the tables, and PNG plots beside them.

Built from the payloads ``jobs/evaluate.py`` writes (``rag_pt.json``, ``jomed.json``), so it can be re-made
from those files alone (:func:`write_report`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medrag_ray.eval import plots

REPORT_NAME = "report.md"
PLOTS_DIR = "plots"


def _kept_line(kept: Mapping[str, Mapping[Any, int]]) -> str:
    parts = []
    for rule, dist in kept.items():
        total = sum(dist.values()) or 1
        shares = ", ".join(f"{k}: {n / total:.0%}" for k, n in dist.items())
        parts.append(f"{rule} keeps {shares}")
    return "; ".join(parts)


def write_report(
    out_dir: str | Path,
    rag_pt: Mapping[str, Any],
    rag_pt_markdown: str,
    jomed: Mapping[str, Any] | None = None,
    jomed_markdown: str = "",
) -> Path:
    """Write ``report.md`` and its plots under ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    png = out / PLOTS_DIR
    sections = [f"# Evaluation report{' (' + rag_pt['name'] + ')' if rag_pt.get('name') else ''}", ""]
    plots.ablation_bars(rag_pt["rows"], png / "ablation.png")
    sections += ["## Ablation", "", f"![ablation]({PLOTS_DIR}/ablation.png)", "", rag_pt_markdown]
    if rag_pt.get("diagnostics"):
        plots.ablation_bars(rag_pt["diagnostics"], png / "diagnostics.png", "diagnostic rows")
        sections += ["## Diagnostics", "", f"![diagnostics]({PLOTS_DIR}/diagnostics.png)", ""]
    adaptive = rag_pt.get("adaptive_k")
    if adaptive and adaptive.get("similarity_curve"):
        kept = {int(k): n for k, n in adaptive["kept"][adaptive["rule"]].items()}
        plots.similarity_drop(adaptive["similarity_curve"], kept, adaptive["fixed_k"], png / "similarity_drop.png",
                              adaptive["rule"])
        sections += ["## Adaptive-k (MMed-RAG Fig. 2)", "", f"![similarity drop]({PLOTS_DIR}/similarity_drop.png)", "",
                     f"Of the top {adaptive['top_k']}: {_kept_line(adaptive['kept'])}.", ""]
    if rag_pt.get("alignment"):
        plots.alignment_bars(rag_pt["alignment"], png / "alignment.png")
        sections += ["## Copy-reference and over-reliance (MMed-RAG Fig. 3)", "",
                     f"![alignment]({PLOTS_DIR}/alignment.png)", ""]
    if jomed is not None:
        plots.jomed_bars(jomed, png / "jomed.png")
        sections += ["## JOMED: consistent and inconsistent questions", "", f"![jomed]({PLOTS_DIR}/jomed.png)", "",
                     jomed_markdown]
    path = out / REPORT_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(sections), encoding="utf-8")
    tmp.replace(path)
    return path
