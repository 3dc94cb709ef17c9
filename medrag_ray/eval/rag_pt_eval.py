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

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from medrag_ray.data.schema import UNKNOWN_DOMAIN, CorpusDoc, Sample
from medrag_ray.eval.alignment import alignment_report
from medrag_ray.eval.bootstrap import bootstrap_interval, paired_bootstrap
from medrag_ray.eval.classification import classification_report
from medrag_ray.eval.consistency import consistency_analysis
from medrag_ray.eval.diagnostics import (
    CaseTruth,
    finding_kinds,
    kept_distribution,
    oracle_contexts,
    retrieval_quality,
    similarity_curve,
)
from medrag_ray.mining.miner import MiningSettings, PreferenceMiner, outcomes_of
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import SampleContext, contexts_of, reader_input, retrieve_contexts, retrieve_for
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
    kinds: tuple[str | None, ...] = ()
    """Each sample's finding kind (``visible`` / ``subtle``, :func:`~medrag_ray.eval.diagnostics.finding_kinds`);
    empty or None entries where the data has none."""

    @property
    def answers(self) -> list[str]:
        return ["yes" if p >= 0.5 else "no" for p in self.p_yes]

    @property
    def correct(self) -> np.ndarray:
        return np.asarray([a == y for a, y in zip(self.answers, self.labels, strict=True)], dtype=np.float64)

    def kind_indices(self) -> dict[str, list[int]]:
        """``{kind: sample indices}`` over the kinds present, sorted by name."""
        out: dict[str, list[int]] = {}
        for i, kind in enumerate(self.kinds):
            if kind:
                out.setdefault(kind, []).append(i)
        return dict(sorted(out.items()))


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


def _subset(pred: ClosedPredictions, idx: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = closed_metrics([pred.labels[i] for i in idx], pred.p_yes[list(idx)])
    out["accuracy_ci"] = list(bootstrap_interval(pred.correct[list(idx)]))
    return out


def ablation_rows(
    preds: Mapping[str, ClosedPredictions], compare_to: Mapping[str, str] | None = None, seed: int = 0
) -> list[dict[str, Any]]:
    """The rows of an ablation in order, machine-readable: each row's name, n, accuracy (with its 95% bootstrap
    interval), macro F1, AUROC, its metrics per domain and per finding kind, and ``vs_above``: the paired
    bootstrap difference in accuracy (:func:`~medrag_ray.eval.bootstrap.paired_bootstrap`), overall and per
    kind, to the row above -- or to the row ``compare_to[name]`` names (a row of ``preds``)."""
    rows: list[dict[str, Any]] = []
    previous: tuple[str, ClosedPredictions] | None = None
    for name, pred in preds.items():
        if compare_to and name in compare_to:
            if compare_to[name] not in preds:
                raise ValueError(f"row {name!r} is compared to {compare_to[name]!r}, which is not a row")
            previous = (compare_to[name], preds[compare_to[name]])
        overall = _subset(pred, range(len(pred.labels)))
        by_domain = {d: m for d, m in grouped_metrics(pred).items() if d != OVERALL}
        kinds = pred.kind_indices()
        row: dict[str, Any] = {"name": name, **overall, "by_domain": by_domain,
                               "by_kind": {k: _subset(pred, idx) for k, idx in kinds.items()}, "vs_above": None}
        if previous is not None:
            above_name, above = previous
            if above.labels != pred.labels:
                raise ValueError(f"rows {above_name!r} and {name!r} are not on the same questions; cannot pair them")
            a, b = pred.correct, above.correct
            row["vs_above"] = {
                "row": above_name,
                **paired_bootstrap(a, b, seed=seed).to_dict(),
                "by_kind": {k: paired_bootstrap(a[idx], b[idx], seed=seed).to_dict() for k, idx in kinds.items()},
            }
        rows.append(row)
        previous = (name, pred)
    return rows


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
    contexts = None
    if retrieval is not None:
        contexts = retrieve_contexts(retriever, samples, images, retrieval, route=route, with_images=style == "jomed")
    return predict_with_contexts(engine, samples, images, contexts, style)


def predict_with_contexts(
    engine: Any,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    contexts: Sequence[SampleContext] | None,
    style: str = "mmed",
) -> ClosedPredictions:
    """p(yes) of the reader with the given context per sample (None: no retrieval)."""
    labels = references(samples)
    per_sample = contexts if contexts is not None else [None] * len(samples)
    inputs = [reader_input(s, im, c, style) for s, im, c in zip(samples, images, per_sample, strict=True)]
    probs = engine.score_closed(inputs, YES_NO).probs
    return ClosedPredictions(tuple(s.domain for s in samples), labels, np.asarray(probs[:, 0], dtype=np.float64),
                             finding_kinds(samples))


def alignment_rates(
    engine: Any, retriever: Any, samples: Sequence[Sample], settings: MiningSettings
) -> dict[str, Any]:
    """CR / OR rates (and per-pass accuracies) of a reader on ``samples`` from the mining passes."""
    outcomes = PreferenceMiner(retriever, engine, settings).mine_batch(samples).outcomes
    return alignment_report(outcomes_of(outcomes))


def _difference(d: Mapping[str, Any] | None, above: str | None = None) -> str:
    if d is None:
        return "-"
    text = f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    return text if "row" not in d or d["row"] == above else f"{text} vs {d['row']}"


def ablation_markdown(rows: Sequence[Mapping[str, Any]], title: str, level: int = 1) -> str:
    """One line per :func:`ablation_rows` row under a ``level`` heading: overall accuracy / F1 / AUROC with the paired
    difference to the row above (95% CI), accuracy per finding kind with its difference, then accuracy per domain."""
    domains = sorted({d for r in rows for d in r["by_domain"]})
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    head = ["row", "n", "accuracy", "Δ vs row above [95% CI]", "macro F1", "AUROC"]
    for k in kinds:
        head += [f"{k} acc", f"{k} Δ [95% CI]"]
    head += [f"{d} acc" for d in domains]
    lines = [f"{'#' * level} {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    previous = None
    for r in rows:
        above = r["vs_above"]
        cells = [r["name"], str(r["n"]), f"{r['accuracy']:.3f}", _difference(above, previous), f"{r['macro_f1']:.3f}",
                 f"{r['auroc']:.3f}"]
        for k in kinds:
            m = r["by_kind"].get(k)
            cells += [f"{m['accuracy']:.3f} (n={m['n']})" if m else "-",
                      _difference(above["by_kind"].get(k) if above else None)]
        cells += [f"{r['by_domain'][d]['accuracy']:.3f}" if d in r["by_domain"] else "-" for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
        previous = r["name"]
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
    """FT RAG vs JOMED's logit fusion vs the oracle (see the module docstring), on the samples that get candidates:
    an image routed to no indexed domain ("unknown") has none to compare; ``analysis["n_no_candidate"]`` counts them."""
    scored = score_candidates(jomed_retriever, engine, samples, images, head, k, route=route)
    with_candidates = {q.sample_id for q in scored}
    keep = [i for i, s in enumerate(samples) if s.id in with_candidates]
    if not keep:
        raise ValueError(f"none of {len(samples)} samples got a candidate: the router placed every image in no "
                         "indexed domain, or the indexes are empty; check the router and the index")
    n_asked = len(samples)
    samples, images = [samples[i] for i in keep], [images[i] for i in keep]
    labels = references(samples)
    ft = predict_closed(engine, ft_retriever, samples, images, RetrievalConfig(k=k, adaptive="none"), "jomed", route)
    width = max(len(q.doc_ids) for q in scored)
    cand = np.full((len(scored), width, len(YES_NO)), 0.0)
    weights = np.zeros((len(scored), width))
    for i, q in enumerate(scored):
        n = len(q.doc_ids)
        cand[i, :n] = q.class_probs
        w = np.exp((np.asarray(q.scores) - max(q.scores)) / temperature)
        weights[i, :n] = w / w.sum()
    fused = fuse_candidate_probs(cand, weights)
    jomed = ClosedPredictions(ft.domains, labels, fused[:, 0], ft.kinds)
    per_candidate = [[YES_NO[int(np.argmax(p))] for p in q.class_probs] for q in scored]
    analysis = consistency_analysis(
        labels, per_candidate, {"ft_rag": ft.answers, "jomed": jomed.answers}, YES_NO
    ).to_dict()
    analysis["n_no_candidate"] = n_asked - len(keep)
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
    for head, kl in analysis.get("distillation", {}).items():
        lines.append(f"Distillation, {head} head: validation Sharp Perplexity KL {kl['before']:.4f} before training, "
                     f"{kl['after']:.4f} after ({kl['after'] - kl['before']:+.4f}).")
    if analysis.get("n_no_candidate"):
        lines.append(f"{analysis['n_no_candidate']} questions are left out: the router placed their image in no "
                     "indexed domain, so there is no candidate to fuse.")
    return "\n".join(lines) + "\n"


def distillation_kl(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per distilled head, the validation KL before and after training, from ``jobs/distill_retriever.py``'s
    ``metrics.json`` (heads without a recorded ``initial`` validation are left out)."""
    out = {}
    for head, run in metrics.get("runs", {}).items():
        if "val_kl" in run.get("initial", {}) and "val_kl" in run.get("final", {}):
            out[head] = {"before": float(run["initial"]["val_kl"]), "after": float(run["final"]["val_kl"])}
    return out


@dataclass(frozen=True)
class GroundTruth:
    """Per-case truth and the corpus it indexes (synthetic data): enables the diagnostics rows."""

    cases: Mapping[str, CaseTruth]
    corpus: Sequence[CorpusDoc]


NO_RETRIEVAL = "reader, no retrieval"


def closed_ablation(
    sft: Any,
    stage_engines: Sequence[Any],
    retriever: Any,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    adaptive: RetrievalConfig,
    fixed_k: int,
    style: str = "mmed",
    route: bool = True,
    truth: GroundTruth | None = None,
) -> dict[str, Any]:
    """The ablation of MMed-RAG Table 2's shape and the diagnostics that tell which stage fails.

    ``rows`` (each with the paired difference to the row above): the SFT reader without retrieval, with a fixed
    k, with adaptive-k (``adaptive``'s rule), then each RAG-PT stage's reader with adaptive-k.
    ``diagnostics`` (each against the row it names): the reference code's ratio rule against the fixed k, and,
    with ``truth``, the SFT reader with oracle context (k reports of the query's phenotype) against no retrieval.
    ``retrieval``: with ``truth``, :func:`~medrag_ray.eval.diagnostics.retrieval_quality` per head (text / image)
    at the fixed k and for the adaptive rule; ``adaptive_k``: kept-count distributions and Fig. 2's curve."""
    fixed = dataclasses.replace(adaptive, k=max(adaptive.k, fixed_k), k_max=fixed_k, adaptive="none")
    ratio = dataclasses.replace(adaptive, adaptive="ratio")
    with_images = style == "jomed"

    def retrieve(cfg: RetrievalConfig) -> list[Any]:
        return retrieve_for(retriever, samples, images, cfg, route=route)

    results = {"fixed": retrieve(fixed), adaptive.adaptive: retrieve(adaptive), "ratio": retrieve(ratio)}
    contexts = {name: contexts_of(r, with_images=with_images) for name, r in results.items()}

    def predict(engine: Any, ctx: Sequence[SampleContext] | None) -> ClosedPredictions:
        return predict_with_contexts(engine, samples, images, ctx, style)

    fixed_name, adaptive_name = f"+ retrieval (fixed k={fixed_k})", f"+ adaptive-k ({adaptive.adaptive})"
    preds = {NO_RETRIEVAL: predict(sft, None), fixed_name: predict(sft, contexts["fixed"]),
             adaptive_name: predict(sft, contexts[adaptive.adaptive])}
    for i, engine in enumerate(stage_engines, start=1):
        preds[f"+ RAG-PT stage {i}"] = predict(engine, contexts[adaptive.adaptive])
    ratio_name = f"adaptive-k (ratio, tau={ratio.tau:g}; reference code)"
    diagnostic = {fixed_name: preds[fixed_name], ratio_name: predict(sft, contexts["ratio"])}
    compare = {ratio_name: fixed_name}
    quality: dict[str, Any] = {}
    if truth is not None:
        oracle_name = f"reader, oracle context ({fixed_k} reports of the query's phenotype)"
        oracle = oracle_contexts(samples, truth.corpus, truth.cases, fixed_k)
        diagnostic.update({NO_RETRIEVAL: preds[NO_RETRIEVAL], oracle_name: predict(sft, oracle)})
        compare[oracle_name] = NO_RETRIEVAL
        image_head = retrieve(dataclasses.replace(fixed, mode="image"))
        quality = {
            f"{fixed.mode} head, fixed k={fixed_k}": retrieval_quality(samples, results["fixed"], truth.cases),
            f"{fixed.mode} head, {adaptive.adaptive}": retrieval_quality(samples, results[adaptive.adaptive],
                                                                          truth.cases),
            f"image head, fixed k={fixed_k}": retrieval_quality(samples, image_head, truth.cases),
        }
    return {
        "routed_unknown": sum(r.domain == UNKNOWN_DOMAIN for r in results["fixed"]),
        "rows": ablation_rows(preds),
        "diagnostics": ablation_rows(diagnostic, compare_to=compare),
        "retrieval": quality,
        "adaptive_k": {
            "kept": {adaptive.adaptive: kept_distribution(contexts[adaptive.adaptive]),
                     "ratio": kept_distribution(contexts["ratio"])},
            "similarity_curve": similarity_curve(results[adaptive.adaptive]),
            "top_k": adaptive.k,
            "fixed_k": fixed_k,
            "rule": adaptive.adaptive,
        },
    }


def retrieval_markdown(quality: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """One line per (head, domain): phenotype precision of the kept documents, mean kept, majority-of-reports
    accuracy on subtle questions."""
    if not quality:
        return ""
    lines = ["", "Retrieval that matters for answers (no reader: the kept reports' majority answers subtle "
             "questions)", "", "| retrieval | domain | n | phenotype precision | mean kept | majority acc "
             "(subtle) | n subtle |", "|---|---|---|---|---|---|---|"]
    for head, per in quality.items():
        for domain, q in per.items():
            lines.append(f"| {head} | {domain} | {q['n']} | {q['phenotype_precision']:.3f} | {q['mean_kept']:.2f} "
                         f"| {q['majority_accuracy_subtle']:.3f} | {q['n_subtle']} |")
    return "\n".join(lines) + "\n"
