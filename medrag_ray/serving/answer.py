"""Answering one question about one image: route -> retrieve -> read (DESIGN.md features 8, 11, 14).

The three steps are separate so Ray Serve can run each as its own autoscaling deployment (``serve/``):

* **route** -- :func:`~medrag_ray.retrieval.retriever.route_images`: F(x_v) among the indexed domains, or
  ``"unknown"`` (no retrieval: the reader answers from the image alone) when it cannot place the image.
* **retrieve** -- :class:`EvidenceRetriever`: the domain's top-k and adaptive-k (``fusion=concat``), or the K
  candidates of JOMED's distilled text head with their weights p_R = softmax(s / tau) (``fusion=jomed``).
* **read** -- :func:`plan_read` builds the reader inputs of one request, :func:`run_plans` runs the plans of many
  requests in as few batched reader passes as possible, :func:`finish_read` turns the outputs into the answer.

:class:`LocalAnswerer` chains the same steps in one process (the baseline the Serve app is measured against, and
what the tests drive). Decisions:

* ``fusion=concat``: the kept documents go into one prompt (``style`` as the reader was trained). For closed
  questions each kept document is also scored alone in the same batch; the answer is **inconsistent** when those
  single-document answers disagree (JOMED's consistency notion), flagged in the response.
* ``fusion=jomed``: each of the K candidates (image and text) is prepended alone; the answer is JOMED's
  p(a|q) = sum_k p(a | (i_k, t_k) o q) p_R(k|q); every candidate is "kept" and carries its weight.
* IFA (MR-RAG) biases question <- document attention in the configured critical layers by the documents'
  min-max normalized retrieval scores; for a report (no question) the report instruction plays the question.
* A prompt longer than the reader's position budget is refused (422 naming ``k``), never truncated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medrag_ray.config import ServeConfig
from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import UNKNOWN_DOMAIN
from medrag_ray.models.tokenizer import AnswerTokenError
from medrag_ray.reader.prompts import (
    ReaderInput,
    closed_prompt,
    closed_rag_prompt,
    jomed_input,
    open_prompt,
    report_prompt,
    single_image_input,
)
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.serving.images import InputError, decode_image
from medrag_ray.serving.query import AnswerQuery

logger = logging.getLogger(__name__)

__all__ = [
    "Evidence",
    "EvidenceRetriever",
    "LocalAnswerer",
    "ReadPlan",
    "ReaderAnswer",
    "Retrieved",
    "finish_read",
    "load_ifa_layers",
    "plan_read",
    "read_plans",
    "response_body",
    "retrieval_config",
    "run_plans",
]

# ----------------------------------------------------------------------------------------- retrieval


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One retrieved document as the response shows it."""

    doc_id: str
    text: str
    score: float
    rank: int
    kept: bool
    weight: float | None = None
    """JOMED's p_R(k|q) (``fusion=jomed``); None for concat."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.doc_id, "text": self.text, "score": round(self.score, 6),
                               "rank": self.rank, "kept": self.kept}
        if self.weight is not None:
            out["weight"] = round(self.weight, 6)
        return out


@dataclasses.dataclass(frozen=True)
class Retrieved:
    """A request's evidence: the domain it was retrieved from and the hits (``images`` aligned with ``evidence``
    when the reader needs the documents' images: JOMED fusion or the jomed prompt style)."""

    domain: str
    domain_confidence: float | None
    evidence: tuple[Evidence, ...]
    images: tuple[bytes | None, ...] = ()
    retriever: str = "fine-tuned"

    @property
    def kept(self) -> list[int]:
        return [i for i, e in enumerate(self.evidence) if e.kept]


def unknown_domain(confidence: float | None) -> Retrieved:
    """The evidence of an image the router could not place in an indexed domain: none (answered without retrieval)."""
    return Retrieved(UNKNOWN_DOMAIN, confidence, (), (), "none")


def retrieval_config(base: RetrievalConfig, query: AnswerQuery, jomed_k: int) -> RetrievalConfig:
    """The retrieval of one request: ``fusion=jomed`` -> K candidates of the text head, all kept; ``concat`` ->
    the server's config with the request's ``k`` (the top-K adaptive-k chooses from) and ``adaptive`` rule."""
    if query.fusion == "jomed":
        return RetrievalConfig(k=query.k or jomed_k, mode="text", adaptive="none", batch_size=base.batch_size)
    changes: dict[str, Any] = {}
    if query.k is not None:
        changes.update(k=query.k, k_max=None, k_min=min(base.k_min, query.k),
                       candidates=None if base.candidates is None else max(base.candidates, query.k))
    if query.adaptive is not None:
        changes["adaptive"] = query.adaptive
    return base.replace(**changes) if changes else base


def _doc_image(hit: Any) -> bytes | None:
    if hit.image_bytes is not None:
        return hit.image_bytes
    path = Path(hit.image_path) if hit.image_path else None  # the server's own corpus, never a request's path
    if path is not None and path.is_file():
        return path.read_bytes()
    if path is not None:
        logger.warning("document %s: image %s is missing", hit.doc_id, path)
    return None


class EvidenceRetriever:
    """One or more domains' retrieval for serving: the index's fine-tuned retriever and, when distilled, JOMED's.

    Args:
        retriever: a :class:`~medrag_ray.retrieval.retriever.MultimodalRetriever` over the served domains.
        jomed: the same indexes queried with JOMED's distilled heads (None: ``fusion=jomed`` uses ``retriever``).
        cfg: the server's retrieval (:attr:`ServeConfig.retrieval`), ``style``, ``jomed_k``, ``jomed_temperature``.
    """

    def __init__(self, retriever: Any, jomed: Any | None, cfg: ServeConfig) -> None:
        self.retriever = retriever
        self.jomed = jomed
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg: ServeConfig, domains: Sequence[str] | None = None, router: bool = False,
                    device: str = "cpu") -> EvidenceRetriever:
        from medrag_ray.retrieval.retriever import MultimodalRetriever, load_retriever

        retriever = MultimodalRetriever.from_artifacts(
            cfg.resolved_router_dir if router else None, cfg.resolved_index_dir, device=device, cfg=cfg.retrieval,
            domains=domains, with_images=True,
        )
        jomed = None
        jomed_dir = cfg.resolved_jomed_dir
        if jomed_dir is not None:
            resources = [retriever.resources(d).with_retriever(load_retriever(jomed_dir / d, device=device))
                         for d in retriever.domains if (jomed_dir / d).is_dir()]
            if resources:
                jomed = MultimodalRetriever(resources, cfg=cfg.retrieval)
        logger.info("serving retrieval for %s (JOMED heads: %s)", list(retriever.domains),
                    list(jomed.domains) if jomed is not None else "none")
        return cls(retriever, jomed, cfg)

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self.retriever.domains)

    def retrieve(
        self,
        images: Sequence[Image.Image],
        queries: Sequence[AnswerQuery],
        routed: Sequence[tuple[str, float | None]],
    ) -> list[Retrieved]:
        """Evidence per request; requests with the same retrieval settings share one batched search."""
        groups: dict[tuple[RetrievalConfig, bool], list[int]] = {}
        out: list[Retrieved | None] = [None] * len(queries)
        for i, (query, (domain, _)) in enumerate(zip(queries, routed, strict=True)):
            if domain == UNKNOWN_DOMAIN:
                out[i] = unknown_domain(routed[i][1])
                continue
            use_jomed = query.fusion == "jomed" and self.jomed is not None and domain in self.jomed.domains
            groups.setdefault((retrieval_config(self.cfg.retrieval, query, self.cfg.jomed_k), use_jomed), []).append(i)
        for (rcfg, use_jomed), members in groups.items():
            source = self.jomed if use_jomed else self.retriever
            results = source.retrieve(
                [images[i] for i in members], [queries[i].question or None for i in members],
                domains=[routed[i][0] for i in members], cfg=rcfg,
            )
            for i, result in zip(members, results, strict=True):
                out[i] = self._evidence(queries[i], routed[i], result, "jomed" if use_jomed else "fine-tuned")
        return [r for r in out if r is not None]

    def _evidence(self, query: AnswerQuery, routed: tuple[str, float | None], result: Any, source: str) -> Retrieved:
        jomed = query.fusion == "jomed"
        weights: list[float | None] = [None] * len(result.hits)
        if jomed and result.hits:
            scores = np.array([h.score for h in result.hits], dtype=np.float64)
            w = np.exp((scores - scores.max()) / self.cfg.jomed_temperature)
            weights = (w / w.sum()).tolist()
        evidence = tuple(
            Evidence(h.doc_id, h.text, float(h.score), h.rank, bool(h.kept), weights[j])
            for j, h in enumerate(result.hits)
        )
        needs_images = jomed or self.cfg.style == "jomed"
        images = tuple(_doc_image(h) if h.kept else None for h in result.hits) if needs_images else ()
        return Retrieved(routed[0], routed[1], evidence, images, source)


# ------------------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class ReaderAnswer:
    answer: str
    probabilities: dict[str, float] | None = None
    consistency: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """The reader inputs of one request and how to turn their outputs into its answer.

    ``inputs[0]`` is the answer's input for concat; for jomed every input is one candidate (``weights``).
    ``n_candidates`` inputs after the first (concat) are the single-document consistency inputs."""

    query: AnswerQuery
    inputs: tuple[ReaderInput, ...]
    ifa_specs: tuple[Any, ...] | None
    weights: tuple[float, ...] = ()
    n_candidates: int = 0


def load_ifa_layers(cfg: ServeConfig) -> tuple[int, ...]:
    """IFA's critical layers: ``cfg.ifa_layers``, else the ``layers`` of ``jobs/find_ifa_layers.py``'s output."""
    if cfg.ifa_layers:
        return cfg.ifa_layers
    path = cfg.resolved_ifa_layers_path
    if not path.is_file():
        return ()
    layers = json.loads(path.read_text(encoding="utf-8")).get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, int) and x >= 0 for x in layers):
        raise ValueError(f"{path}: 'layers' must be a list of decoder layer indices; re-run jobs/find_ifa_layers.py")
    return tuple(layers)


def _prompt(query: AnswerQuery, reports: Sequence[str], domain: str) -> str:
    if query.task == "closed":
        return closed_rag_prompt(query.question, reports, domain, query.choices)
    if query.task == "open":
        return open_prompt(query.question, reports)
    return report_prompt(reports)


def _input(query: AnswerQuery, image: Image.Image, texts: Sequence[str], doc_images: Sequence[bytes | None],
           domain: str, style: str) -> ReaderInput:
    if style == "mmed" or not texts:
        return single_image_input(image, _prompt(query, texts, domain))
    if any(b is None for b in doc_images):
        raise InputError(422, "fusion", "JOMED inputs prepend each retrieved document's image, and this index has "
                                        "documents without one; use fusion=concat (with the server's style=mmed)")
    pairs = [(load_image(b, name="retrieved document"), t) for b, t in zip(doc_images, texts, strict=True)]
    base = closed_prompt(query.question, query.choices) if query.task == "closed" else _prompt(query, (), domain)
    return jomed_input(image, base, pairs)


def _spec(query: AnswerQuery, texts: Sequence[str], scores: Sequence[float]) -> Any:
    from medrag_ray.reader.ifa import REPORT_QUESTION, IFASpec

    if not texts:
        return None
    question = query.question if query.task != "report" else REPORT_QUESTION
    return IFASpec(question=question, doc_texts=tuple(t.strip() for t in texts), doc_scores=tuple(scores))


def plan_read(query: AnswerQuery, image: Image.Image, retrieved: Retrieved, style: str,
              consistency: bool = True) -> ReadPlan:
    """The reader inputs of one request (see the module docstring for concat, jomed and consistency)."""
    ev, imgs = retrieved.evidence, retrieved.images
    kept = retrieved.kept
    if query.fusion == "jomed" and (kept or retrieved.domain != UNKNOWN_DOMAIN):
        if not kept:
            raise InputError(422, "fusion", f"domain {retrieved.domain!r} returned no candidate to fuse")
        inputs = tuple(_input(query, image, [ev[i].text], [imgs[i]], retrieved.domain, "jomed") for i in kept)
        specs = tuple(_spec(query, [ev[i].text], [ev[i].score]) for i in kept) if query.ifa else None
        weights = tuple(float(ev[i].weight if ev[i].weight is not None else 1.0 / len(kept)) for i in kept)
        return ReadPlan(query, inputs, specs, weights=weights, n_candidates=len(kept))
    texts = [ev[i].text for i in kept]
    doc_images = [imgs[i] if imgs else None for i in kept]
    main = _input(query, image, texts, doc_images, retrieved.domain, style)
    spec = _spec(query, texts, [ev[i].score for i in kept]) if query.ifa else None
    singles: list[ReaderInput] = []
    single_specs: list[Any] = []
    if consistency and query.task == "closed" and kept:
        for j, i in enumerate(kept):
            singles.append(_input(query, image, [texts[j]], [doc_images[j]], retrieved.domain, style))
            single_specs.append(_spec(query, [texts[j]], [ev[i].score]) if query.ifa else None)
    specs = (spec, *single_specs) if query.ifa else None
    return ReadPlan(query, (main, *singles), specs, n_candidates=len(singles))


def _check_fits(engine: Any, plan: ReadPlan) -> None:
    from medrag_ray.reader.engine import encode

    config = getattr(engine.model.config, "text_config", engine.model.config)
    budget = getattr(config, "max_position_embeddings", None)
    if budget is None:
        return
    reserve = plan.query.max_new_tokens if plan.query.task != "closed" else 1
    longest = max(int(encode(engine.processor, inp)["input_ids"].shape[0]) for inp in plan.inputs)
    if longest + reserve > budget:
        raise InputError(
            422, "k" if plan.query.task == "closed" else "max_new_tokens",
            f"the prompt is {longest} tokens (+{reserve} to answer) but the reader holds {budget} positions; ask for "
            "a smaller k, a shorter question or fewer new tokens",
        )


def run_plans(engine: Any, plans: Sequence[ReadPlan], ifa: Any | None = None) -> list[list[Any]]:
    """Run every plan's inputs; closed plans with the same choices and IFA share one batched scoring pass,
    open/report plans with the same length one batched generation. Returns each plan's outputs (per input: a
    probability row for closed, the text for generation)."""
    for plan in plans:
        _check_fits(engine, plan)
    outputs: list[list[Any]] = [[] for _ in plans]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, plan in enumerate(plans):
        q = plan.query
        key = ("closed", q.choices, q.ifa) if q.task == "closed" else ("generate", q.max_new_tokens, q.ifa)
        groups.setdefault(key, []).append(i)
    for key, members in groups.items():
        inputs = [inp for i in members for inp in plans[i].inputs]
        kwargs: dict[str, Any] = {}
        if key[2]:
            if ifa is None:
                raise InputError(422, "ifa", "IFA is not configured on this server: run jobs/find_ifa_layers.py "
                                             "(writes eval/critical_layers.json) or set ifa_layers")
            kwargs = {"ifa": ifa, "ifa_specs": [s for i in members for s in (plans[i].ifa_specs or ())]}
        if key[0] == "closed":
            try:
                rows = list(engine.score_closed(inputs, key[1], **kwargs).probs)
            except AnswerTokenError as exc:
                raise InputError(422, "choices", f"{exc}; pick answers that are single tokens of this reader") from None
        else:
            rows = engine.generate(inputs, max_new_tokens=key[1], **kwargs)
        start = 0
        for i in members:
            n = len(plans[i].inputs)
            outputs[i] = rows[start : start + n]
            start += n
    return outputs


def read_plans(engine: Any, plans: Sequence[ReadPlan], ifa: Any | None = None) -> list[ReaderAnswer | InputError]:
    """:func:`run_plans` + :func:`finish_read` for many requests; a request the reader refuses (prompt too long,
    choices that are not single tokens) gets its InputError without failing the others."""
    try:
        return [finish_read(p, o) for p, o in zip(plans, run_plans(engine, plans, ifa), strict=True)]
    except InputError as exc:
        if len(plans) == 1:
            return [exc]
    results: list[ReaderAnswer | InputError] = []
    for plan in plans:
        results.extend(read_plans(engine, [plan], ifa))
    return results


def finish_read(plan: ReadPlan, outputs: Sequence[Any]) -> ReaderAnswer:
    """The answer of one plan from its outputs (see :func:`run_plans`)."""
    q = plan.query
    if q.task != "closed":
        return ReaderAnswer(str(outputs[0]))
    rows = np.asarray(outputs, dtype=np.float64)
    if q.fusion == "jomed" and plan.weights:  # no weights: an unknown domain's image, read without candidates
        probs = (rows * np.asarray(plan.weights)[:, None]).sum(axis=0)
        candidates = rows
    else:
        probs = rows[0]
        candidates = rows[1 : 1 + plan.n_candidates]
    consistency = None
    if len(candidates):
        answers = [q.choices[int(np.argmax(r))] for r in candidates]
        consistency = {"consistent": len(set(answers)) == 1, "candidate_answers": answers}
    return ReaderAnswer(
        q.choices[int(np.argmax(probs))],
        {c: round(float(p), 6) for c, p in zip(q.choices, probs, strict=True)},
        consistency,
    )


def response_body(query: AnswerQuery, retrieved: Retrieved, answer: ReaderAnswer, reader: str,
                  timings_ms: Mapping[str, float]) -> dict[str, Any]:
    """The JSON body of ``POST /v1/answer`` (``serve/schemas.py``'s ``AnswerResponse``)."""
    return {
        "answer": answer.answer,
        "task": query.task,
        "probabilities": answer.probabilities,
        "domain": retrieved.domain,
        "domain_confidence": None if retrieved.domain_confidence is None else round(retrieved.domain_confidence, 6),
        "evidence": [e.to_dict() for e in retrieved.evidence],
        "k_kept": len(retrieved.kept),
        "fusion": query.fusion,
        "retriever": retrieved.retriever,
        "ifa": query.ifa,
        "consistency": answer.consistency,
        "reader": reader,
        "timings_ms": {k: round(v, 2) for k, v in timings_ms.items()},
    }


# ------------------------------------------------------------------------------------- one process


class LocalAnswerer:
    """Route -> retrieve -> read in one process, with the models of one artifacts directory."""

    def __init__(self, cfg: ServeConfig, device: str = "cpu") -> None:
        from medrag_ray.models.reader import load_reader
        from medrag_ray.reader.engine import ReaderEngine

        self.cfg = cfg
        self.evidence = EvidenceRetriever.from_config(cfg, router=True, device=device)
        model, processor = load_reader(cfg.resolved_reader_dir, device=device)
        self.ifa = ifa_settings(cfg, model)
        self.engine = ReaderEngine(model, processor, batch_size=cfg.reader.max_batch_size)

    @property
    def domains(self) -> tuple[str, ...]:
        return self.evidence.domains

    def answer(self, items: Sequence[tuple[bytes, Mapping[str, Any]]]) -> list[dict[str, Any] | InputError]:
        """Answer each ``(image bytes, request fields)``; a refused request's slot holds its InputError."""
        from medrag_ray.serving.query import parse_query

        t0 = time.perf_counter()
        out: list[dict[str, Any] | InputError | None] = [None] * len(items)
        ok: list[int] = []
        images, queries = [], []
        for i, (data, values) in enumerate(items):
            try:
                query = parse_query(values, self.cfg.limits, self.domains)
                image = decode_image(data, max_bytes=self.cfg.limits.max_image_bytes,
                                     max_pixels=self.cfg.limits.max_image_pixels)
            except InputError as exc:
                out[i] = exc
                continue
            ok.append(i)
            images.append(image)
            queries.append(query)
        t1 = time.perf_counter()
        need_route = [j for j, q in enumerate(queries) if q.domain is None]
        routed: list[tuple[str, float | None]] = [(q.domain or "", None) for q in queries]
        if need_route and self.evidence.retriever.router is not None:
            for j, r in zip(need_route, self.evidence.retriever.route([images[j] for j in need_route]), strict=True):
                routed[j] = r
        t2 = time.perf_counter()
        retrieved = self.evidence.retrieve(images, queries, routed) if queries else []
        t3 = time.perf_counter()
        plans: list[ReadPlan | None] = []
        for j, (q, image, r) in enumerate(zip(queries, images, retrieved, strict=True)):
            try:
                plans.append(plan_read(q, image, r, self.cfg.style, self.cfg.consistency))
            except InputError as exc:
                out[ok[j]] = exc
                plans.append(None)
        live = [j for j, p in enumerate(plans) if p is not None]
        results = read_plans(self.engine, [plans[j] for j in live], self.ifa)  # type: ignore[misc]
        t4 = time.perf_counter()
        timings = {"decode": (t1 - t0) * 1e3, "route": (t2 - t1) * 1e3, "retrieve": (t3 - t2) * 1e3,
                   "read": (t4 - t3) * 1e3}
        for j, result in zip(live, results, strict=True):
            if isinstance(result, InputError):
                out[ok[j]] = result
            else:
                out[ok[j]] = response_body(queries[j], retrieved[j], result, str(self.cfg.resolved_reader_dir), timings)
        return [o for o in out if o is not None]


def ifa_settings(cfg: ServeConfig, model: Any) -> Any | None:
    """IFA's settings for ``model`` (its text attention switched to IFA's function), or None without layers."""
    layers = load_ifa_layers(cfg)
    if not layers:
        logger.info("IFA is off: no critical layers (run jobs/find_ifa_layers.py or set ifa_layers)")
        return None
    from medrag_ray.reader.ifa import IFASettings, enable_ifa

    config = getattr(model.config, "text_config", model.config)
    n_layers = int(getattr(config, "num_hidden_layers", 0))
    if n_layers and max(layers) >= n_layers:
        raise ValueError(f"ifa_layers {list(layers)} exceed the reader's {n_layers} decoder layers; re-run "
                         "jobs/find_ifa_layers.py for this reader")
    enable_ifa(model)
    logger.info("IFA on layers %s (strength %s)", list(layers), cfg.ifa_strength)
    return IFASettings(layers=layers, strength=cfg.ifa_strength)
