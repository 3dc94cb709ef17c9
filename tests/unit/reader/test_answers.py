"""Answer normalisation of messy closed (yes/no) and open answers."""

from __future__ import annotations

import pytest

from medrag_ray.reader.answers import YES_NO, normalize_answer, normalize_closed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes.", "yes"),
        ("- No.", "no"),
        ("No. (there is no evidence of effusion)", "no"),
        ("  yes  ", "yes"),
        ("yes \n", "yes"),
        ("NO", "no"),
        ("* Yes", "yes"),
        ("• no", "no"),
        ("Yes, the patient has cardiomegaly.", "yes"),
        ("The answer is no.", "no"),
        ("no, yes", "no"),
        ("Yesterday", None),
        ("note", None),
        ("maybe", None),
        ("nope, not sure", None),
        ("", None),
        ("-", None),
    ],
)
def test_normalize_closed_yes_no(text: str, expected: str | None) -> None:
    assert normalize_closed(text) == expected
    assert normalize_closed(text, YES_NO) == expected


def test_custom_choices() -> None:
    choices = ("left", "right", "no finding")
    assert normalize_closed("- Right lung.", choices) == "right"
    assert normalize_closed("No finding.", choices) == "no finding"
    assert normalize_closed("leftover", choices) is None
    assert normalize_closed("Rightward, then left", choices) == "left"
    assert normalize_closed("yes", ("Yes", "No")) == "yes"


def test_empty_choices_raise() -> None:
    with pytest.raises(ValueError, match="choices"):
        normalize_closed("yes", ())
    with pytest.raises(ValueError, match="choices"):
        normalize_closed("yes", ("yes", " "))


def test_normalize_answer_closed_and_unparseable() -> None:
    assert normalize_answer("No. (…)", YES_NO) == "no"
    assert normalize_answer("  Maybe  ", YES_NO) == "maybe"
    assert normalize_answer("Yes.", ["yes", "no"]) == "yes"


def test_normalize_answer_open() -> None:
    assert normalize_answer("  Right  Lower\tLobe Pneumonia.  ") == "right lower lobe pneumonia"
    assert normalize_answer("Effusion?!") == "effusion"
    assert normalize_answer("Yes.") == "yes"
    assert normalize_answer("3.5 cm") == "3.5 cm"
