"""Mining RAG-PT preference pairs for a batch of samples (MMed-RAG Algorithm 1), free of Ray.

:class:`PreferenceMiner` holds a :class:`~medrag_ray.retrieval.retriever.MultimodalRetriever` and a
:class:`~medrag_ray.reader.engine.ReaderEngine`. :meth:`PreferenceMiner.mine_batch` does, for every sample:

1. checks it (closed question, parseable answer, readable image) -- a bad sample becomes a reject with the
   reason, and the batch goes on (so does a sample whose least similar index image, step 3, is unreadable);
2. routes and retrieves x_r (adaptive-k; the sample's own case report excluded);
3. builds x_v*: the index image least similar to x_v (same domain), diffused to ``noise_step`` (Eq. 2) with a
   per-sample seed, so a re-run makes the same image;
4. scores the reader's passes M(x_v, x_t+x_r), M(x_v, x_t), M(x_v*, x_t+x_r) (and M(x_v*, x_t) for the
   text-side D_cm) from the answer-token logits, all inputs of the batch in shared forward passes;
5. applies the rules (:mod:`medrag_ray.mining.rules`) and returns :class:`PreferencePair` records.

Every pair's ``prompt`` is the retrieval prompt (x_t + x_r): the released alignment data trains DPO in the
retrieval setting. ``meta`` records which pass produced each side, all passes' answers and p(yes), the
retrieved ids and scores, and the noise (source document, step, kind, seed).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import UNKNOWN_DOMAIN, PreferencePair, RecordError, Sample, dumps_meta
from medrag_ray.mining.noise import noisy_image, sample_seed
from medrag_ray.mining.rules import NO_RAG, NOISY_NO_RAG, NOISY_RAG, RAG, ReaderOutcomes, mine
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import SampleContext, prompt_text, reader_input, retrieve_contexts, sample_image
from medrag_ray.reader.engine import ReaderEngine
from medrag_ray.retrieval.retrieval_config import RetrievalConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MiningSettings:
    """How pairs are mined (see :class:`medrag_ray.config.MinePrefsConfig` for the job's fields)."""

    retrieval: RetrievalConfig = RetrievalConfig(k=5, k_max=3)
    style: str = "mmed"
    dcm_rule: str = "algorithm"
    noise_kind: str = "diffusion"
    noise_step: int = 500
    seed: int = 0
    route: bool = True
    """Route with F(x_v) (the paper); False uses each sample's labelled domain."""


@dataclass(frozen=True)
class Reject:
    sample_id: str
    field: str
    reason: str


@dataclass
class BatchResult:
    """What one batch gave: pairs, per-sample outcomes (for CR/OR and accuracies) and rejects."""

    pairs: list[PreferencePair] = field(default_factory=list)
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def check_sample(sample: Sample) -> tuple[Image.Image, str]:
    """The decoded image and normalised answer of a minable sample, or a RecordError naming the field."""
    if sample.answer_type != "closed":
        raise RecordError(
            "answer_type", f"is {sample.answer_type!r}; preference mining needs closed (yes/no) questions"
        )
    if not sample.question.strip():
        raise RecordError("question", "is empty")
    answer = normalize_closed(sample.answer, YES_NO)
    if answer is None:
        raise RecordError("answer", f"{sample.answer!r} is not a yes/no answer")
    return sample_image(sample), answer


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class PreferenceMiner:
    """Mine preference pairs with a retriever and a reader; see the module docstring."""

    def __init__(self, retriever: Any, engine: ReaderEngine, settings: MiningSettings) -> None:
        self.retriever = retriever
        self.engine = engine
        self.settings = settings

    def mine_batch(self, samples: Sequence[Sample]) -> BatchResult:
        result = BatchResult()
        good: list[tuple[Sample, Image.Image, str]] = []
        for s in samples:
            try:
                image, answer = check_sample(s)
            except RecordError as exc:
                result.rejects.append(Reject(s.id, exc.field_name, str(exc)))
                continue
            good.append((s, image, answer))
        if not good:
            return result
        cfg = self.settings
        ok_samples = [g[0] for g in good]
        images = [g[1] for g in good]
        contexts = retrieve_contexts(
            self.retriever, ok_samples, images, cfg.retrieval, route=cfg.route, with_images=cfg.style == "jomed"
        )
        routed = [i for i, c in enumerate(contexts) if c.domain != UNKNOWN_DOMAIN]
        for i in sorted(set(range(len(good))) - set(routed)):  # nothing retrieved: no preference to mine
            result.rejects.append(Reject(good[i][0].id, "domain", "the router placed the image in no indexed domain "
                                         "(routed 'unknown'); mine it with route=false or index its domain"))
        good, contexts, images = [good[i] for i in routed], [contexts[i] for i in routed], [images[i] for i in routed]
        ok_samples = [g[0] for g in good]
        if not good:
            return result
        sources = self.retriever.least_similar_docs(images, [c.domain for c in contexts])
        noisy: list[Image.Image] = []
        minable: list[int] = []
        for i, (s, doc) in enumerate(zip(ok_samples, sources, strict=True)):
            try:
                source_image = load_image(
                    doc.image_bytes if doc.image_bytes is not None else doc.image_path, name=f"doc {doc.id}"
                )
            except RecordError as exc:  # x_v* cannot be built: this sample is not minable, the others are
                result.rejects.append(Reject(s.id, "noise.source_doc", f"the least similar document {doc.id}: {exc}"))
                continue
            minable.append(i)
            noisy.append(noisy_image(source_image, cfg.noise_step, sample_seed(cfg.seed, s.id), cfg.noise_kind))
        if not minable:
            return result
        good, contexts, sources = ([seq[i] for i in minable] for seq in (good, contexts, sources))
        ok_samples, images = [g[0] for g in good], [g[1] for g in good]
        passes = {
            RAG: [reader_input(s, im, c, cfg.style) for s, im, c in zip(ok_samples, images, contexts, strict=True)],
            NO_RAG: [reader_input(s, im, None, cfg.style) for s, im in zip(ok_samples, images, strict=True)],
            NOISY_RAG: [
                reader_input(s, nz, c, cfg.style) for s, nz, c in zip(ok_samples, noisy, contexts, strict=True)
            ],
        }
        if cfg.dcm_rule == "text":
            passes[NOISY_NO_RAG] = [
                reader_input(s, nz, None, cfg.style) for s, nz in zip(ok_samples, noisy, strict=True)
            ]
        flat = [inp for inputs in passes.values() for inp in inputs]
        scores = self.engine.score_closed(flat, YES_NO)
        n = len(good)
        answers = {name: scores.answers[i * n : (i + 1) * n] for i, name in enumerate(passes)}
        p_yes = {name: scores.probs[i * n : (i + 1) * n, 0] for i, name in enumerate(passes)}
        for j, ((s, _, y), ctx, doc, nz) in enumerate(zip(good, contexts, sources, noisy, strict=True)):
            outcome = ReaderOutcomes(
                answer=y,
                rag=answers[RAG][j],
                no_rag=answers[NO_RAG][j],
                noisy_rag=answers[NOISY_RAG][j],
                noisy_no_rag=answers[NOISY_NO_RAG][j] if NOISY_NO_RAG in answers else None,
            )
            meta = {
                "sample_id": s.id,
                "answers": {name: answers[name][j] for name in passes},
                "p_yes": {name: round(float(p_yes[name][j]), 6) for name in passes},
                "noise": {
                    "source_doc": doc.id,
                    "step": cfg.noise_step,
                    "kind": cfg.noise_kind,
                    "seed": sample_seed(cfg.seed, s.id),
                },
                **ctx.to_meta(),
            }
            result.outcomes.append(
                {
                    "sample_id": s.id,
                    "domain": s.domain,
                    "source": s.source,
                    "answer": y,
                    "routed_domain": ctx.domain,
                    **{k: answers[k][j] for k in passes},
                }
            )
            for mined in mine(outcome, cfg.dcm_rule):
                result.pairs.append(self._pair(s, ctx, mined, meta, nz))
        return result

    def _pair(
        self, s: Sample, ctx: SampleContext, mined: Any, meta: dict[str, Any], noisy: Image.Image
    ) -> PreferencePair:
        noised = mined.chosen_noised or mined.rejected_noised
        return PreferencePair(
            id=f"{s.id}/{mined.pair_type}",
            domain=s.domain,
            source=s.source,
            pair_type=mined.pair_type,
            prompt=prompt_text(s, ctx.texts, ctx.domain),
            chosen=mined.chosen,
            rejected=mined.rejected,
            image_path=s.image_path,
            image_bytes=s.image_bytes,
            image_available=s.image_bytes is not None or s.image_available,
            chosen_noised=mined.chosen_noised,
            rejected_noised=mined.rejected_noised,
            meta=dumps_meta(
                {
                    **meta,
                    "chosen_pass": mined.chosen_pass,
                    "rejected_pass": mined.rejected_pass,
                    "no_rag_prompt": prompt_text(s, (), ctx.domain),
                }
            ),
            noised_image_bytes=png_bytes(noisy) if noised else None,
        )


def outcomes_of(rows: Sequence[dict[str, Any]]) -> list[ReaderOutcomes]:
    """Outcome rows (as :meth:`PreferenceMiner.mine_batch` returns them) back to :class:`ReaderOutcomes`."""
    return [
        ReaderOutcomes(
            answer=r["answer"], rag=r[RAG], no_rag=r[NO_RAG], noisy_rag=r[NOISY_RAG], noisy_no_rag=r.get(NOISY_NO_RAG)
        )
        for r in rows
    ]

