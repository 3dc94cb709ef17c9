"""Evaluation of RAG-PT and JOMED on closed (yes/no) questions (``jobs/evaluate.py``).

* **Ablation** (shaped like MMed-RAG's Table 2): accuracy, macro F1 and AUROC (from p(yes)) of each row --
  the reader without retrieval, + retrieval with a fixed k, + adaptive-k, + RAG-PT stage 1, + stage 2 -- overall
  and per domain, on the same samples; and the copy-reference / over-reliance rates (:mod:`.alignment`) of a
  reader from the mining passes on those samples.
* **JOMED comparison** (shaped like JOMED's Table 5): *FT RAG* (the fine-tuned reader with the retriever's top-k
  pairs prepended together), *JOMED* (the distilled retriever's top-k candidates scored one at a time and fused
  by ``sum_k p(a | k) p_R(k)``) and the *oracle* (right when some candidate's answer is), on all questions and on
  the consistent / inconsistent subsets (:mod:`.consistency`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from medrag_ray.data.schema import Sample
from medrag_ray.eval.alignment import alignment_report
from medrag_ray.eval.classification import classification_report
from medrag_ray.eval.consistency import consistency_analysis
from medrag_ray.mining.miner import MiningSettings, PreferenceMiner, outcomes_of
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import reader_input, retrieve_contexts
from medrag_ray.reader.engine import fuse_candidate_probs
from medrag_ray.retrieval.distill import score_candidates
from medrag_ray.retrieval.retrieval_config import RetrievalConfig

OVERALL = "overall"


@dataclass(frozen=True)
class ClosedPredictions:
    """p(yes) per sample, with the samples' domains and reference answers."""

    domains: tuple[str, ...]
    labels: tuple[str, ...]
    p_yes: np.ndarray

    @property
    def answers(self) -> list[str]:
        return ["yes" if p >= 0.5 else "no" for p in self.p_yes]


def references(samples: Sequence[Sample]) -> tuple[str, ...]:
    refs = [normalize_closed(s.answer, YES_NO) for s in samples]
    bad = [s.id for s, r in zip(samples, refs, strict=True) if s.answer_type != "closed" or r is None]
    if bad:
        raise ValueError(f"samples {bad[:3]} are not closed yes/no questions; filter them first")
    return tuple(str(r) for r in refs)


def closed_metrics(labels: Sequence[str], p_yes: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 of the answers (p(yes) >= 0.5), AUROC of p(yes); AUROC is NaN with one class."""
    answers = ["yes" if p >= 0.5 else "no" for p in p_yes]
    report = classification_report(labels, answers, YES_NO)
    positive = np.asarray([y == "yes" for y in labels])
    auroc = float(roc_auc_score(positive, p_yes)) if 0 < positive.sum() < len(positive) else math.nan
    return {"n": len(labels), "accuracy": report.accuracy, "macro_f1": report.macro_f1, "auroc": auroc}


def grouped_metrics(pred: ClosedPredictions) -> dict[str, dict[str, float]]:
    """:func:`closed_metrics` overall and per domain."""
    out = {OVERALL: closed_metrics(pred.labels, pred.p_yes)}
    for d in sorted(set(pred.domains)):
        idx = [i for i, x in enumerate(pred.domains) if x == d]
        out[d] = closed_metrics([pred.labels[i] for i in idx], pred.p_yes[idx])
    return out


def predict_closed(
    engine: Any,
    retriever: Any,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    retrieval: RetrievalConfig | None,
    style: str = "mmed",
    route: bool = True,
) -> ClosedPredictions:
    """p(yes) of the reader, without retrieval (``retrieval=None``) or with the kept retrieved context."""
    labels = references(samples)
    if retrieval is None:
        inputs = [reader_input(s, im, None, style) for s, im in zip(samples, images, strict=True)]
    else:
        contexts = retrieve_contexts(retriever, samples, images, retrieval, route=route, with_images=style == "jomed")
        inputs = [reader_input(s, im, c, style) for s, im, c in zip(samples, images, contexts, strict=True)]
    probs = engine.score_closed(inputs, YES_NO).probs
    return ClosedPredictions(tuple(s.domain for s in samples), labels, np.asarray(probs[:, 0], dtype=np.float64))


def alignment_rates(
    engine: Any, retriever: Any, samples: Sequence[Sample], settings: MiningSettings
) -> dict[str, Any]:
    """CR / OR rates (and per-pass accuracies) of a reader on ``samples`` from the mining passes."""
    outcomes = PreferenceMiner(retriever, engine, settings).mine_batch(samples).outcomes
    return alignment_report(outcomes_of(outcomes))


def ablation_markdown(rows: Mapping[str, Mapping[str, Mapping[str, float]]], title: str) -> str:
    """One line per ablation row: overall accuracy / F1 / AUROC, then accuracy per domain."""
    domains = sorted({d for r in rows.values() for d in r if d != OVERALL})
    head = "| row | n | accuracy | macro F1 | AUROC | " + " | ".join(f"{d} acc" for d in domains) + " |"
    lines = [f"# {title}", "", head, "|" + "---|" * (5 + len(domains))]
    for name, r in rows.items():
        o = r[OVERALL]
        per = " | ".join(f"{r[d]['accuracy']:.3f}" if d in r else "-" for d in domains)
        lines.append(f"| {name} | {o['n']} | {o['accuracy']:.3f} | {o['macro_f1']:.3f} | {o['auroc']:.3f} | {per} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class JomedComparison:
    """FT RAG and JOMED answers, JOMED's per-candidate answers, and the consistency analysis."""

    ft_rag: ClosedPredictions
    jomed: ClosedPredictions
    candidate_answers: list[list[str]]
    analysis: dict[str, Any]


def jomed_comparison(
    engine: Any,
    ft_retriever: Any,
    jomed_retriever: Any,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    k: int,
    temperature: float,
    head: str = "text",
    route: bool = True,
) -> JomedComparison:
    """FT RAG vs JOMED's logit fusion vs the oracle (see the module docstring)."""
    labels = references(samples)
    ft = predict_closed(engine, ft_retriever, samples, images, RetrievalConfig(k=k, adaptive="none"), "jomed", route)
    scored = score_candidates(jomed_retriever, engine, samples, images, head, k, route=route)
    if len(scored) != len(samples):
        raise ValueError(f"{len(samples) - len(scored)} samples got no candidate; the index is empty for their domain")
    width = max(len(q.doc_ids) for q in scored)
    cand = np.full((len(scored), width, len(YES_NO)), 0.0)
    weights = np.zeros((len(scored), width))
    for i, q in enumerate(scored):
        n = len(q.doc_ids)
        cand[i, :n] = q.class_probs
        w = np.exp((np.asarray(q.scores) - max(q.scores)) / temperature)
        weights[i, :n] = w / w.sum()
    fused = fuse_candidate_probs(cand, weights)
    jomed = ClosedPredictions(ft.domains, labels, fused[:, 0])
    per_candidate = [[YES_NO[int(np.argmax(p))] for p in q.class_probs] for q in scored]
    analysis = consistency_analysis(
        labels, per_candidate, {"ft_rag": ft.answers, "jomed": jomed.answers}, YES_NO
    ).to_dict()
    return JomedComparison(ft, jomed, per_candidate, analysis)


def jomed_markdown(analysis: Mapping[str, Any], title: str) -> str:
    lines = [f"# {title}", "", "| subset | n | FT RAG acc | FT RAG F1 | JOMED acc | JOMED F1 | oracle acc |",
             "|---|---|---|---|---|---|---|"]
    for subset in ("all", "consistent", "inconsistent"):
        s = analysis[subset]
        m = s["methods"]
        lines.append(
            f"| {subset} | {s['n']} | {m['ft_rag']['accuracy']:.3f} | {m['ft_rag']['macro_f1']:.3f} | "
            f"{m['jomed']['accuracy']:.3f} | {m['jomed']['macro_f1']:.3f} | {s['oracle_accuracy']:.3f} |"
        )
    lines += ["", f"Inconsistent share (JOMED Table 6): {analysis['inconsistent_share']:.3f}."]
    return "\n".join(lines) + "\n"
