"""RAG-PT preference rules of MMed-RAG (§2.3, Algorithm 1) as pure functions of the reader's answers.

For one sample (x_v, x_t, y) the reader M is run in up to four passes (names below); each rule looks at the
normalised answers and returns at most one (chosen, rejected) pair:

- D_cm  (cross-modality, Algorithm 1 lines 7-9): the answer is right even on the unrelated noisy image x_v*
  with retrieval, so it was copied from the references. Chosen = y on x_v; rejected = the same answer on x_v*.
- D_oa¹ (lines 12-14): retrieval helps. M(x_v, x_t+x_r) = y and M(x_v, x_t) ≠ y.
- D_oa² (lines 15-17): retrieval hurts. M(x_v, x_t) = y and M(x_v, x_t+x_r) ≠ y.

D_cm has two readings:

- ``"algorithm"`` (default), Algorithm 1 line 7: M(x_v, x_t+x_r) = y and M(x_v*, x_t+x_r) = y.
- ``"text"``, the §2.3 wording: additionally M(x_v*, x_t) ≠ y, i.e. without the references the noisy image
  does not give the answer, so the right answer on x_v* really came from retrieval. It needs a 4th pass.

Algorithm 1 is the default because it is the paper's precise statement, it needs only three passes, and it
is what the released alignment data looks like: D_cm records have chosen and rejected answers equal and
``rejected_noised: 1`` (the preference is carried by the image, not by the text).
"""

from __future__ import annotations

from dataclasses import dataclass

RAG = "rag"  # M(x_v, x_t + x_r)
NO_RAG = "no_rag"  # M(x_v, x_t)
NOISY_RAG = "noisy_rag"  # M(x_v*, x_t + x_r)
NOISY_NO_RAG = "noisy_no_rag"  # M(x_v*, x_t), only needed by the text-side D_cm
PASSES = (RAG, NO_RAG, NOISY_RAG, NOISY_NO_RAG)
NOISED_PASSES = (NOISY_RAG, NOISY_NO_RAG)

DCM_RULES = ("algorithm", "text")
PAIR_TYPES = ("cm", "oa1", "oa2")


@dataclass(frozen=True)
class ReaderOutcomes:
    """The ground truth y and the reader's normalised answers for one sample, one per pass."""

    answer: str
    rag: str
    no_rag: str
    noisy_rag: str
    noisy_no_rag: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"answer (the ground truth y) must be a non-empty string, got {self.answer!r}")
        for name in (RAG, NO_RAG, NOISY_RAG):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str (use '' for an empty answer), got {getattr(self, name)!r}")
        if self.noisy_no_rag is not None and not isinstance(self.noisy_no_rag, str):
            raise TypeError(f"noisy_no_rag must be a str or None, got {self.noisy_no_rag!r}")


@dataclass(frozen=True)
class MinedPair:
    """One preference pair; ``*_noised`` = 1 when that side's image is the noisy x_v* instead of x_v."""

    pair_type: str
    chosen: str
    rejected: str
    chosen_pass: str
    rejected_pass: str
    chosen_noised: int
    rejected_noised: int

    def __post_init__(self) -> None:
        if self.pair_type not in PAIR_TYPES:
            raise ValueError(f"pair_type must be one of {PAIR_TYPES}, got {self.pair_type!r}")
        for name in ("chosen_pass", "rejected_pass"):
            if getattr(self, name) not in PASSES:
                raise ValueError(f"{name} must be one of {PASSES}, got {getattr(self, name)!r}")
        for name in ("chosen_noised", "rejected_noised"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1, got {getattr(self, name)!r}")
        if not self.chosen or not self.rejected:
            raise ValueError(f"chosen and rejected must be non-empty, got {self.chosen!r} / {self.rejected!r}")


def _pair(pair_type: str, chosen: str, chosen_pass: str, rejected: str, rejected_pass: str) -> MinedPair | None:
    if not rejected:
        return None
    return MinedPair(
        pair_type=pair_type,
        chosen=chosen,
        rejected=rejected,
        chosen_pass=chosen_pass,
        rejected_pass=rejected_pass,
        chosen_noised=int(chosen_pass in NOISED_PASSES),
        rejected_noised=int(rejected_pass in NOISED_PASSES),
    )


def d_cm(o: ReaderOutcomes, rule: str = "algorithm") -> MinedPair | None:
    """Cross-modality pair: chosen y on x_v (pass ``rag``), rejected the ``noisy_rag`` answer on x_v*.

    ``rule="algorithm"`` (Algorithm 1 line 7): rag == y and noisy_rag == y.
    ``rule="text"`` (§2.3 wording): also noisy_no_rag != y; needs the 4th pass M(x_v*, x_t).
    """
    if rule not in DCM_RULES:
        raise ValueError(f"dcm_rule must be one of {DCM_RULES}, got {rule!r}")
    y = o.answer
    if rule == "text":
        if o.noisy_no_rag is None:
            raise ValueError(
                "dcm_rule=text needs the 4th pass M(x_v*, x_t) (noisy_no_rag); run it or use dcm_rule=algorithm"
            )
        if o.noisy_no_rag == y:
            return None
    if o.rag == y and o.noisy_rag == y:
        return _pair("cm", y, RAG, o.noisy_rag, NOISY_RAG)
    return None


def d_oa1(o: ReaderOutcomes) -> MinedPair | None:
    """Retrieval helps (Algorithm 1 lines 12-14): rag == y, no_rag != y → chosen y, rejected the no_rag answer."""
    if o.rag == o.answer and o.no_rag != o.answer:
        return _pair("oa1", o.answer, RAG, o.no_rag, NO_RAG)
    return None


def d_oa2(o: ReaderOutcomes) -> MinedPair | None:
    """Retrieval hurts (Algorithm 1 lines 15-17): no_rag == y, rag != y → chosen y, rejected the rag answer."""
    if o.no_rag == o.answer and o.rag != o.answer:
        return _pair("oa2", o.answer, NO_RAG, o.rag, RAG)
    return None


def mine(o: ReaderOutcomes, dcm_rule: str = "algorithm") -> list[MinedPair]:
    """All pairs one sample yields, in the order cm, oa1, oa2 (oa1 and oa2 exclude each other)."""
    pairs = (d_cm(o, dcm_rule), d_oa1(o), d_oa2(o))
    return [p for p in pairs if p is not None]
