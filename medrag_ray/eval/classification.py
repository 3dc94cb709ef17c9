"""Per-class precision / recall and a confusion matrix (the domain router's report, MMed-RAG §3.1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClassificationReport:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows = truth)."""

    labels: tuple[str, ...]
    confusion: np.ndarray
    """``confusion[i, j]`` = number of examples of class ``labels[i]`` predicted as ``labels[j]``."""

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion)) / self.n if self.n else 0.0

    def support(self, label: str) -> int:
        return int(self.confusion[self.labels.index(label)].sum())

    def precision(self, label: str) -> float:
        """TP / predicted-as-``label``; 0.0 when nothing was predicted as ``label``."""
        i = self.labels.index(label)
        predicted = self.confusion[:, i].sum()
        return float(self.confusion[i, i]) / float(predicted) if predicted else 0.0

    def recall(self, label: str) -> float:
        """TP / truly-``label``; 0.0 when the class has no example."""
        i = self.labels.index(label)
        actual = self.confusion[i].sum()
        return float(self.confusion[i, i]) / float(actual) if actual else 0.0

    def f1(self, label: str) -> float:
        p, r = self.precision(label), self.recall(label)
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def macro_f1(self) -> float:
        present = [lbl for lbl in self.labels if self.support(lbl)]
        return float(np.mean([self.f1(lbl) for lbl in present])) if present else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: accuracy, macro F1, per-class metrics and the confusion matrix with its labels."""
        return {
            "n": self.n,
            "accuracy": round(self.accuracy, 6),
            "macro_f1": round(self.macro_f1, 6),
            "per_class": {
                lbl: {
                    "precision": round(self.precision(lbl), 6),
                    "recall": round(self.recall(lbl), 6),
                    "f1": round(self.f1(lbl), 6),
                    "support": self.support(lbl),
                }
                for lbl in self.labels
            },
            "confusion": {"labels": list(self.labels), "rows_truth_cols_predicted": self.confusion.tolist()},
        }

    def format_table(self) -> str:
        """A plain-text table for logs: per-class P/R/F1/support, then the confusion matrix."""
        width = max(len(lbl) for lbl in self.labels) + 2
        lines = [f"{'class':<{width}}precision  recall     f1  support"]
        for lbl in self.labels:
            lines.append(
                f"{lbl:<{width}}{self.precision(lbl):9.3f}{self.recall(lbl):8.3f}{self.f1(lbl):7.3f}"
                f"{self.support(lbl):9d}"
            )
        lines.append(f"accuracy {self.accuracy:.3f} over {self.n}; macro F1 {self.macro_f1:.3f}")
        lines.append("confusion (rows truth, columns predicted): " + " ".join(self.labels))
        for lbl, row in zip(self.labels, self.confusion.tolist(), strict=True):
            lines.append(f"{lbl:<{width}}" + " ".join(f"{v:6d}" for v in row))
        return "\n".join(lines)


def classification_report(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> ClassificationReport:
    """Confusion-matrix metrics of ``y_pred`` against ``y_true`` over ``labels`` (in that order).

    A true or predicted label outside ``labels`` is an error (it would silently vanish from the matrix).
    """
    labels = tuple(labels)
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"labels must be distinct and non-empty, got {list(labels)}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} entries but y_pred has {len(y_pred)}; pass one per example")
    pos = {lbl: i for i, lbl in enumerate(labels)}
    unknown = sorted({str(v) for v in (*y_true, *y_pred)} - set(pos))
    if unknown:
        raise ValueError(f"labels {unknown} are not in labels={list(labels)}; add them to labels")
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        confusion[pos[t], pos[p]] += 1
    return ClassificationReport(labels=labels, confusion=confusion)
