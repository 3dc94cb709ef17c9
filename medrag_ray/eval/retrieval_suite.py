"""Image->text retrieval evaluation of named encoders over eval sets, per domain (``jobs/eval_retrieval.py``).

* **Eval sets** (:class:`PairSet`: one domain's (image, text) pairs):
  ``synthetic`` -- the synthetic test split's ``answer_type == "report"`` rows (one per case: the case
  image and its report), one set per domain; ``medpix`` -- MedPix 2.0 test images and their captions
  (radiology; ``descriptions_test.jsonl``).
* **Encoders**: a name and a directory that is either one dual encoder used for every domain (a
  ``save_dual_encoder`` dir or a real open_clip checkpoint: ``open_clip_config.json``), or a directory
  of per-domain retrievers R_d (``<dir>/<domain>/`` dual-encoder dirs: MMed-RAG's layout), of which the
  eval set's domain is picked. A missing directory, or a per-domain directory lacking the domain, is
  skipped with the reason (and for a known name, the command that builds it), not an error.
* **Metric**: :func:`medrag_ray.eval.retrieval.image_to_text_recall` (gallery = the set's distinct texts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from medrag_ray.data.readers.medpix import iter_medpix
from medrag_ray.data.schema import DOMAINS
from medrag_ray.eval.retrieval import DEFAULT_KS, TEXT_DEDUPE_RULE, TIE_RULE, ImageTextEncoder, image_to_text_recall

logger = logging.getLogger(__name__)

DUAL_ENCODER_MARKER = "open_clip_config.json"
BUILD_HINTS: dict[str, str] = {
    "trained": "train the per-domain retrievers with `python jobs/train_retriever.py`",
    "untrained": "build the initial models with `python jobs/pipeline.py` (step prepare_models)",
    "domain_agnostic": "train the single domain-agnostic retriever with "
    "`python jobs/train_retriever.py domain_agnostic=true out_dir=artifacts/models/retriever_all`",
}
"""How to build the default encoders of ``jobs/configs/eval_retrieval.yaml`` (named in skip warnings)."""

EncoderLayout = Literal["single", "per_domain", "missing", "unknown"]


@dataclass(frozen=True)
class PairSet:
    """One eval set's (image, text) pairs of one domain."""

    name: str
    domain: str
    ids: tuple[str, ...]
    images: tuple[bytes | str, ...]
    """Encoded image bytes or image file paths (decoded in batches by the metric)."""
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not (len(self.ids) == len(self.images) == len(self.texts)) or not self.ids:
            raise ValueError(
                f"pair set {self.name}/{self.domain}: needs as many ids, images and texts (> 0), got "
                f"{len(self.ids)}, {len(self.images)}, {len(self.texts)}"
            )
        if self.domain not in DOMAINS:
            raise ValueError(f"pair set {self.name}: domain {self.domain!r} is not one of {list(DOMAINS)}")


def synthetic_pair_sets(samples_path: str | Path) -> list[PairSet]:
    """Per-domain (image, report) pairs from a samples Parquet: its ``answer_type == "report"`` rows."""
    path = Path(samples_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; generate the synthetic dataset with `python jobs/make_data.py`")
    columns = ["id", "domain", "answer_type", "text", "image_bytes", "image_path", "image_available"]
    table = pq.read_table(path, columns=columns).to_pylist()
    by_domain: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    for row in table:
        if row["answer_type"] != "report":
            continue
        image = row["image_bytes"] if row["image_bytes"] is not None else row["image_path"]
        if not image or (row["image_bytes"] is None and not row["image_available"]) or not row["text"].strip():
            skipped += 1
            continue
        by_domain.setdefault(row["domain"], []).append({**row, "image": image})
    if skipped:
        logger.warning("%s: skipped %d report rows without an image or a text", path, skipped)
    if not by_domain:
        raise ValueError(f"{path} has no answer_type='report' rows with an image; pass a synthetic samples file")
    return [
        PairSet(
            "synthetic",
            domain,
            tuple(r["id"] for r in rows),
            tuple(r["image"] for r in rows),
            tuple(r["text"] for r in rows),
        )
        for domain, rows in sorted(by_domain.items(), key=lambda kv: DOMAINS.index(kv[0]))
    ]


def medpix_pair_set(medpix_dir: str | Path) -> PairSet:
    """MedPix 2.0 test images with their captions (radiology); images missing on disk are left out."""
    pairs = [s for s in iter_medpix(medpix_dir, check_images=False) if s.image_available]
    if not pairs:
        raise FileNotFoundError(f"{medpix_dir}: no MedPix image with its file found; check descriptions_*.jsonl/images")
    return PairSet(
        "medpix",
        "radiology",
        tuple(s.id for s in pairs),
        tuple(s.image_path for s in pairs),
        tuple(s.text for s in pairs),
    )


# ------------------------------------------------------------------------------------------- encoders


def encoder_layout(path: str | Path) -> EncoderLayout:
    """``single`` (one dual encoder), ``per_domain`` (``<domain>/`` dual encoders), ``missing`` or ``unknown``."""
    p = Path(path)
    if not p.is_dir():
        return "missing"
    if (p / DUAL_ENCODER_MARKER).is_file():
        return "single"
    if any((p / d / DUAL_ENCODER_MARKER).is_file() for d in DOMAINS):
        return "per_domain"
    return "unknown"


def encoder_dir_for(path: str | Path, domain: str) -> Path | None:
    """The dual-encoder dir that evaluates ``domain``: ``path`` itself, ``path/<domain>``, or None."""
    layout = encoder_layout(path)
    if layout == "single":
        return Path(path)
    if layout == "per_domain" and (Path(path) / domain / DUAL_ENCODER_MARKER).is_file():
        return Path(path) / domain
    return None


def skip_reason(name: str, path: str | Path, domain: str) -> str:
    """Why encoder ``name`` at ``path`` cannot evaluate ``domain`` (empty when it can)."""
    layout = encoder_layout(path)
    hint = BUILD_HINTS.get(name, f"point encoders.{name} at an existing directory")
    if layout == "missing":
        return f"{path} does not exist; {hint}"
    if layout == "unknown":
        return (
            f"{path} is neither a dual-encoder dir ({DUAL_ENCODER_MARKER}) nor a dir of <domain>/ dual encoders; "
            f"{hint}"
        )
    if encoder_dir_for(path, domain) is None:
        have = [d for d in DOMAINS if (Path(path) / d / DUAL_ENCODER_MARKER).is_file()]
        return f"{path} has per-domain retrievers for {have} but none for {domain}"
    return ""


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_retrieval(
    encoders: Mapping[str, str],
    pair_sets: Sequence[PairSet],
    load_encoder: Callable[[Path], ImageTextEncoder],
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Recall@k of every (encoder, pair set) that can be evaluated; the rest listed under ``skipped``.

    ``load_encoder(dir)`` loads one dual encoder (called once per directory). Result: ``ks``, the rules,
    ``encoders`` (path and layout), ``results`` (one row per eval set x domain x encoder, in that order)
    and ``skipped`` (encoder, eval set, domain, reason).
    """
    loaded: dict[Path, ImageTextEncoder] = {}
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for ps in pair_sets:
        for name, path in encoders.items():
            reason = skip_reason(name, path, ps.domain)
            if reason:
                logger.warning("skipping encoder %r on %s/%s: %s", name, ps.name, ps.domain, reason)
                skipped.append({"encoder": name, "eval_set": ps.name, "domain": ps.domain, "reason": reason})
                continue
            enc_dir = encoder_dir_for(path, ps.domain)
            if enc_dir is None:  # pragma: no cover - skip_reason is empty exactly when there is a directory
                raise RuntimeError(f"encoder {name!r}: no directory for {ps.domain} at {path}")
            key = enc_dir.resolve()
            if key not in loaded:
                loaded[key] = load_encoder(enc_dir)
            metrics = image_to_text_recall(loaded[key], ps.images, ps.texts, ps.ids, ks, batch_size)
            for rule in ("dedupe_rule", "tie_rule"):
                metrics.pop(rule)
            row = {"eval_set": ps.name, "domain": ps.domain, "encoder": name, "encoder_dir": str(enc_dir), **metrics}
            logger.info(
                "%s/%s %s: %s (chance %s) over %d images, %d distinct texts",
                ps.name, ps.domain, name,
                " ".join(f"R@{k}={metrics['recall'][str(k)]:.3f}" for k in ks),
                " ".join(f"{metrics['chance'][str(k)]:.3f}" for k in ks),
                metrics["n_queries"], metrics["n_gallery"],
            )  # fmt: skip
            results.append(row)
    return {
        "ks": list(ks),
        "dedupe_rule": TEXT_DEDUPE_RULE,
        "tie_rule": TIE_RULE,
        "encoders": {name: {"path": str(path), "layout": encoder_layout(path)} for name, path in encoders.items()},
        "eval_sets": {f"{ps.name}/{ps.domain}": len(ps.ids) for ps in pair_sets},
        "results": results,
        "skipped": skipped,
    }


def retrieval_markdown(result: Mapping[str, Any]) -> str:
    """The result as a markdown table (one row per eval set x domain x encoder), skips listed below it."""
    ks = result["ks"]
    head = ["eval set", "domain", "encoder", "images", "texts", *(f"R@{k}" for k in ks)]
    head += [*(f"chance@{k}" for k in ks), "MRR", "median rank"]
    lines = [
        "# Image->text retrieval recall",
        "",
        f"Gallery: {result['dedupe_rule']}. Ties: {result['tie_rule']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in result["results"]:
        cells = [r["eval_set"], r["domain"], r["encoder"], str(r["n_queries"]), str(r["n_gallery"])]
        cells += [f"{r['recall'][str(k)]:.3f}" for k in ks]
        cells += [f"{r['chance'][str(k)]:.3f}" for k in ks]
        cells += [f"{r['mrr']:.3f}", f"{r['median_rank']:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    if result["skipped"]:
        lines += ["", "Skipped:", ""]
        lines += [f"- {s['encoder']} on {s['eval_set']}/{s['domain']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"

