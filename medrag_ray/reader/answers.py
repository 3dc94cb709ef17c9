"""Answer normalisation for the reader's outputs and the ground truth.

The released ``test/vqa`` answers are messy (``Yes.``, ``- No.``, ``No. (…)``, trailing spaces, a few that
are not yes/no at all), and so is free generation. Closed questions are reduced to the first whole-word
occurrence of one of the choices; open answers are lowercased with whitespace collapsed and trailing
punctuation removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

YES_NO = ("yes", "no")

_BULLETS = "-*•·–—>"
_TRAILING_PUNCT = ".,;:!?"


def _choice_pattern(choices: Sequence[str]) -> re.Pattern[str]:
    cleaned = [c.strip().lower() for c in choices]
    if not cleaned or not all(cleaned):
        raise ValueError(f"choices must be a non-empty list of non-empty strings, got {list(choices)!r}")
    # Longest first so that "no finding" wins over "no" at the same position.
    alternation = "|".join(re.escape(c) for c in sorted(set(cleaned), key=len, reverse=True))
    return re.compile(rf"(?<!\w)({alternation})(?!\w)")


def normalize_closed(text: str, choices: Sequence[str] = YES_NO) -> str | None:
    """The first whole-word choice in ``text`` (lowercased), or None when there is none.

    Whole-word: "note" is not "no" and "Yesterday" is not "yes". Leading bullets ("-", "*", "•") are dropped.
    """
    pattern = _choice_pattern(choices)
    cleaned = text.strip().lower().lstrip(_BULLETS + " \t\n")
    match = pattern.search(cleaned)
    return match.group(1) if match else None


def normalize_answer(text: str, choices: Sequence[str] | None = None) -> str:
    """Closed (``choices`` given): :func:`normalize_closed`, or the stripped lowercased text when unparseable.

    Open (``choices=None``): lowercase, collapse whitespace, strip trailing punctuation ``.,;:!?``.
    """
    if choices is not None:
        closed = normalize_closed(text, choices)
        return closed if closed is not None else text.strip().lower()
    collapsed = " ".join(text.lower().split())
    return collapsed.rstrip(_TRAILING_PUNCT + " ")
