"""JOMED inference by logit fusion (JOMED, "Inference"; DESIGN feature 14).

Each of the K retrieved (image, text) candidates is prepended to the question and the reader scores the answer
classes once per candidate (in parallel, one batch). The fused answer distribution is

    p(a | q) = sum_k p_LVLM(a | (i_k, t_k) o q) * p_R((i_k, t_k) | q),
    p_R(k | q) = exp(s(q, k)) / sum_j exp(s(q, j)),

where ``p_LVLM`` is the class-restricted softmax over the answer tokens' logits (JOMED's p_LVLM_C) and ``s`` the
retriever's similarity of the query and candidate k.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["class_probs", "logit_fusion", "retrieval_weights"]


def class_probs(class_logits: Tensor) -> Tensor:
    """p_LVLM_C: softmax over the answer classes only (``[..., C]`` logits of each class's first token)."""
    if class_logits.shape[-1] < 2:
        raise ValueError(
            f"class_logits needs at least 2 classes in its last dimension, got {tuple(class_logits.shape)}"
        )
    return torch.softmax(class_logits.float(), dim=-1)


def retrieval_weights(scores: Tensor, temperature: float = 1.0) -> Tensor:
    """p_R(k | q) = softmax_k(s(q, k) / temperature) over the last dimension (JOMED uses temperature 1).

    ``-inf`` scores mark padding candidates (fewer than K retrieved): they get weight 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if scores.shape[-1] < 1:
        raise ValueError("scores needs at least one candidate in its last dimension")
    if torch.isneginf(scores).all(dim=-1).any():
        raise ValueError("a query has no valid candidate (all scores are -inf); retrieve at least one")
    return torch.softmax(scores.float() / temperature, dim=-1)


def logit_fusion(candidate_class_logits: Tensor, scores: Tensor, temperature: float = 1.0) -> Tensor:
    """The fused ``[..., C]`` answer distribution from ``[..., K, C]`` per-candidate class logits and ``[..., K]``
    retrieval scores (JOMED Inference equation). Rows sum to 1."""
    if candidate_class_logits.dim() < 2 or candidate_class_logits.shape[:-1] != scores.shape:
        raise ValueError(
            f"candidate_class_logits must be [..., K, C] and scores [..., K]; got "
            f"{tuple(candidate_class_logits.shape)} and {tuple(scores.shape)}"
        )
    weights = retrieval_weights(scores, temperature)
    return (class_probs(candidate_class_logits) * weights.unsqueeze(-1)).sum(dim=-2)
