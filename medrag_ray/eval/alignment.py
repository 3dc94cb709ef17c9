"""Copy-reference (CR) and over-reliance (OR) rates, MMed-RAG Fig. 3, from per-sample reader outcomes.

The paper gives no formula, only the wording: with retrieval "the model may directly copy reference
information" (CR) and OR is "the proportion of errors affected by RAG interference". Our operational
definitions, on the passes of :mod:`medrag_ray.mining.rules` (answers already normalised):

- CR = #(rag == y and noisy_rag == y) / #(rag == y): of the samples answered right with retrieval on the
  real image, the share still right on the unrelated noisy image with the same retrieval — the answer did
  not need the image, it came from the references. The numerator is the number of Algorithm 1 D_cm pairs.
- OR = #(rag != y and no_rag == y) / #(rag != y): of the errors made with retrieval, the share the reader
  got right without it — errors caused by RAG interference. The numerator is the number of D_oa² pairs
  (except samples whose rag answer is empty: an error here, but no pair since the rejected text is empty).

A rate whose denominator is 0 is NaN, not an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from medrag_ray.mining.rules import ReaderOutcomes


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def _cr_counts(outcomes: Sequence[ReaderOutcomes]) -> tuple[int, int]:
    right = [o for o in outcomes if o.rag == o.answer]
    return sum(o.noisy_rag == o.answer for o in right), len(right)


def _or_counts(outcomes: Sequence[ReaderOutcomes]) -> tuple[int, int]:
    wrong = [o for o in outcomes if o.rag != o.answer]
    return sum(o.no_rag == o.answer for o in wrong), len(wrong)


def copy_reference_rate(outcomes: Sequence[ReaderOutcomes]) -> float:
    """Among rag == y, the fraction with noisy_rag == y (NaN when no sample has rag == y)."""
    return _ratio(*_cr_counts(outcomes))


def over_reliance_rate(outcomes: Sequence[ReaderOutcomes]) -> float:
    """Among rag != y, the fraction with no_rag == y (NaN when no sample has rag != y)."""
    return _ratio(*_or_counts(outcomes))


def alignment_report(outcomes: Sequence[ReaderOutcomes]) -> dict[str, Any]:
    """CR and OR with their numerators/denominators, accuracy with and without retrieval, and n."""
    cr_num, cr_den = _cr_counts(outcomes)
    or_num, or_den = _or_counts(outcomes)
    n = len(outcomes)
    return {
        "n": n,
        "cr_rate": _ratio(cr_num, cr_den),
        "cr_numerator": cr_num,
        "cr_denominator": cr_den,
        "or_rate": _ratio(or_num, or_den),
        "or_numerator": or_num,
        "or_denominator": or_den,
        "accuracy_rag": _ratio(sum(o.rag == o.answer for o in outcomes), n),
        "accuracy_no_rag": _ratio(sum(o.no_rag == o.answer for o in outcomes), n),
    }
