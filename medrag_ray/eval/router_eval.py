"""Domain-router evaluation on labelled samples (``jobs/eval_router.py``): MMed-RAG's F(x_v) accuracy.

The classification report (accuracy, per-domain precision / recall / F1, confusion matrix) is computed
over the examples whose true domain the router knows, with the router's domains as the labels. Examples
of a domain the router was not trained on (e.g. dermatology for a three-domain router) cannot be right;
they are counted separately, with what the router routed them to, instead of being forced into the
matrix. Accuracy is also broken down by ``source`` (VQA-RAD, MedPix, PneumoniaMNIST, ... on the
real-data routing set).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import UNKNOWN_DOMAIN, Sample
from medrag_ray.eval.calibration import confidence_ece
from medrag_ray.eval.classification import classification_report

logger = logging.getLogger(__name__)


class Router(Protocol):
    """What the evaluation needs of a router (``medrag_ray.models.router.DomainRouter`` has it)."""

    domains: tuple[str, ...]

    def predict(self, images: Sequence[Image.Image], batch_size: int = 64) -> list[tuple[str, float]]: ...


def has_image(sample: Sample) -> bool:
    return sample.image_bytes is not None or (sample.image_available and bool(sample.image_path))


def sample_image(sample: Sample) -> Image.Image:
    """The sample's image as RGB (inline bytes first, else its file)."""
    if sample.image_bytes is not None:
        return load_image(sample.image_bytes, name=sample.id)
    return load_image(sample.image_path)


def route_samples(router: Router, samples: Sequence[Sample], batch_size: int = 64) -> list[tuple[str, float]]:
    """``(predicted domain, confidence)`` per sample; images are decoded one batch at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[tuple[str, float]] = []
    for start in tqdm(range(0, len(samples), batch_size), desc="route", unit="batch", leave=False):
        batch = [sample_image(s) for s in samples[start : start + batch_size]]
        out.extend(router.predict(batch, batch_size=len(batch)))
    return out


def router_report(
    samples: Sequence[Sample], predictions: Sequence[tuple[str, float]], router_domains: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, per-domain report and confusion over known domains; per-source and unknown-domain counts."""
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions; pass one per sample")
    if not samples:
        raise ValueError("router_report got no samples")
    domains = tuple(router_domains)
    known = [i for i, s in enumerate(samples) if s.domain in domains]
    predicted = [predictions[i][0] for i in known]
    labels = (*domains, UNKNOWN_DOMAIN) if UNKNOWN_DOMAIN in predicted else domains
    report = (
        classification_report([samples[i].domain for i in known], predicted, labels=labels).to_dict()
        if known
        else None
    )
    per_source: dict[str, dict[str, Any]] = {}
    for s, (pred, conf) in zip(samples, predictions, strict=True):
        entry = per_source.setdefault(
            s.source, {"domains": Counter(), "n": 0, "correct": 0, "predicted": Counter(), "confidence": []}
        )
        entry["domains"][s.domain] += 1
        entry["n"] += 1
        entry["correct"] += pred == s.domain
        entry["predicted"][pred] += 1
        entry["confidence"].append(conf)
    unknown: dict[str, dict[str, Any]] = {}
    for s, (pred, _) in zip(samples, predictions, strict=True):
        if s.domain not in domains:
            u = unknown.setdefault(s.domain, {"n": 0, "predicted": Counter(), "sources": Counter()})
            u["n"] += 1
            u["predicted"][pred] += 1
            u["sources"][s.source] += 1
    confidences = np.array([c for _, c in predictions], dtype=np.float64)
    right = np.array([samples[i].domain == predictions[i][0] for i in range(len(samples))])
    routed_unknown = np.array([p == UNKNOWN_DOMAIN for p, _ in predictions])
    known_mask = np.array([s.domain in domains for s in samples])
    return {
        "router_domains": list(domains),
        "n_total": len(samples),
        "n_evaluated": len(known),
        "n_unknown_domain": len(samples) - len(known),
        "accuracy": report["accuracy"] if report else None,
        "macro_f1": report["macro_f1"] if report else None,
        "report": report,
        "per_source": {
            src: {
                "domains": dict(sorted(e["domains"].items())),
                "n": e["n"],
                "n_known_domain": sum(n for d, n in e["domains"].items() if d in domains),
                "correct": e["correct"],
                "accuracy": _known_accuracy(e, domains),
                "predicted": dict(sorted(e["predicted"].items())),
                "mean_confidence": round(float(np.mean(e["confidence"])), 6),
            }
            for src, e in sorted(per_source.items())
        },
        "unknown_domains": {
            d: {"n": u["n"], "predicted": dict(sorted(u["predicted"].items())), "sources": dict(u["sources"])}
            for d, u in sorted(unknown.items())
        },
        "mean_confidence": {
            "correct": round(float(confidences[right].mean()), 6) if right.any() else None,
            "wrong": round(float(confidences[~right].mean()), 6) if (~right).any() else None,
        },
        "ece": round(confidence_ece(confidences[known_mask], right[known_mask]), 6) if known_mask.any() else None,
        "routed_unknown": {
            "known_domains": _share(routed_unknown[known_mask]),
            "unknown_domains": _share(routed_unknown[~known_mask]),
        },
    }


def _share(flags: np.ndarray) -> dict[str, Any]:
    return {"n": int(len(flags)), "routed_unknown": int(flags.sum()),
            "rate": round(float(flags.mean()), 6) if len(flags) else None}


def _known_accuracy(entry: Mapping[str, Any], domains: Sequence[str]) -> float | None:
    """Accuracy over the source's examples of known domains (None when it has none)."""
    n_known = sum(n for d, n in entry["domains"].items() if d in domains)
    return round(entry["correct"] / n_known, 6) if n_known else None


def unknown_domain_lines(result: Mapping[str, Any]) -> list[str]:
    """One log line per domain the router does not know (empty when there is none)."""
    return [
        f"{u['n']} examples of domain {d!r} (sources {u['sources']}) are not among the router's domains "
        f"{result['router_domains']}; left out of accuracy and the confusion matrix, routed to {u['predicted']}"
        for d, u in result["unknown_domains"].items()
    ]


def router_markdown(result: Mapping[str, Any], title: str) -> str:
    """Per-domain table, confusion matrix, per-source accuracy and unknown domains as markdown."""
    lines = [f"# {title}", ""]
    rep = result["report"]
    if rep is None:
        lines.append("No example of a domain the router knows.")
    else:
        lines += [
            f"Accuracy **{rep['accuracy']:.3f}** over {rep['n']} examples of the router's domains "
            f"{result['router_domains']}; macro F1 {rep['macro_f1']:.3f}.",
            "",
            "| domain | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for d, m in rep["per_class"].items():
            lines.append(f"| {d} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
        labels = rep["confusion"]["labels"]
        lines += ["", "Confusion (rows: truth, columns: predicted)", "", "| truth | " + " | ".join(labels) + " |"]
        lines.append("|" + "---|" * (len(labels) + 1))
        for d, row in zip(labels, rep["confusion"]["rows_truth_cols_predicted"], strict=True):
            lines.append(f"| {d} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "| source | domain(s) | n | accuracy | predicted | mean confidence |", "|---|---|---|---|---|---|"]
    for src, e in result["per_source"].items():
        acc = "n/a (unknown domain)" if e["accuracy"] is None else f"{e['accuracy']:.3f}"
        doms = ", ".join(e["domains"])
        predicted = ", ".join(f"{d} {n}" for d, n in e["predicted"].items())
        lines.append(f"| {src} | {doms} | {e['n']} | {acc} | {predicted} | {e['mean_confidence']:.3f} |")
    unknown = unknown_domain_lines(result)
    if unknown:
        lines += ["", *(f"- {line}" for line in unknown)]
    known, other = result["routed_unknown"]["known_domains"], result["routed_unknown"]["unknown_domains"]
    lines += ["", f"Routed to 'unknown': {known['routed_unknown']} of {known['n']} images of the router's domains"
              + (f", {other['routed_unknown']} of {other['n']} images of other domains" if other["n"] else "")
              + (f". Expected calibration error {result['ece']:.4f}." if result["ece"] is not None else ".")]
    return "\n".join(lines) + "\n"
