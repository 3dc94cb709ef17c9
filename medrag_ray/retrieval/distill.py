"""JOMED's retriever distillation and MR-RAG's fusion weights, both taught by the frozen reader.

1. **Candidate scoring** (:func:`score_candidates`, one Ray Data pass over every head and split in
   ``jobs/distill_retriever.py``, written as :data:`SCORES_SCHEMA` rows): for each
   training question, the domain retriever returns its top-K candidates with one head (``text``: query image
   vs document text; ``image``: query image vs document image), and the frozen reader answers the question once
   per candidate with that (image, text) pair prepended (JOMED's input). A :class:`ScoredQuery` keeps the
   reader's class-restricted probabilities ``p_LVLM_C(c | (i_k, t_k) o (i, q))`` and everything training needs
   without the images: the query's base image embedding (the encoder is frozen; the heads act on the query
   side only), its question embedding and the candidates' stored text and image embeddings.
2. **Sequential head distillation** (:class:`HeadDistillTask`): the text head, then the image head, trained on
   JOMED's Sharp Perplexity KL (:func:`~medrag_ray.losses.kl_distill.sharp_perplexity_kl`) over their own
   candidates; every other parameter frozen.
3. **MR-RAG fusion weights** (:class:`FusionTask`): (alpha, beta, gamma) of Eq. 1 trained with Eq. 2 on the same
   scored candidates, the positive being the candidate under which the reader is most confident of the right
   answer and the negatives the ``n_negatives`` least confident ones.

One task covers every domain (a :class:`torch.nn.ModuleDict` of per-domain retrievers), so each step is one Ray
Train run. Validation reports the KL, how often the head's top candidate is the reader's best one, and the
accuracy of JOMED's logit fusion over the fixed candidates (``sum_k p_R(k) p_C(a | k)``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from medrag_ray.data.readers.common import load_image
from medrag_ray.data.schema import Sample
from medrag_ray.losses.info_nce import fused_info_nce
from medrag_ray.losses.kl_distill import sharp_perplexity_kl
from medrag_ray.reader.answers import YES_NO, normalize_closed
from medrag_ray.reader.context import self_doc_ids
from medrag_ray.reader.prompts import closed_prompt, jomed_input
from medrag_ray.retrieval.fusion import CandidateSims
from medrag_ray.retrieval.retrieval_config import RetrievalConfig
from medrag_ray.retrieval.retriever import (
    DualHeadRetriever,
    MultimodalRetriever,
    load_retriever,
    save_retriever,
)

logger = logging.getLogger(__name__)

DISTILL_HEADS: tuple[str, ...] = ("text", "image")

SCORED_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("domain", pa.string()),
        ("answer", pa.string()),
        ("head", pa.string()),
        ("doc_ids", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
        ("class_probs", pa.list_(pa.list_(pa.float32()))),
        ("query_emb", pa.list_(pa.float32())),
        ("question_emb", pa.list_(pa.float32())),
        ("doc_text_emb", pa.list_(pa.list_(pa.float32()))),
        ("doc_image_emb", pa.list_(pa.list_(pa.float32()))),
    ]
)


@dataclass(frozen=True)
class ScoredQuery:
    """One training question, its K candidates under one head, and the frozen reader's verdict on each."""

    sample_id: str
    domain: str
    answer: str
    """The reference answer (one of the choices)."""
    head: str
    doc_ids: tuple[str, ...]
    scores: tuple[float, ...]
    """The head's cosine to each candidate when scored (descending)."""
    class_probs: tuple[tuple[float, ...], ...]
    """``[K][C]``: the reader's probabilities over the choices with candidate k prepended."""
    query_emb: tuple[float, ...]
    """The query image's base embedding (the encoder's, before any head), L2-normalised."""
    question_emb: tuple[float, ...]
    doc_text_emb: tuple[tuple[float, ...], ...]
    doc_image_emb: tuple[tuple[float, ...], ...]

    def gold_logprobs(self, choices: Sequence[str] = YES_NO) -> np.ndarray:
        """``log p_LVLM_C(a | k)`` for the reference answer ``a``, per candidate."""
        probs = np.asarray(self.class_probs, dtype=np.float64)[:, list(choices).index(self.answer)]
        return np.log(np.clip(probs, 1e-12, None))

    def to_row(self) -> dict[str, Any]:
        return {k: (list(map(list, v)) if k in _NESTED else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ScoredQuery:
        return cls(**{k: (tuple(map(tuple, v)) if k in _NESTED else tuple(v) if isinstance(v, list) else v)
                      for k, v in row.items()})


_NESTED = ("class_probs", "doc_text_emb", "doc_image_emb")


def write_scored(queries: Sequence[ScoredQuery], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([q.to_row() for q in queries], schema=SCORED_SCHEMA), path)
    return len(queries)


def read_scored(path: str | Path) -> list[ScoredQuery]:
    """A Parquet file or directory of :class:`ScoredQuery` rows."""
    return [ScoredQuery.from_row(r) for r in pq.read_table(path, schema=SCORED_SCHEMA).to_pylist()]


def score_candidates(
    retriever: MultimodalRetriever,
    engine: Any,
    samples: Sequence[Sample],
    images: Sequence[Image.Image],
    head: str,
    k: int,
    *,
    route: bool = True,
    choices: Sequence[str] = YES_NO,
) -> list[ScoredQuery]:
    """Retrieve K candidates per sample with ``head`` and score the reader once per candidate (JOMED's input:
    the candidate's image and text prepended to the query image and the closed question).

    Samples need a closed question with an answer among ``choices``; a sample's own case is never a candidate.
    Candidates without an image (a text-only corpus) cannot be prepended as pairs and raise.
    """
    if head not in DISTILL_HEADS:
        raise ValueError(f"head must be one of {list(DISTILL_HEADS)}, got {head!r}")
    answers = [normalize_closed(s.answer, choices) for s in samples]
    bad = [s.id for s, a in zip(samples, answers, strict=True) if s.answer_type != "closed" or a is None]
    if bad:
        raise ValueError(f"samples {bad[:3]} are not closed questions with an answer in {list(choices)}")
    cfg = RetrievalConfig(k=k, mode=head, adaptive="none")  # type: ignore[arg-type]
    results = retriever.retrieve(
        list(images), [s.question for s in samples], domains=None if route else [s.domain for s in samples],
        cfg=cfg, exclude_ids=[self_doc_ids(s) for s in samples],
    )
    inputs, spans = [], []
    for s, image, result in zip(samples, images, results, strict=True):
        prompt = closed_prompt(s.question, choices)
        start = len(inputs)
        for hit in result.hits:
            if hit.image_bytes is None and not hit.image_path:
                raise ValueError(
                    f"candidate {hit.doc_id} has no image; JOMED prepends (image, text) pairs: index a corpus with "
                    "images and load the retriever with with_images=True"
                )
            doc_image = load_image(hit.image_bytes if hit.image_bytes is not None else hit.image_path,
                                   name=f"doc {hit.doc_id}")
            inputs.append(jomed_input(image, prompt, [(doc_image, hit.text)]))
        spans.append((start, len(inputs)))
    probs = engine.score_closed(inputs, choices).probs if inputs else np.zeros((0, len(choices)))
    out = []
    by_domain: dict[str, list[int]] = {}
    for i, result in enumerate(results):
        if result.hits:  # an image routed to no indexed domain has no candidate to score
            by_domain.setdefault(result.domain, []).append(i)
    base_emb: dict[int, np.ndarray] = {}
    question_emb: dict[int, np.ndarray] = {}
    for domain, members in by_domain.items():
        res = retriever.resources(domain)
        with torch.inference_mode():
            pixels = res.retriever.encoder.preprocess([images[i] for i in members])
            base = res.retriever.encode_query_images(pixels).cpu().numpy()
            q = res.retriever.encode_questions([samples[i].question for i in members])
        q_np = q.cpu().numpy() if q is not None else np.zeros_like(base)
        for j, i in enumerate(members):
            base_emb[i], question_emb[i] = base[j], q_np[j]
    for i, (s, result, (start, stop)) in enumerate(zip(samples, results, spans, strict=True)):
        if stop == start:
            continue
        emb = retriever.resources(result.domain).doc_embeddings()
        rows = emb.rows([h.doc_id for h in result.hits])
        out.append(
            ScoredQuery(
                sample_id=s.id, domain=result.domain, answer=str(answers[i]), head=head,
                doc_ids=tuple(h.doc_id for h in result.hits), scores=_f32([h.score for h in result.hits]),
                class_probs=tuple(_f32(row) for row in probs[start:stop]),
                query_emb=_f32(base_emb[i]), question_emb=_f32(question_emb[i]),
                doc_text_emb=tuple(_f32(r) for r in emb.text[rows]),
                doc_image_emb=tuple(_f32(r) for r in emb.image[rows]),
            )
        )
    return out


def _f32(values: Any) -> tuple[float, ...]:
    """Values as the float32 numbers the Parquet file stores (so a record equals itself read back)."""
    return tuple(float(v) for v in np.asarray(values, dtype=np.float32))


# ------------------------------------------------------------------------------------------ batching


@dataclass(frozen=True)
class CandidateBatch:
    """Padded tensors of B scored queries with up to K candidates."""

    domains: list[str]
    query_emb: Tensor
    """``[B, D]``"""
    question_emb: Tensor
    doc_text_emb: Tensor
    """``[B, K, D]``"""
    doc_image_emb: Tensor
    gold_logprobs: Tensor
    """``[B, K]``"""
    mask: Tensor
    """``[B, K]`` bool, False on padding."""


class ScoredDataset(Dataset):
    def __init__(self, queries: Sequence[ScoredQuery]) -> None:
        if not queries:
            raise ValueError("no scored queries; run the candidate scoring pass first (jobs/distill_retriever.py)")
        self.queries = list(queries)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> ScoredQuery:
        return self.queries[i]


def collate_scored(queries: Sequence[ScoredQuery]) -> CandidateBatch:
    k = max(len(q.doc_ids) for q in queries)
    dim = len(queries[0].query_emb)
    b = len(queries)
    doc_text, doc_image = torch.zeros(b, k, dim), torch.zeros(b, k, dim)
    gold, mask = torch.zeros(b, k), torch.zeros(b, k, dtype=torch.bool)
    for i, q in enumerate(queries):
        n = len(q.doc_ids)
        doc_text[i, :n] = torch.tensor(q.doc_text_emb)
        doc_image[i, :n] = torch.tensor(q.doc_image_emb)
        gold[i, :n] = torch.from_numpy(q.gold_logprobs()).float()
        mask[i, :n] = True
    return CandidateBatch(
        domains=[q.domain for q in queries],
        query_emb=torch.tensor([q.query_emb for q in queries]),
        question_emb=torch.tensor([q.question_emb for q in queries]),
        doc_text_emb=doc_text, doc_image_emb=doc_image, gold_logprobs=gold, mask=mask,
    )


def _cosine(q: Tensor, docs: Tensor) -> Tensor:
    """``[B, D]`` x ``[B, K, D]`` -> ``[B, K]`` (documents are stored L2-normalised; zero rows give 0)."""
    return torch.einsum("bd,bkd->bk", F.normalize(q, dim=-1), docs)


class DomainRetrievers(nn.Module):
    """Per-domain :class:`DualHeadRetriever` s with one part (``text``, ``image`` or ``fusion``) trainable."""

    def __init__(self, retrievers: Mapping[str, DualHeadRetriever], part: str) -> None:
        super().__init__()
        self.retrievers = nn.ModuleDict(dict(retrievers))
        for r in self.retrievers.values():
            r.freeze_except(part)  # type: ignore[operator]

    def head_scores(self, batch: CandidateBatch, head: str) -> Tensor:
        """``[B, K]`` cosines of each query (through ``head``) to its candidates' ``head``-modality embeddings."""
        rows = []
        for i, domain in enumerate(batch.domains):
            r = self.retrievers[domain]
            param = r.head(head).weight  # type: ignore[operator]
            q = r.project(batch.query_emb[i : i + 1].to(param.device, param.dtype), head)  # type: ignore[operator]
            docs = (batch.doc_text_emb if head == "text" else batch.doc_image_emb)[i : i + 1]
            rows.append(_cosine(q.float(), docs.to(q.device)))
        return torch.cat(rows)

    def fused_sims(self, batch: CandidateBatch) -> CandidateSims:
        device = next(self.parameters()).device
        text, image = self.head_scores(batch, "text"), self.head_scores(batch, "image")
        txt_txt = _cosine(batch.question_emb.to(device), batch.doc_text_emb.to(device))
        return CandidateSims(img_txt=text, img_img=image, txt_txt=txt_txt)

    def every_trainable_parameter(self) -> Tensor:
        """``0 * sum`` of every trainable parameter: added to a loss it gives each one a (zero) gradient, so
        data-parallel workers whose batches hold different domains reduce the same gradients (DeepSpeed's
        gradient reduction expects every worker to produce the same set)."""
        return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros(()))

    def fusion_weights(self, domains: Sequence[str]) -> Tensor:
        return torch.stack([self.retrievers[d].fusion.weights for d in domains])  # type: ignore[union-attr]


def fused_gold_accuracy(p_retriever: Tensor, gold_logprobs: Tensor, mask: Tensor) -> float:
    """Share of queries whose JOMED fused probability of the right answer, ``sum_k p_R(k) p_C(a | k)``, exceeds
    one half (yes/no: the fused answer is right)."""
    fused = (p_retriever * gold_logprobs.exp() * mask).sum(dim=-1)
    return float((fused > 0.5).float().mean())


def best_candidate_agreement(scores: Tensor, gold_logprobs: Tensor, mask: Tensor) -> float:
    """Share of queries whose top-scored candidate is one the reader is most confident of the answer with
    (ties between equally helpful candidates count as agreement)."""
    top = scores.masked_fill(~mask, float("-inf")).argmax(dim=-1, keepdim=True)
    best = gold_logprobs.masked_fill(~mask, float("-inf")).amax(dim=-1)
    return float((gold_logprobs.gather(1, top).squeeze(1) >= best - 1e-6).float().mean())


class _RetrieverTask:
    """Shared parts of the distillation tasks: per-domain retrievers from directories, export per domain."""

    part = ""

    def __init__(
        self,
        name: str,
        retriever_dirs: Mapping[str, str],
        train_queries: Sequence[ScoredQuery],
        val_queries: Sequence[ScoredQuery],
    ) -> None:
        missing = sorted({q.domain for q in [*train_queries, *val_queries]} - set(retriever_dirs))
        if missing:
            raise ValueError(f"{name}: scored queries of domains {missing} have no retriever directory")
        if not train_queries:
            raise ValueError(f"{name}: no scored training queries; run the candidate scoring pass first")
        self.name = name
        self.retriever_dirs = dict(retriever_dirs)
        self.train_queries = list(train_queries)
        self.val_queries = list(val_queries)

    def build_model(self) -> nn.Module:
        loaded = {d: load_retriever(p, device="cpu", dtype="float32") for d, p in self.retriever_dirs.items()}
        return DomainRetrievers(loaded, self.part).train()

    def train_dataset(self) -> ScoredDataset:
        return ScoredDataset(self.train_queries)

    def collate(self, items: Sequence[ScoredQuery]) -> CandidateBatch:
        return collate_scored(items)

    def export(self, model: nn.Module, directory: Path) -> None:
        assert isinstance(model, DomainRetrievers)
        for domain, retriever in model.retrievers.items():
            save_retriever(retriever, directory / domain)  # type: ignore[arg-type]


class HeadDistillTask(_RetrieverTask):
    """JOMED: train one head on ``KL(p_LVLM_C || softmax(s / tau))`` over its own scored candidates."""

    def __init__(
        self,
        name: str,
        head: str,
        retriever_dirs: Mapping[str, str],
        train_queries: Sequence[ScoredQuery],
        val_queries: Sequence[ScoredQuery],
        temperature: float,
    ) -> None:
        if head not in DISTILL_HEADS:
            raise ValueError(f"head must be one of {list(DISTILL_HEADS)}, got {head!r}")
        wrong = {q.head for q in [*train_queries, *val_queries]} - {head}
        if wrong:
            raise ValueError(f"{name}: the {head} head trains on its own candidates, got queries scored with {wrong}")
        super().__init__(name, retriever_dirs, train_queries, val_queries)
        self.head = head
        self.part = head
        self.temperature = temperature

    def loss(self, model: nn.Module, batch: CandidateBatch) -> Tensor:
        assert isinstance(model, DomainRetrievers)
        scores = model.head_scores(batch, self.head)
        loss = sharp_perplexity_kl(batch.gold_logprobs.to(scores.device), scores, self.temperature,
                                   batch.mask.to(scores.device))
        return loss + model.every_trainable_parameter().to(loss.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_queries:
            return {}
        assert isinstance(model, DomainRetrievers)
        batch = collate_scored(self.val_queries)
        scores = model.head_scores(batch, self.head).cpu()
        p_r = torch.softmax(scores.masked_fill(~batch.mask, float("-inf")) / self.temperature, dim=-1)
        return {
            "val_kl": float(sharp_perplexity_kl(batch.gold_logprobs, scores, self.temperature, batch.mask)),
            "val_best_candidate_agreement": best_candidate_agreement(scores, batch.gold_logprobs, batch.mask),
            "val_fused_accuracy": fused_gold_accuracy(p_r, batch.gold_logprobs, batch.mask),
        }


def confidence_labels(gold_logprobs: Tensor, mask: Tensor, n_negatives: int) -> tuple[Tensor, Tensor]:
    """MR-RAG's labels from the reader's confidence in the right answer: the top-1 candidate is the positive,
    the ``n_negatives`` least confident are the negatives; returns ``(positive_mask, candidate_mask)``.
    A query with fewer than 2 valid candidates gets no candidates at all (nothing to contrast)."""
    lp = gold_logprobs.masked_fill(~mask, float("inf"))
    order = lp.argsort(dim=-1)  # ascending: least confident first, padding last
    positive, candidates = torch.zeros_like(mask), torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n < 2:
            continue
        top = int(gold_logprobs[b].masked_fill(~mask[b], float("-inf")).argmax())
        negatives = [int(i) for i in order[b, :n] if int(i) != top][:n_negatives]
        positive[b, top] = True
        candidates[b, [top, *negatives]] = True
    return positive, candidates


class FusionTask(_RetrieverTask):
    """MR-RAG Eq. 2 on Eq. 1's fused score: (alpha, beta, gamma) per domain, heads and encoders frozen."""

    part = "fusion"

    def __init__(
        self,
        name: str,
        retriever_dirs: Mapping[str, str],
        train_queries: Sequence[ScoredQuery],
        val_queries: Sequence[ScoredQuery],
        temperature: float,
        n_negatives: int,
    ) -> None:
        super().__init__(name, retriever_dirs, train_queries, val_queries)
        if n_negatives < 1:
            raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
        self.temperature = temperature
        self.n_negatives = n_negatives

    def _scores(self, model: DomainRetrievers, batch: CandidateBatch) -> Tensor:
        sims = model.fused_sims(batch)
        w = model.fusion_weights(batch.domains)  # [B, 3]
        return w[:, :1] * sims.img_txt + w[:, 1:2] * sims.img_img + w[:, 2:3] * sims.txt_txt  # type: ignore[operator]

    def loss(self, model: nn.Module, batch: CandidateBatch) -> Tensor:
        assert isinstance(model, DomainRetrievers)
        scores = self._scores(model, batch)
        positive, candidates = confidence_labels(batch.gold_logprobs, batch.mask, self.n_negatives)
        keep = candidates.any(dim=-1)
        touch = model.every_trainable_parameter().to(scores.device)
        if not keep.any():
            return scores.sum() * 0.0 + touch
        return touch + fused_info_nce(scores[keep], positive[keep].to(scores.device), temperature=self.temperature,
                                      candidate_mask=candidates[keep].to(scores.device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if not self.val_queries:
            return {}
        assert isinstance(model, DomainRetrievers)
        batch = collate_scored(self.val_queries)
        scores = self._scores(model, batch).cpu()
        out = {"val_best_candidate_agreement": best_candidate_agreement(scores, batch.gold_logprobs, batch.mask)}
        for domain, r in model.retrievers.items():
            for name, value in zip(("alpha", "beta", "gamma"), r.fusion.weights.tolist(), strict=True):  # type: ignore[union-attr]
                out[f"{domain}_{name}"] = float(value)
        return out


# ---------------------------------------------------------------------------------- task factories


SCORES_SCHEMA = SCORED_SCHEMA.append(pa.field("split", pa.string()))
"""The scoring pass's output: :data:`SCORED_SCHEMA` rows of every head and split, tagged with the split."""


def scores_rows(queries: Sequence[ScoredQuery], split: str) -> list[dict[str, Any]]:
    """Rows of :data:`SCORES_SCHEMA`: ``queries`` of ``split``."""
    return [{**q.to_row(), "split": split} for q in queries]


def _has_scores(scores_dir: str | Path) -> bool:
    return Path(scores_dir).is_dir() and any(Path(scores_dir).glob("*.parquet"))


def read_scores(scores_dir: str | Path, head: str, split: str) -> list[ScoredQuery]:
    """The ``head`` candidates of ``split`` from the scoring pass's output directory (none when it is empty)."""
    if not _has_scores(scores_dir):
        return []
    table = pq.read_table(scores_dir, schema=SCORES_SCHEMA, columns=SCORED_SCHEMA.names,
                          filters=[("head", "==", head), ("split", "==", split)])
    return [ScoredQuery.from_row(r) for r in table.to_pylist()]


def count_scores(scores_dir: str | Path) -> dict[str, int]:
    """``{"<head>/<split>": n}`` over the scoring pass's output directory."""
    if not _has_scores(scores_dir):
        return {}
    table = pq.read_table(scores_dir, schema=SCORES_SCHEMA, columns=["head", "split"]).to_pydict()
    counts: dict[str, int] = {}
    for head, split in zip(table["head"], table["split"], strict=True):
        counts[f"{head}/{split}"] = counts.get(f"{head}/{split}", 0) + 1
    return dict(sorted(counts.items()))


def make_head_task(
    name: str, head: str, retriever_dirs: Mapping[str, str], scores_dir: str, temperature: float
) -> HeadDistillTask:
    train, val = (read_scores(scores_dir, head, split) for split in ("train", "val"))
    return HeadDistillTask(name, head, retriever_dirs, train, val, temperature)


def make_fusion_task(
    name: str, retriever_dirs: Mapping[str, str], scores_dir: str, temperature: float, n_negatives: int
) -> FusionTask:
    """Fusion weights learn from both heads' scored candidate lists."""
    train = [q for head in DISTILL_HEADS for q in read_scores(scores_dir, head, "train")]
    val = [q for head in DISTILL_HEADS for q in read_scores(scores_dir, head, "val")]
    return FusionTask(name, retriever_dirs, train, val, temperature, n_negatives)
