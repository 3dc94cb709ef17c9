"""Closed-question (yes/no) accuracy of a reader with and without retrieval, per domain (``jobs/eval_reader.py``).

The two conditions are MMed-RAG's M(x_v, x_t) (no retrieval) and M(x_v, x_t + x_r) (the retrieved reports of
the routed domain, kept by adaptive-k). Both are scored from the answer-token logits
(:meth:`~medrag_ray.reader.engine.ReaderEngine.score_closed`) on the same samples, so the two accuracies are
paired: ``helped`` counts questions that retrieval turned from wrong to right, ``hurt`` the reverse (the
copy-reference failure the paper's D_oa pairs target). ``majority_baseline`` is the share of the most common
reference answer of a group: a reader at chance -- or one that always says "no" -- scores about that.

A sample's own case report is never retrieved (:func:`~medrag_ray.reader.context.retrieve_contexts` excludes it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from medrag_ray.config import ReaderContextConfig
from medrag_ray.data.schema import Sample
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import decodable_samples, reader_input, retrieve_contexts
from medrag_ray.reader.engine import ClosedScores
from medrag_ray.reader.prompts import ReaderInput

logger = logging.getLogger(__name__)

OVERALL = "overall"


class ClosedScorer(Protocol):
    """What the evaluation needs of a reader (:class:`~medrag_ray.reader.engine.ReaderEngine` has it)."""

    def score_closed(self, inputs: Sequence[ReaderInput], choices: Sequence[str] = YES_NO) -> ClosedScores: ...


@dataclass(frozen=True)
class GroupScores:
    """Paired accuracy of one group of closed questions (a domain, or all of them)."""

    n: int
    correct_no_rag: int
    correct_rag: int
    helped: int
    """Wrong without retrieval, right with it."""
    hurt: int
    """Right without retrieval, wrong with it."""
    majority_answer: str
    majority_count: int

    @property
    def accuracy_no_rag(self) -> float:
        return self.correct_no_rag / self.n

    @property
    def accuracy_rag(self) -> float:
        return self.correct_rag / self.n

    @property
    def majority_baseline(self) -> float:
        return self.majority_count / self.n

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy_no_rag": round(self.accuracy_no_rag, 6),
            "accuracy_rag": round(self.accuracy_rag, 6),
            "helped": self.helped,
            "hurt": self.hurt,
            "majority_answer": self.majority_answer,
            "majority_baseline": round(self.majority_baseline, 6),
        }


@dataclass(frozen=True)
class ReaderEvalReport:
    """Per-domain and overall :class:`GroupScores`, and what was left out of them (and why)."""

    per_domain: dict[str, GroupScores]
    overall: GroupScores
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason (``not_closed``, ``not_yes_no``, ``undecodable_image``) -> samples left out."""
    undecodable_image_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            OVERALL: self.overall.to_dict(),
            "per_domain": {d: g.to_dict() for d, g in self.per_domain.items()},
            "skipped": dict(self.skipped),
            "undecodable_image_ids": list(self.undecodable_image_ids),
        }


def _group(references: Sequence[str], no_rag: Sequence[str], rag: Sequence[str]) -> GroupScores:
    right_no = [a == y for a, y in zip(no_rag, references, strict=True)]
    right_rag = [a == y for a, y in zip(rag, references, strict=True)]
    counts = Counter(references)
    # Most common answer; a tie goes to the alphabetically first so the report does not depend on sample order.
    majority, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return GroupScores(
        n=len(references),
        correct_no_rag=sum(right_no),
        correct_rag=sum(right_rag),
        helped=sum(r and not o for o, r in zip(right_no, right_rag, strict=True)),
        hurt=sum(o and not r for o, r in zip(right_no, right_rag, strict=True)),
        majority_answer=majority,
        majority_count=count,
    )


def reader_report(
    samples: Sequence[Sample], answers_no_rag: Sequence[str], answers_rag: Sequence[str]
) -> ReaderEvalReport:
    """Per (labelled) domain and overall paired accuracy of closed yes/no ``samples``.

    ``answers_*`` are the reader's normalised answers, one per sample in order; the reference is
    ``normalize_closed(sample.answer)``, which must be yes or no (filter the samples first).
    """
    if not len(samples) == len(answers_no_rag) == len(answers_rag):
        raise ValueError(
            f"{len(samples)} samples but {len(answers_no_rag)} no-RAG and {len(answers_rag)} RAG answers; "
            "pass one answer per sample in each condition"
        )
    if not samples:
        raise ValueError("reader_report got no samples; pass at least one closed yes/no sample")
    references = []
    for s in samples:
        ref = normalize_closed(s.answer, YES_NO)
        if s.answer_type != "closed" or ref is None:
            raise ValueError(
                f"sample {s.id} is not a closed yes/no question (answer_type={s.answer_type!r}, "
                f"answer={s.answer!r}); keep only those (evaluate_reader does)"
            )
        references.append(ref)
    by_domain: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_domain.setdefault(s.domain, []).append(i)

    def pick(values: Sequence[str], idx: list[int]) -> list[str]:
        return [values[i] for i in idx]

    per_domain = {
        d: _group(pick(references, idx), pick(answers_no_rag, idx), pick(answers_rag, idx))
        for d, idx in sorted(by_domain.items())
    }
    return ReaderEvalReport(per_domain=per_domain, overall=_group(references, answers_no_rag, answers_rag))


def evaluate_reader(
    engine: ClosedScorer,
    retriever: object,
    samples: Sequence[Sample],
    context_cfg: ReaderContextConfig,
    route: bool = True,
    batch_size: int = 32,
) -> ReaderEvalReport:
    """Score the closed yes/no ``samples`` without and with retrieval; returns the paired report.

    Args:
        engine: the reader (``score_closed``).
        retriever: a :class:`~medrag_ray.retrieval.retriever.MultimodalRetriever` (or anything with its
            ``retrieve``).
        context_cfg: the retrieval settings and prompt ``style``.
        route: pick the domain with the router F(x_v); false uses each sample's labelled domain.
        batch_size: samples decoded, retrieved for and scored per step.

    Samples that are not ``closed``, whose reference is not yes/no, or whose image cannot be decoded are
    skipped and counted in the report (the undecodable ones by id).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    skipped = {"not_closed": 0, "not_yes_no": 0, "undecodable_image": 0}
    eligible: list[Sample] = []
    for s in samples:
        if s.answer_type != "closed":
            skipped["not_closed"] += 1
        elif normalize_closed(s.answer, YES_NO) is None:
            skipped["not_yes_no"] += 1
        else:
            eligible.append(s)
    if skipped["not_closed"] or skipped["not_yes_no"]:
        logger.info(
            "evaluating %d closed yes/no sample(s); skipped %d that are not closed questions and %d whose "
            "reference answer is not yes/no",
            len(eligible),
            skipped["not_closed"],
            skipped["not_yes_no"],
        )
    with_images = context_cfg.style == "jomed"
    undecodable: list[str] = []
    scored: list[Sample] = []
    no_rag: list[str] = []
    rag: list[str] = []
    for start in tqdm(range(0, len(eligible), batch_size), desc="reader eval", unit="batch"):
        chunk, images = decodable_samples(eligible[start : start + batch_size], undecodable)
        if not chunk:
            continue
        contexts = retrieve_contexts(
            retriever, chunk, images, context_cfg.retrieval, route=route, with_images=with_images
        )
        plain = [reader_input(s, im, None, context_cfg.style) for s, im in zip(chunk, images, strict=True)]
        augmented = [
            reader_input(s, im, c, context_cfg.style) for s, im, c in zip(chunk, images, contexts, strict=True)
        ]
        no_rag.extend(engine.score_closed(plain, YES_NO).answers)
        rag.extend(engine.score_closed(augmented, YES_NO).answers)
        scored.extend(chunk)
    skipped["undecodable_image"] = len(undecodable)
    if undecodable:
        logger.warning("skipped %d sample(s) with undecodable images: %s", len(undecodable), undecodable)
    if not scored:
        raise ValueError(
            f"no closed yes/no sample with a readable image to evaluate (of {len(samples)}; skipped {skipped}); "
            "pass samples with answer_type='closed' and yes/no answers"
        )
    report = reader_report(scored, no_rag, rag)
    return dataclasses.replace(report, skipped=skipped, undecodable_image_ids=tuple(undecodable))


def reader_markdown(report: ReaderEvalReport, title: str) -> str:
    """Per-domain and overall accuracy without / with retrieval, flips and the majority baseline, as markdown."""
    lines = [
        f"# {title}",
        "",
        "| domain | n | accuracy no RAG | accuracy RAG | helped | hurt | majority baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [*report.per_domain.items(), (f"**{OVERALL}**", report.overall)]
    for name, g in rows:
        lines.append(
            f"| {name} | {g.n} | {g.accuracy_no_rag:.3f} | {g.accuracy_rag:.3f} | {g.helped} | {g.hurt} | "
            f"{g.majority_baseline:.3f} ({g.majority_answer}) |"
        )
    lines += [
        "",
        "helped: wrong without retrieval, right with it; hurt: the reverse. Majority baseline: the share of the "
        "most common reference answer.",
    ]
    left_out = {k: v for k, v in report.skipped.items() if v}
    if left_out:
        lines += ["", "Skipped: " + ", ".join(f"{k} {v}" for k, v in left_out.items()) + "."]
    return "\n".join(lines) + "\n"
