"""JOMED's Sharp Perplexity Distillation: the frozen reader teaches the retriever which candidates help.

For a query with K retrieved (image, text) candidates, the reader's class-restricted probability of the gold
answer with candidate k prepended, ``p_LVLM_C(a | (i_k, t_k) o (i, q))``, is normalised over the candidates
into the target ``p_k`` (JOMED, "Sequential Multimodal Retriever Fine-Tuning")::

    p_k = exp(log p_LVLM_C(a | k)) / sum_i exp(log p_LVLM_C(a | i))

and the retriever's distribution over the same candidates is ``p_RETR(k) = softmax_k(s_k / tau)``. The loss is
``KL(p_LVLM_C || p_RETR) = sum_k p_k (log p_k - log p_RETR(k))``; only the retriever's scores get gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["candidate_posterior", "sharp_perplexity_kl"]


def _masked(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values
    if mask.shape != values.shape or mask.dtype != torch.bool:
        raise ValueError(f"candidate_mask must be a bool tensor of shape {tuple(values.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    if not mask.any(dim=-1).all():
        raise ValueError("every query needs at least one valid candidate (a row of candidate_mask is all False)")
    return values.masked_fill(~mask, float("-inf"))


def candidate_posterior(gold_logprobs: Tensor, candidate_mask: Tensor | None = None) -> Tensor:
    """``p_k``: the reader's gold-answer log-probabilities ``[B, K]`` (class-restricted, one per candidate)
    normalised over each query's candidates; padding candidates (mask False) get 0."""
    if gold_logprobs.ndim != 2:
        raise ValueError(f"gold_logprobs must be [B, K], got shape {tuple(gold_logprobs.shape)}")
    return torch.softmax(_masked(gold_logprobs.float(), candidate_mask), dim=-1)


def sharp_perplexity_kl(
    gold_logprobs: Tensor,
    retriever_scores: Tensor,
    temperature: float,
    candidate_mask: Tensor | None = None,
) -> Tensor:
    """JOMED's loss ``KL(p_LVLM_C || p_RETR)``, averaged over the batch.

    Args:
        gold_logprobs: ``[B, K]`` ``log p_LVLM_C(a | (i_k, t_k) o (i, q))`` of the frozen reader (no gradient).
        retriever_scores: ``[B, K]`` similarities ``s`` of the query to its candidates under the head trained.
        temperature: tau > 0 of ``p_RETR = softmax(s / tau)``.
        candidate_mask: optional ``[B, K]`` bool, False for padding in ragged candidate lists.
    """
    if retriever_scores.shape != gold_logprobs.shape:
        raise ValueError(
            f"retriever_scores {tuple(retriever_scores.shape)} and gold_logprobs {tuple(gold_logprobs.shape)} "
            "must score the same [B, K] candidates"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    target = candidate_posterior(gold_logprobs.detach(), candidate_mask)
    log_retriever = F.log_softmax(_masked(retriever_scores.float() / temperature, candidate_mask), dim=-1)
    log_target = torch.log(target.clamp_min(torch.finfo(target.dtype).tiny))
    terms = torch.where(target > 0, target * (log_target - log_retriever), torch.zeros_like(target))
    return terms.sum(dim=-1).mean()
