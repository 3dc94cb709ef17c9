"""Consistent vs inconsistent retrieval predictions and the oracle (JOMED, Table 5 and the oracle analysis).

For one query, the reader answers once per retrieved candidate. The query is **consistent** when every
candidate leads to the same predicted class, **inconsistent** otherwise. The **oracle** counts a query as
correct when at least one candidate's prediction is the true label (JOMED: "selects the correct answer if it
exists"). Scores of a method (e.g. FT RAG or JOMED's fused answer) are reported on each subset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medrag_ray.eval.classification import ClassificationReport, classification_report

__all__ = ["ConsistencyAnalysis", "SubsetScores", "consistency_analysis", "is_consistent", "oracle_correct"]


def is_consistent(candidate_predictions: Sequence[str]) -> bool:
    """True when all candidates lead to the same prediction (a single candidate is consistent)."""
    if not candidate_predictions:
        raise ValueError("candidate_predictions is empty; a query needs at least one retrieved candidate")
    return len(set(candidate_predictions)) == 1


def oracle_correct(candidate_predictions: Sequence[str], label: str) -> bool:
    """True when some candidate's prediction is the true ``label``."""
    if not candidate_predictions:
        raise ValueError("candidate_predictions is empty; a query needs at least one retrieved candidate")
    return label in candidate_predictions


@dataclass(frozen=True)
class SubsetScores:
    """The methods' scores and the oracle's accuracy on one subset of queries."""

    n: int
    methods: Mapping[str, ClassificationReport]
    oracle_accuracy: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "oracle_accuracy": round(self.oracle_accuracy, 6),
            "methods": {
                name: {"accuracy": round(r.accuracy, 6), "macro_f1": round(r.macro_f1, 6)}
                for name, r in self.methods.items()
            },
        }


@dataclass(frozen=True)
class ConsistencyAnalysis:
    """Scores on all queries and on the consistent / inconsistent subsets."""

    all: SubsetScores
    consistent: SubsetScores
    inconsistent: SubsetScores

    @property
    def inconsistent_share(self) -> float:
        """JOMED Table 6: the proportion of queries with inconsistent retrieval predictions."""
        return self.inconsistent.n / self.all.n if self.all.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "inconsistent_share": round(self.inconsistent_share, 6),
            "all": self.all.to_dict(),
            "consistent": self.consistent.to_dict(),
            "inconsistent": self.inconsistent.to_dict(),
        }


def _subset(
    rows: Sequence[int],
    labels: Sequence[str],
    candidates: Sequence[Sequence[str]],
    methods: Mapping[str, Sequence[str]],
    classes: Sequence[str],
) -> SubsetScores:
    truth = [labels[i] for i in rows]
    reports = {name: classification_report(truth, [preds[i] for i in rows], classes) for name, preds in methods.items()}
    oracle = sum(oracle_correct(candidates[i], labels[i]) for i in rows)
    return SubsetScores(n=len(rows), methods=reports, oracle_accuracy=oracle / len(rows) if rows else 0.0)


def consistency_analysis(
    labels: Sequence[str],
    candidate_predictions: Sequence[Sequence[str]],
    methods: Mapping[str, Sequence[str]],
    classes: Sequence[str],
) -> ConsistencyAnalysis:
    """Split queries by :func:`is_consistent` of their per-candidate predictions and score each method.

    Args:
        labels: the true class of each query.
        candidate_predictions: per query, the reader's prediction with each retrieved candidate (the split is
            defined by these, after the reader's training and before the retriever's, as in JOMED).
        methods: per method name, one final prediction per query (e.g. ``{"ft_rag": ..., "jomed": ...}``).
        classes: the answer classes (e.g. ``("yes", "no")``); a prediction outside them is an error.
    """
    n = len(labels)
    if len(candidate_predictions) != n:
        raise ValueError(f"{n} labels but {len(candidate_predictions)} candidate_predictions; pass one per query")
    for name, preds in methods.items():
        if len(preds) != n:
            raise ValueError(f"method {name!r} has {len(preds)} predictions for {n} queries; pass one per query")
    flags = [is_consistent(c) for c in candidate_predictions]
    consistent = [i for i in range(n) if flags[i]]
    inconsistent = [i for i in range(n) if not flags[i]]
    return ConsistencyAnalysis(
        all=_subset(list(range(n)), labels, candidate_predictions, methods, classes),
        consistent=_subset(consistent, labels, candidate_predictions, methods, classes),
        inconsistent=_subset(inconsistent, labels, candidate_predictions, methods, classes),
    )
