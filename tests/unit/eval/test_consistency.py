from __future__ import annotations

import pytest

from medrag_ray.eval.consistency import consistency_analysis, is_consistent, oracle_correct


def test_is_consistent_and_oracle() -> None:
    assert is_consistent(["yes"]) and is_consistent(["no", "no", "no"])
    assert not is_consistent(["yes", "no", "yes"])
    assert oracle_correct(["no", "yes"], "yes") and not oracle_correct(["no", "no"], "yes")
    for fn in (is_consistent, lambda c: oracle_correct(c, "yes")):
        with pytest.raises(ValueError, match="at least one retrieved candidate"):
            fn([])


def test_consistency_analysis_by_hand() -> None:
    labels = ["yes", "no", "yes", "no", "yes"]
    candidates = [
        ["yes", "yes"],  # consistent, oracle right
        ["yes", "yes"],  # consistent, oracle wrong
        ["no", "yes"],  # inconsistent, oracle right
        ["no", "yes"],  # inconsistent, oracle right
        ["no", "no", "no"],  # consistent, oracle wrong
    ]
    methods = {"ft_rag": ["yes", "yes", "no", "yes", "no"], "jomed": ["yes", "no", "yes", "no", "no"]}
    a = consistency_analysis(labels, candidates, methods, ("yes", "no"))
    assert (a.all.n, a.consistent.n, a.inconsistent.n) == (5, 3, 2)
    assert a.inconsistent_share == pytest.approx(0.4)
    assert a.consistent.oracle_accuracy == pytest.approx(1 / 3)
    assert a.inconsistent.oracle_accuracy == pytest.approx(1.0)
    assert a.all.oracle_accuracy == pytest.approx(3 / 5)
    assert a.all.methods["ft_rag"].accuracy == pytest.approx(1 / 5)
    assert a.inconsistent.methods["ft_rag"].accuracy == 0.0
    assert a.inconsistent.methods["jomed"].accuracy == 1.0
    assert a.consistent.methods["jomed"].accuracy == pytest.approx(2 / 3)
    # Consistent subset for jomed: truth (yes, no, yes), predicted (yes, no, no): F1(yes) = 2/3, F1(no) = 2/3.
    assert a.consistent.methods["jomed"].macro_f1 == pytest.approx(2 / 3)
    d = a.to_dict()
    assert d["inconsistent"]["methods"]["jomed"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert d["consistent"]["n"] == 3


def test_consistency_analysis_rejects_misaligned_inputs() -> None:
    with pytest.raises(ValueError, match="2 labels but 1 candidate_predictions"):
        consistency_analysis(["yes", "no"], [["yes"]], {}, ("yes", "no"))
    with pytest.raises(ValueError, match="method 'jomed' has 1 predictions for 2 queries"):
        consistency_analysis(["yes", "no"], [["yes"], ["no"]], {"jomed": ["yes"]}, ("yes", "no"))
    with pytest.raises(ValueError, match="not in labels"):
        consistency_analysis(["yes"], [["yes"]], {"m": ["maybe"]}, ("yes", "no"))
