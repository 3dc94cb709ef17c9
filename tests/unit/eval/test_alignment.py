"""Copy-reference / over-reliance rates (MMed-RAG Fig. 3) and their ties to the preference rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medrag_ray.eval.alignment import alignment_report, copy_reference_rate, over_reliance_rate
from medrag_ray.mining.rules import ReaderOutcomes, mine


def _o(answer: str, rag: str, no_rag: str, noisy_rag: str) -> ReaderOutcomes:
    return ReaderOutcomes(answer=answer, rag=rag, no_rag=no_rag, noisy_rag=noisy_rag)


HAND = [
    _o("yes", "yes", "yes", "yes"),  # rag right, noisy right      -> CR num
    _o("yes", "yes", "no", "no"),  # rag right, noisy wrong        -> CR den only
    _o("no", "no", "yes", "no"),  # rag right, noisy right         -> CR num
    _o("yes", "no", "yes", "no"),  # rag wrong, no_rag right       -> OR num
    _o("no", "yes", "yes", "yes"),  # rag wrong, no_rag wrong      -> OR den only
    _o("yes", "yes", "no", "no"),  # rag right, noisy wrong        -> CR den only
    _o("no", "yes", "no", "no"),  # rag wrong, no_rag right        -> OR num
]


def test_hand_rates() -> None:
    assert copy_reference_rate(HAND) == pytest.approx(2 / 4)
    assert over_reliance_rate(HAND) == pytest.approx(2 / 3)
    report = alignment_report(HAND)
    assert report == {
        "n": 7,
        "cr_rate": pytest.approx(0.5),
        "cr_numerator": 2,
        "cr_denominator": 4,
        "or_rate": pytest.approx(2 / 3),
        "or_numerator": 2,
        "or_denominator": 3,
        "accuracy_rag": pytest.approx(4 / 7),
        "accuracy_no_rag": pytest.approx(3 / 7),
    }


def test_zero_denominators_are_nan() -> None:
    all_right = [_o("yes", "yes", "no", "no"), _o("no", "no", "no", "yes")]
    assert copy_reference_rate(all_right) == 0.0
    assert math.isnan(over_reliance_rate(all_right))
    all_wrong = [_o("yes", "no", "yes", "yes")]
    assert math.isnan(copy_reference_rate(all_wrong))
    assert over_reliance_rate(all_wrong) == 1.0
    empty = alignment_report([])
    assert empty["n"] == 0 and empty["cr_denominator"] == 0 and empty["or_denominator"] == 0
    for key in ("cr_rate", "or_rate", "accuracy_rag", "accuracy_no_rag"):
        assert math.isnan(empty[key])


def test_numerators_equal_mined_pair_counts() -> None:
    rng = np.random.default_rng(0)
    outcomes = [
        _o(str(rng.choice(["yes", "no"])), *(str(v) for v in rng.choice(["yes", "no", "maybe"], size=3)))
        for _ in range(300)
    ]
    pairs = [p for o in outcomes for p in mine(o)]
    report = alignment_report(outcomes)
    assert report["cr_numerator"] == sum(p.pair_type == "cm" for p in pairs)
    assert report["or_numerator"] == sum(p.pair_type == "oa2" for p in pairs)
    assert report["cr_denominator"] + report["or_denominator"] == report["n"]
    assert 0 < report["cr_numerator"] < report["cr_denominator"]
    assert 0 < report["or_numerator"] < report["or_denominator"]


def test_empty_rag_answer_counts_as_an_error_but_mines_no_pair() -> None:
    o = _o("yes", "", "yes", "no")
    assert over_reliance_rate([o]) == 1.0
    assert mine(o) == []
