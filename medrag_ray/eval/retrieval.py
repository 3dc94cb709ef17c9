"""Retrieval metrics: recall@k over ranked document ids, and in-gallery image->text recall of an encoder."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def recall_at_k(
    ranked_ids: Sequence[Sequence[str]], relevant_ids: Sequence[Collection[str] | str], ks: Sequence[int] = DEFAULT_KS
) -> dict[int, float]:
    """Fraction of queries with at least one relevant id among their top-k ranked ids, for each k.

    ``ranked_ids[q]`` is query q's ranking (best first); ``relevant_ids[q]`` its relevant id (a string) or
    ids (a collection). A ranking shorter than k counts what it has (a miss beyond its end).
    """
    if len(ranked_ids) != len(relevant_ids):
        raise ValueError(
            f"ranked_ids has {len(ranked_ids)} queries but relevant_ids has {len(relevant_ids)}; pass one per query"
        )
    if not ranked_ids:
        raise ValueError("recall_at_k got no queries")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    hits = dict.fromkeys(ks, 0)
    for ranking, relevant in zip(ranked_ids, relevant_ids, strict=True):
        wanted = {relevant} if isinstance(relevant, str) else set(relevant)
        if not wanted:
            raise ValueError("a query has no relevant id; drop it or give at least one")
        first = next((i for i, doc in enumerate(ranking) if doc in wanted), None)
        for k in ks:
            hits[k] += first is not None and first < k
    return {k: hits[k] / len(ranked_ids) for k in ks}


# ------------------------------------------------------------------------ image -> text retrieval


TEXT_DEDUPE_RULE = (
    "gallery = the distinct texts of the eval set, texts equal after stripping and collapsing whitespace runs "
    "(case kept) being one entry; each image's positive is the entry of its own text, so an image whose "
    "text is shared by other images is not charged a miss for ranking an identical copy first"
)
TIE_RULE = "pessimistic: a gallery text scoring exactly the positive's score ranks ahead of it"


class ImageTextEncoder(Protocol):
    """What :func:`image_to_text_recall` needs (``medrag_ray.models.dual_encoder.DualEncoder`` has it)."""

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...


ImageInput = Image.Image | bytes | str | Path
"""A PIL image, encoded image bytes or an image file path (decoded to RGB)."""


def gallery_text_key(text: str) -> str:
    """The dedupe key of a gallery text: stripped, whitespace runs collapsed to one space, case kept."""
    return " ".join(text.split())


def dedupe_texts(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """``(gallery, positive)``: distinct texts in first-occurrence order and each input's gallery index."""
    index: dict[str, int] = {}
    gallery: list[str] = []
    positive: list[int] = []
    for text in texts:
        key = gallery_text_key(text)
        if not key:
            raise ValueError("an eval text is empty; every image needs a non-empty text to retrieve")
        if key not in index:
            index[key] = len(gallery)
            gallery.append(key)
        positive.append(index[key])
    return gallery, positive


def _as_image(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    from medrag_ray.data.readers.common import load_image

    return load_image(image)


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    arr = x.detach().float().cpu().numpy()
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.maximum(norms, 1e-12)


@torch.no_grad()
def embed_images(encoder: ImageTextEncoder, images: Sequence[ImageInput], batch_size: int = 64) -> np.ndarray:
    """L2-normalized image embeddings ``[N, D]`` (float32, CPU); images decoded one batch at a time."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="embed images", leave=False, unit="batch"):
        batch = [_as_image(im) for im in images[start : start + batch_size]]
        out.append(_unit_rows(encoder.encode_image(encoder.preprocess(batch))))
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def embed_texts(encoder: ImageTextEncoder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalized text embeddings ``[N, D]`` (float32, CPU)."""
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embed texts", leave=False, unit="batch"):
        out.append(_unit_rows(encoder.encode_text(list(texts[start : start + batch_size]))))
    return np.concatenate(out).astype(np.float32)


def positive_ranks(scores: np.ndarray, positive: Sequence[int]) -> np.ndarray:
    """1-based rank of each row's positive column under :data:`TIE_RULE` (ties rank ahead of it)."""
    pos = np.asarray(positive)
    pos_score = scores[np.arange(len(pos)), pos][:, None]
    return (scores > pos_score).sum(axis=1) + (scores == pos_score).sum(axis=1)


def retrieval_metrics(
    scores: np.ndarray, positive: Sequence[int], ids: Sequence[str], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """Recall@k (via :func:`recall_at_k`), chance level, MRR and ranks of a query x gallery score matrix.

    ``scores[q, g]`` is query q's score for gallery entry g, ``positive[q]`` its one relevant entry. The
    rankings handed to :func:`recall_at_k` put the positive after every entry with an equal score.
    """
    n, g = scores.shape
    if len(positive) != n or len(ids) != n:
        raise ValueError(f"scores has {n} rows but positive has {len(positive)} and ids {len(ids)}; one per query")
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique (one per image); found duplicates")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    k_max = min(max(ks), g)
    gallery_ids = np.array([str(j) for j in range(g)])
    ranked = []
    for q in range(n):
        is_pos = np.zeros(g, dtype=np.int8)
        is_pos[positive[q]] = 1
        order = np.lexsort((is_pos, -scores[q]))[:k_max]
        ranked.append(gallery_ids[order].tolist())
    recall = recall_at_k(ranked, [str(p) for p in positive], ks)
    ranks = positive_ranks(scores, positive)
    return {
        "n_queries": n,
        "n_gallery": g,
        "ks": list(ks),
        "recall": {str(k): round(recall[k], 6) for k in ks},
        "chance": {str(k): round(min(k, g) / g, 6) for k in ks},
        "mrr": round(float(np.mean(1.0 / ranks)), 6),
        "median_rank": float(np.median(ranks)),
        "mean_rank": round(float(np.mean(ranks)), 3),
        "ranks": dict(zip(ids, ranks.tolist(), strict=True)),
    }


def image_to_text_recall(
    encoder: ImageTextEncoder,
    images: Sequence[ImageInput],
    texts: Sequence[str],
    ids: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 64,
    *,
    return_ranks: bool = False,
) -> dict[str, Any]:
    """In-gallery image->text retrieval: each image ranks the eval set's distinct texts; its own is the positive.

    ``images[i]``, ``texts[i]`` and ``ids[i]`` describe pair i. Texts are deduplicated
    (:data:`TEXT_DEDUPE_RULE`), scores are cosine similarities of the encoder's embeddings (the logit
    scale does not change a ranking), ties are :data:`TIE_RULE`. Returns ``n_queries``, ``n_gallery``,
    ``n_duplicate_texts``, ``recall`` and ``chance`` (``min(k, n_gallery) / n_gallery``: one positive
    among the gallery) keyed by ``str(k)``, ``mrr``, ``median_rank``, ``mean_rank``, the two rules, and
    with ``return_ranks`` each id's 1-based rank.
    """
    if not (len(images) == len(texts) == len(ids)):
        raise ValueError(
            f"got {len(images)} images, {len(texts)} texts and {len(ids)} ids; pass one of each per pair"
        )
    if not images:
        raise ValueError("image_to_text_recall got no pairs")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gallery, positive = dedupe_texts(texts)
    image_emb = embed_images(encoder, images, batch_size)
    text_emb = embed_texts(encoder, gallery, batch_size)
    result = retrieval_metrics(image_emb @ text_emb.T, positive, ids, ks)
    ranks = result.pop("ranks")
    result["n_duplicate_texts"] = len(texts) - len(gallery)
    result["dedupe_rule"] = TEXT_DEDUPE_RULE
    result["tie_rule"] = TIE_RULE
    if return_ranks:
        result["ranks"] = ranks
    return result
