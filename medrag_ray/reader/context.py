"""Retrieved context for reader samples: route -> retrieve -> adaptive-k, then the reader's input.

:func:`retrieve_contexts` runs a :class:`~medrag_ray.retrieval.retriever.MultimodalRetriever` over samples and
keeps, per sample, the kept hits (texts, ids, scores and the hits' images for JOMED) as a
:class:`SampleContext`. A sample's own case report is in the corpus when the sample comes from the train
split (the corpus *is* the train split's reports): :func:`self_doc_ids` names it so retrieval skips it --
retrieving a sample's own report would teach the reader to copy and inflate every "retrieval helps" count.

:func:`reader_input` builds the prompt of a sample in either style (``mmed``: reports numbered in the prompt;
``jomed``: (image, text) pairs prepended), with or without the retrieved context.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import RecordError, Sample
from medrag_ray.reader.answers import YES_NO
from medrag_ray.reader.prompts import (
    ReaderInput,
    closed_rag_prompt,
    jomed_input,
    open_prompt,
    report_prompt,
    single_image_input,
)
from medrag_ray.retrieval.retrieval_config import RetrievalConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleContext:
    """The kept retrieval of one sample (what goes into its prompt) and how it was obtained."""

    domain: str
    domain_confidence: float | None
    doc_ids: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    images: tuple[bytes | None, ...] = field(default=(), repr=False)

    def to_meta(self) -> dict[str, object]:
        """What pair records keep: routed domain, confidence, ids and scores (texts are in the prompt)."""
        return {
            "routed_domain": self.domain,
            "domain_confidence": None if self.domain_confidence is None else round(float(self.domain_confidence), 6),
            "retrieved_ids": list(self.doc_ids),
            "retrieved_scores": [round(s, 6) for s in self.scores],
        }


def missing_reader_inputs(cfg: Any) -> list[str]:
    """``field=path`` for each input of a reader job (``samples_path``, ``reader_dir``, ``context.router_dir``,
    ``context.index_dir`` of ``cfg``) that does not exist; empty when all do."""
    paths = {
        "samples_path": cfg.samples_path,
        "reader_dir": cfg.reader_dir,
        "context.router_dir": cfg.context.router_dir,
        "context.index_dir": cfg.context.index_dir,
    }
    return [f"{name}={path}" for name, path in paths.items() if not Path(path).exists()]


def self_doc_ids(sample: Sample) -> set[str]:
    """Corpus ids that are the sample's own case: its id and its ``meta.case_id`` when present."""
    ids = {sample.id}
    case_id = json.loads(sample.meta).get("case_id")
    if isinstance(case_id, str) and case_id:
        ids.add(case_id)
    return ids


def sample_image(sample: Sample) -> Image.Image:
    """The sample's image (inline bytes or path), decoded; a RecordError names the sample when unreadable."""
    if sample.image_bytes is not None:
        return load_image(sample.image_bytes, name=f"sample {sample.id}")
    if sample.image_path:
        return load_image(sample.image_path, name=f"sample {sample.id} ({sample.image_path})")
    raise RecordError("image_bytes", "the sample has neither image_bytes nor image_path", source=sample.id)


def decodable_samples(samples: Sequence[Sample], undecodable: list[str]) -> tuple[list[Sample], list[Image.Image]]:
    """The samples whose image decodes, with their images; the others' ids are appended to ``undecodable``."""
    kept, images = [], []
    for s in samples:
        try:
            images.append(sample_image(s))
        except RecordError as exc:
            logger.warning("skipping sample %s: its image cannot be decoded (%s)", s.id, exc)
            undecodable.append(s.id)
            continue
        kept.append(s)
    return kept, images


def retrieve_contexts(
    retriever: object,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    cfg: RetrievalConfig,
    *,
    route: bool = True,
    with_images: bool = False,
) -> list[SampleContext]:
    """Kept retrieval per sample; ``route=False`` uses each sample's labelled domain instead of the router."""
    return contexts_of(retrieve_for(retriever, samples, images, cfg, route=route), with_images=with_images)


def retrieve_for(
    retriever: object,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    cfg: RetrievalConfig,
    *,
    route: bool = True,
) -> list[Any]:
    """The retriever's results (every top-k hit, kept or not) per sample, each sample's own case excluded."""
    domains = None if route else [s.domain for s in samples]
    return retriever.retrieve(  # type: ignore[attr-defined]
        list(images),
        [s.question or None for s in samples],
        domains=domains,
        cfg=cfg,
        exclude_ids=[self_doc_ids(s) for s in samples],
    )


def contexts_of(results: Sequence[Any], *, with_images: bool = False) -> list[SampleContext]:
    """The kept hits of each retrieval result as the reader's context."""
    out = []
    for result in results:
        kept = result.kept_hits
        out.append(
            SampleContext(
                domain=result.domain,
                domain_confidence=result.domain_confidence,
                doc_ids=tuple(h.doc_id for h in kept),
                texts=tuple(h.text for h in kept),
                scores=tuple(float(h.score) for h in kept),
                images=tuple(h.image_bytes for h in kept) if with_images else (),
            )
        )
    return out


def prompt_text(sample: Sample, reports: Sequence[str], domain: str, choices: Sequence[str] = YES_NO) -> str:
    """The prompt of a sample for its answer type, with ``reports`` as references (none: no retrieval)."""
    if sample.answer_type == "closed":
        return closed_rag_prompt(sample.question, reports, domain, choices)
    if sample.answer_type == "report":
        return report_prompt(reports)
    if sample.answer_type == "open":
        return open_prompt(sample.question, reports)
    raise ValueError(
        f"sample {sample.id}: answer_type {sample.answer_type!r} has no reader prompt; use closed, open or report"
    )


def reader_input(
    sample: Sample,
    image: Image.Image,
    context: SampleContext | None,
    style: str = "mmed",
    choices: Sequence[str] = YES_NO,
) -> ReaderInput:
    """M(x, x_t) when ``context`` is None, else M(x, x_t + x_r) in ``style`` (``image`` may be x_v or x_v*)."""
    if context is None or not context.texts:
        domain = context.domain if context is not None else sample.domain
        return single_image_input(image, prompt_text(sample, (), domain, choices))
    if style == "mmed":
        return single_image_input(image, prompt_text(sample, context.texts, context.domain, choices))
    if style == "jomed":
        if len(context.images) != len(context.texts) or any(b is None for b in context.images):
            raise ValueError(
                f"sample {sample.id}: style=jomed needs every retrieved document's image; retrieve with "
                "with_images=True from an index store that keeps inline images"
            )
        pairs = [
            (load_image(b, name=f"doc {d}"), t)
            for b, d, t in zip(context.images, context.doc_ids, context.texts, strict=True)
        ]
        return jomed_input(image, prompt_text(sample, (), context.domain, choices), pairs)
    raise ValueError(f"style must be 'mmed' or 'jomed', got {style!r}")
