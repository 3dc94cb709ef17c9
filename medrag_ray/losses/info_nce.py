"""InfoNCE losses for the retrievers.

* :func:`clip_info_nce` -- MMed-RAG Eq. 1, the symmetric image<->text contrastive loss used to train each
  per-domain retriever R_d (the CLIP loss; matches ``open_clip.loss.ClipLoss`` on normalized features).
* :func:`fused_info_nce` -- MR-RAG Eq. 2, InfoNCE over ranked candidate lists with one or more positives,
  used to learn the fusion weights (alpha, beta, gamma) of :mod:`medrag_ray.retrieval.fusion`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clip_info_nce", "fused_info_nce", "similarity_matrix"]


def similarity_matrix(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """S = V_img/|V_img| . (V_txt/|V_txt|)^T (MMed-RAG, text under Eq. 1): [N, N] cosine similarities.

    ``S[i, j]`` is the similarity of image ``i`` and text ``j``.
    """
    _check_pair(image_emb, text_emb)
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T


def clip_info_nce(
    image_emb: Tensor,
    text_emb: Tensor,
    *,
    logit_scale: float | Tensor | None = None,
    temperature: float | None = None,
) -> Tensor:
    """Symmetric InfoNCE, MMed-RAG Eq. 1: ``L = (L_img + L_txt) / 2`` with

    ``L_img = -1/N sum_i log(exp(S_ii) / sum_j exp(S_ij))`` (each image against all texts, rows of S) and
    ``L_txt = -1/N sum_i log(exp(S_ii) / sum_j exp(S_ji))`` (each text against all images, columns of S),
    where S is the cosine :func:`similarity_matrix` multiplied by the logit scale.

    Args:
        image_emb: ``[N, D]`` image embeddings V_img (normalized here; pair i is (image i, text i)).
        text_emb: ``[N, D]`` text embeddings V_txt.
        logit_scale: multiplier of S, as in CLIP (pass ``model.logit_scale.exp()``; a tensor keeps its
            gradient). Exclusive with ``temperature``.
        temperature: ``tau``, equivalent to ``logit_scale = 1 / tau``.
            With neither given the scale is 1, Eq. 1 written literally.

    Returns:
        A scalar tensor. With all embeddings identical it equals ``log(N)``.
    """
    scale = _resolve_scale(logit_scale, temperature)
    logits = similarity_matrix(image_emb, text_emb) * scale
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss_img = F.cross_entropy(logits, labels)
    loss_txt = F.cross_entropy(logits.T, labels)
    return (loss_img + loss_txt) / 2


def fused_info_nce(
    scores: Tensor,
    positive_mask: Tensor,
    *,
    temperature: float = 1.0,
    candidate_mask: Tensor | None = None,
) -> Tensor:
    """InfoNCE over candidate lists, MR-RAG Eq. 2: ``L = -log(e^{s+/tau} / (e^{s+/tau} + sum_j e^{s_j-/tau}))``.

    For row b with positives P_b and negatives N_b (the remaining valid candidates), each positive is
    contrasted against the negatives only, never against the other positives, and the row loss is the mean
    over its positives::

        L_b = 1/|P_b| sum_{p in P_b} [ -s_p/tau + log( e^{s_p/tau} + sum_{n in N_b} e^{s_n/tau} ) ]
        L   = 1/B sum_b L_b

    With exactly one positive per row this is the paper's formula (= cross-entropy with the positive as
    the target). A row without negatives contributes 0 (``-log 1``).

    Args:
        scores: ``[B, C]`` fused scores s of each query's C candidates.
        positive_mask: ``[B, C]`` bool, True for positives (MR-RAG: the top-1 document by the reader's answer
            confidence); every row needs at least one.
        temperature: tau > 0.
        candidate_mask: optional ``[B, C]`` bool, False for padding in ragged candidate lists (neither
            positive nor negative). Positives must be valid candidates.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, C], got shape {tuple(scores.shape)}; add a batch dim with scores[None]")
    if positive_mask.shape != scores.shape or positive_mask.dtype != torch.bool:
        raise ValueError(
            f"positive_mask must be a bool tensor of the scores' shape {tuple(scores.shape)}, got "
            f"{positive_mask.dtype} {tuple(positive_mask.shape)}; build it with (labels == 1) or similar"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid = torch.ones_like(positive_mask) if candidate_mask is None else candidate_mask
    if valid.shape != scores.shape or valid.dtype != torch.bool:
        raise ValueError(f"candidate_mask must be a bool tensor of shape {tuple(scores.shape)}")
    if bool((positive_mask & ~valid).any()):
        raise ValueError("a positive is marked invalid in candidate_mask; positives must be real candidates")
    n_pos = positive_mask.sum(dim=1)
    if bool((n_pos == 0).any()):
        rows = torch.nonzero(n_pos == 0).flatten().tolist()[:10]
        raise ValueError(f"rows {rows} have no positive; drop them or mark one candidate per row as positive")
    negatives = valid & ~positive_mask
    logits = scores / temperature
    n_cand = scores.shape[1]
    eye = torch.eye(n_cand, dtype=torch.bool, device=scores.device)
    # denom_mask[b, p, c]: candidate c is in the denominator of positive p (c == p, or c is a negative).
    denom_mask = eye[None] | negatives[:, None, :]
    expanded = logits[:, None, :].expand(-1, n_cand, -1).masked_fill(~denom_mask, float("-inf"))
    per_candidate = torch.logsumexp(expanded, dim=-1) - logits
    per_row = (per_candidate * positive_mask).sum(dim=1) / n_pos
    return per_row.mean()


def _resolve_scale(logit_scale: float | Tensor | None, temperature: float | None) -> float | Tensor:
    if logit_scale is not None and temperature is not None:
        raise ValueError("pass either logit_scale or temperature (logit_scale = 1 / temperature), not both")
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return 1.0 / temperature
    if logit_scale is None:
        return 1.0
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        return logit_scale.reshape(())
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}; pass model.logit_scale.exp(), not the log")
    return float(logit_scale)


def _check_pair(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"embeddings must be [N, D], got image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)}"
        )
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image {tuple(image_emb.shape)} and text {tuple(text_emb.shape)} embeddings must have the same "
            "shape: row i of each is one matched pair, in the same embedding space"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("empty batch: need at least one image-text pair")
