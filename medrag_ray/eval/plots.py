"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed), for ``eval/report.md``.

* :func:`ablation_bars` -- accuracy of each ablation row overall and per finding kind, with 95% bootstrap bars;
* :func:`similarity_drop` -- MMed-RAG Fig. 2: mean ``S_i / S_1`` by rank, the fixed k and the kept counts marked;
* :func:`alignment_bars` -- MMed-RAG Fig. 3: copy-reference and over-reliance rates before / after RAG-PT;
* :func:`jomed_bars` -- JOMED Table 5 as bars: FT RAG, JOMED and the oracle on consistent / inconsistent questions.

Each writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def ablation_bars(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Grouped bars: per row, accuracy overall and per finding kind, with each one's 95% interval."""
    groups = ["overall", *sorted({k for r in rows for k in r["by_kind"]})]
    x = np.arange(len(rows))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows)), 4.0))
    for j, group in enumerate(groups):
        metrics = [r if group == "overall" else r["by_kind"].get(group) for r in rows]
        acc = np.asarray([m["accuracy"] if m else np.nan for m in metrics])
        low = np.asarray([m["accuracy_ci"][0] if m else np.nan for m in metrics])
        high = np.asarray([m["accuracy_ci"][1] if m else np.nan for m in metrics])
        ax.bar(x + (j - (len(groups) - 1) / 2) * width, acc, width, label=group,
               yerr=np.vstack([acc - low, high - acc]), capsize=3)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(x, [r["name"] for r in rows], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8)
    ax.set_title(title or "closed-question accuracy (95% bootstrap intervals)", fontsize=10)
    return _save(fig, path)


def similarity_drop(
    curve: Sequence[float], kept: Mapping[int, int], fixed_k: int, path: str | Path, rule: str = "gap"
) -> Path:
    """MMed-RAG Fig. 2: the mean similarity ratio ``S_i / S_1`` against rank i, with the fixed k (dashed) and the
    mean number adaptive-k keeps (solid) marked, and the distribution of the kept count beside it."""
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    ranks = np.arange(1, len(curve) + 1)
    ax.plot(ranks, curve, marker="o")
    ax.axvline(fixed_k, color="grey", ls="--", label=f"fixed k={fixed_k}")
    total = sum(kept.values())
    if total:
        mean_kept = sum(k * n for k, n in kept.items()) / total
        ax.axvline(mean_kept, color="C3", label=f"{rule}: mean kept {mean_kept:.2f}")
    ax.set_xlabel("rank i")
    ax.set_ylabel("mean S_i / S_1")
    ax.set_title("similarity drop over the retrieved list", fontsize=10)
    ax.legend(fontsize=8)
    positions = np.arange(len(kept))
    hist.bar(positions, [n / max(1, total) for n in kept.values()], color="C3")
    hist.set_xticks(positions, [str(k) for k in kept])
    hist.set_xlabel(f"documents kept ({rule})")
    hist.set_ylabel("share of queries")
    return _save(fig, path)


def alignment_bars(alignment: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """MMed-RAG Fig. 3: CR and OR rate per reader (before / after RAG-PT)."""
    names = list(alignment)
    x = np.arange(2)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for j, name in enumerate(names):
        a = alignment[name]
        ax.bar(x + (j - (len(names) - 1) / 2) * width, [a["cr_rate"], a["or_rate"]], width, label=name)
    ax.set_xticks(x, ["copy-reference (CR)", "over-reliance (OR)"])
    ax.set_ylabel("rate (lower is better)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("misalignment before / after RAG-PT", fontsize=10)
    return _save(fig, path)


def jomed_bars(analysis: Mapping[str, Any], path: str | Path) -> Path:
    """FT RAG vs JOMED vs the oracle on all, consistent and inconsistent questions."""
    subsets = ["all", "consistent", "inconsistent"]
    series = {
        "FT RAG": [analysis[s]["methods"]["ft_rag"]["accuracy"] for s in subsets],
        "JOMED": [analysis[s]["methods"]["jomed"]["accuracy"] for s in subsets],
        "oracle": [analysis[s]["oracle_accuracy"] for s in subsets],
    }
    x = np.arange(len(subsets))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for j, (name, values) in enumerate(series.items()):
        ax.bar(x + (j - 1) * width, values, width, label=name)
    ax.set_xticks(x, [f"{s} (n={analysis[s]['n']})" for s in subsets])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8)
    ax.set_title("JOMED: candidates scored one at a time and fused", fontsize=10)
    return _save(fig, path)
