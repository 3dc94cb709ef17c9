"""RAG-PT preference rules (MMed-RAG Algorithm 1) over the full truth table of reader outcomes."""

from __future__ import annotations

import itertools

import pytest

from medrag_ray.mining.rules import (
    DCM_RULES,
    NO_RAG,
    NOISY_RAG,
    RAG,
    MinedPair,
    ReaderOutcomes,
    d_cm,
    d_oa1,
    d_oa2,
    mine,
)

Y = "yes"
WRONG = {"rag": "w-rag", "no_rag": "w-no_rag", "noisy_rag": "w-noisy_rag", "noisy_no_rag": "w-noisy_no_rag"}

# (rag, no_rag, noisy_rag, noisy_no_rag) correct? -> pair types (algorithm rule), pair types (text rule).
TRUTH_TABLE = {
    (0, 0, 0, 0): ((), ()),
    (0, 0, 0, 1): ((), ()),
    (0, 0, 1, 0): ((), ()),
    (0, 0, 1, 1): ((), ()),
    (0, 1, 0, 0): (("oa2",), ("oa2",)),
    (0, 1, 0, 1): (("oa2",), ("oa2",)),
    (0, 1, 1, 0): (("oa2",), ("oa2",)),
    (0, 1, 1, 1): (("oa2",), ("oa2",)),
    (1, 0, 0, 0): (("oa1",), ("oa1",)),
    (1, 0, 0, 1): (("oa1",), ("oa1",)),
    (1, 0, 1, 0): (("cm", "oa1"), ("cm", "oa1")),
    (1, 0, 1, 1): (("cm", "oa1"), ("oa1",)),
    (1, 1, 0, 0): ((), ()),
    (1, 1, 0, 1): ((), ()),
    (1, 1, 1, 0): (("cm",), ("cm",)),
    (1, 1, 1, 1): (("cm",), ()),
}

# pair type -> (chosen, rejected, chosen_pass, rejected_pass, chosen_noised, rejected_noised)
EXPECTED_FIELDS = {
    "cm": (Y, Y, "rag", "noisy_rag", 0, 1),
    "oa1": (Y, "w-no_rag", "rag", "no_rag", 0, 0),
    "oa2": (Y, "w-rag", "no_rag", "rag", 0, 0),
}


def _outcomes(flags: tuple[int, int, int, int]) -> ReaderOutcomes:
    names = ("rag", "no_rag", "noisy_rag", "noisy_no_rag")
    return ReaderOutcomes(answer=Y, **{n: (Y if ok else WRONG[n]) for n, ok in zip(names, flags, strict=True)})


def _fields(p: MinedPair) -> tuple:
    return (p.chosen, p.rejected, p.chosen_pass, p.rejected_pass, p.chosen_noised, p.rejected_noised)


def test_truth_table_is_complete() -> None:
    assert set(TRUTH_TABLE) == set(itertools.product((0, 1), repeat=4))


@pytest.mark.parametrize("flags", sorted(TRUTH_TABLE))
@pytest.mark.parametrize("rule_index", [0, 1])
def test_every_branch_of_the_truth_table(flags: tuple[int, int, int, int], rule_index: int) -> None:
    rule = DCM_RULES[rule_index]
    pairs = mine(_outcomes(flags), dcm_rule=rule)
    expected_types = TRUTH_TABLE[flags][rule_index]
    assert tuple(p.pair_type for p in pairs) == expected_types  # also checks the order cm, oa1, oa2
    for p in pairs:
        assert _fields(p) == EXPECTED_FIELDS[p.pair_type]


def test_algorithm_rule_needs_only_three_passes() -> None:
    o = ReaderOutcomes(answer=Y, rag=Y, no_rag="no", noisy_rag=Y)
    assert [p.pair_type for p in mine(o)] == ["cm", "oa1"]
    assert d_cm(o) == MinedPair("cm", Y, Y, RAG, NOISY_RAG, 0, 1)


def test_text_rule_without_fourth_pass_raises() -> None:
    o = ReaderOutcomes(answer=Y, rag=Y, no_rag=Y, noisy_rag=Y)
    with pytest.raises(ValueError, match=r"dcm_rule=text needs the 4th pass M\(x_v\*, x_t\)"):
        d_cm(o, rule="text")
    with pytest.raises(ValueError, match="dcm_rule=text"):
        mine(o, dcm_rule="text")


def test_unknown_dcm_rule_raises() -> None:
    o = ReaderOutcomes(answer=Y, rag=Y, no_rag=Y, noisy_rag=Y)
    with pytest.raises(ValueError, match=r"dcm_rule must be one of \('algorithm', 'text'\)"):
        d_cm(o, rule="paper")


def test_empty_rejected_answer_gives_no_pair() -> None:
    helps = ReaderOutcomes(answer=Y, rag=Y, no_rag="", noisy_rag="no")
    assert d_oa1(helps) is None and mine(helps) == []
    hurts = ReaderOutcomes(answer=Y, rag="", no_rag=Y, noisy_rag="")
    assert d_oa2(hurts) is None and mine(hurts) == []
    # a non-empty wrong answer in the same place does give the pair
    assert d_oa1(ReaderOutcomes(answer=Y, rag=Y, no_rag="no", noisy_rag="no")) == MinedPair(
        "oa1", Y, "no", RAG, NO_RAG, 0, 0
    )


def test_oa1_and_oa2_never_both_fire() -> None:
    values = (Y, "no", "")
    for rag, no_rag, noisy_rag in itertools.product(values, repeat=3):
        o = ReaderOutcomes(answer=Y, rag=rag, no_rag=no_rag, noisy_rag=noisy_rag)
        assert not (d_oa1(o) and d_oa2(o))
        types = [p.pair_type for p in mine(o)]
        assert not ({"oa1", "oa2"} <= set(types))


def test_outcomes_validation() -> None:
    with pytest.raises(ValueError, match="answer"):
        ReaderOutcomes(answer="  ", rag=Y, no_rag=Y, noisy_rag=Y)
    with pytest.raises(TypeError, match="no_rag"):
        ReaderOutcomes(answer=Y, rag=Y, no_rag=None, noisy_rag=Y)  # type: ignore[arg-type]


def test_pair_validation() -> None:
    with pytest.raises(ValueError, match="pair_type"):
        MinedPair("oa3", Y, "no", RAG, NO_RAG, 0, 0)
    with pytest.raises(ValueError, match="rejected_pass"):
        MinedPair("oa1", Y, "no", RAG, "noisy", 0, 0)
    with pytest.raises(ValueError, match="rejected_noised"):
        MinedPair("cm", Y, Y, RAG, NOISY_RAG, 0, 2)
    with pytest.raises(ValueError, match="non-empty"):
        MinedPair("oa1", Y, "", RAG, NO_RAG, 0, 0)
