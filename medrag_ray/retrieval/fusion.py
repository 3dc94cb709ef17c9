"""MR-RAG Multimodal Collaborative Retrieval (MCR): a learned fusion of three similarities (MR-RAG Eq. 1).

For a query ``q = (q_img, q_txt)`` and a candidate document ``d = (d_img, d_txt)``::

    score(q, d) = alpha * sim(q_img, d_txt) + beta * sim(q_img, d_img) + gamma * sim(q_txt, d_txt)

with cosine similarities and learnable scalars (alpha, beta, gamma), trained with the candidate-list InfoNCE
of MR-RAG Eq. 2 (:func:`medrag_ray.losses.info_nce.fused_info_nce`): per query, the top-1 document by the
reader's answer confidence is the positive and the bottom-m are negatives.

``weights=(1, 0, 0)`` is plain image->text retrieval (MMed-RAG's retriever). A query without text (MMed-RAG's
report generation has no question) has no ``sim(q_txt, d_txt)``: pass ``sim_txt_txt=None`` and the gamma term
drops out (it contributes nothing, and gamma receives no gradient from such a batch); the other two terms are
unchanged, so scores of text-less queries are comparable among themselves, not with those of queries that
have text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medrag_ray.losses.info_nce import fused_info_nce

__all__ = ["CandidateSims", "FusedScorer", "candidate_sims", "fused_score", "fused_train_step"]


@dataclass(frozen=True)
class CandidateSims:
    """The three ``[B, C]`` cosine similarities of B queries to their C candidates (MR-RAG Eq. 1 inputs).

    ``img_txt = sim(q_img, d_txt)``, ``img_img = sim(q_img, d_img)``, ``txt_txt = sim(q_txt, d_txt)`` or None
    when the queries have no text.
    """

    img_txt: Tensor
    img_img: Tensor
    txt_txt: Tensor | None = None

    def __post_init__(self) -> None:
        if self.img_txt.ndim != 2:
            raise ValueError(f"CandidateSims.img_txt must be [B, C], got shape {tuple(self.img_txt.shape)}")
        for name in ("img_img", "txt_txt"):
            value = getattr(self, name)
            if value is not None and value.shape != self.img_txt.shape:
                raise ValueError(
                    f"CandidateSims.{name} has shape {tuple(value.shape)}, img_txt {tuple(self.img_txt.shape)}: "
                    "all three must score the same queries against the same candidate lists"
                )


def candidate_sims(
    q_img: Tensor,
    d_img: Tensor,
    d_txt: Tensor,
    q_txt: Tensor | None = None,
) -> CandidateSims:
    """Cosine similarities for MR-RAG Eq. 1 from embeddings in one shared space (CLIP-style dual encoder).

    Args:
        q_img: ``[B, D]`` query image embeddings.
        d_img: ``[B, C, D]`` candidate document image embeddings (each query's own candidate list).
        d_txt: ``[B, C, D]`` candidate document text (report) embeddings.
        q_txt: ``[B, D]`` query text embeddings, or None for queries without text.
    """
    if q_img.ndim != 2 or d_img.ndim != 3 or d_txt.shape != d_img.shape or d_img.shape[0] != q_img.shape[0]:
        raise ValueError(
            f"expected q_img [B, D] and d_img, d_txt [B, C, D]; got {tuple(q_img.shape)}, {tuple(d_img.shape)}, "
            f"{tuple(d_txt.shape)}"
        )
    if q_txt is not None and q_txt.shape != q_img.shape:
        raise ValueError(f"q_txt must have q_img's shape {tuple(q_img.shape)}, got {tuple(q_txt.shape)}")
    qi, di, dt = (F.normalize(x, dim=-1) for x in (q_img, d_img, d_txt))

    def sim(q: Tensor, d: Tensor) -> Tensor:
        return torch.einsum("bd,bcd->bc", q, d)

    return CandidateSims(
        img_txt=sim(qi, dt),
        img_img=sim(qi, di),
        txt_txt=None if q_txt is None else sim(F.normalize(q_txt, dim=-1), dt),
    )


def fused_score(sims: CandidateSims, weights: Tensor | Sequence[float]) -> Tensor:
    """MR-RAG Eq. 1: ``alpha * sim(q_img, d_txt) + beta * sim(q_img, d_img) + gamma * sim(q_txt, d_txt)``.

    ``weights`` is ``(alpha, beta, gamma)``; with ``sims.txt_txt is None`` the gamma term drops out.
    Returns ``[B, C]``.
    """
    w = torch.as_tensor(weights, dtype=sims.img_txt.dtype, device=sims.img_txt.device)
    if w.shape != (3,):
        raise ValueError(f"weights must be (alpha, beta, gamma), got shape {tuple(w.shape)}")
    score = w[0] * sims.img_txt + w[1] * sims.img_img
    if sims.txt_txt is not None:
        score = score + w[2] * sims.txt_txt
    return score


class FusedScorer(nn.Module):
    """The MCR adapter: three learnable global scalars (alpha, beta, gamma) over :func:`fused_score`.

    Args:
        init: initial ``(alpha, beta, gamma)``; the default ``(1, 0, 0)`` starts as plain image->text retrieval.
        temperature: tau of the InfoNCE used by :meth:`loss` (MR-RAG Eq. 2).
    """

    def __init__(self, init: Sequence[float] = (1.0, 0.0, 0.0), temperature: float = 0.1) -> None:
        super().__init__()
        if len(init) != 3:
            raise ValueError(f"init must be (alpha, beta, gamma), got {tuple(init)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.weights = nn.Parameter(torch.tensor([float(x) for x in init]))
        self.temperature = float(temperature)

    @property
    def alpha(self) -> float:
        return float(self.weights[0].detach())

    @property
    def beta(self) -> float:
        return float(self.weights[1].detach())

    @property
    def gamma(self) -> float:
        return float(self.weights[2].detach())

    def forward(self, sims: CandidateSims) -> Tensor:
        return fused_score(sims, self.weights.to(sims.img_txt.dtype))

    def loss(self, sims: CandidateSims, positive_mask: Tensor, candidate_mask: Tensor | None = None) -> Tensor:
        """MR-RAG Eq. 2 on the fused scores of each query's candidate list."""
        return fused_info_nce(
            self(sims), positive_mask, temperature=self.temperature, candidate_mask=candidate_mask
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4f}, beta={self.beta:.4f}, gamma={self.gamma:.4f}, temperature={self.temperature}"


def fused_train_step(
    scorer: FusedScorer,
    optimizer: torch.optim.Optimizer,
    sims: CandidateSims,
    positive_mask: Tensor,
    candidate_mask: Tensor | None = None,
) -> float:
    """One gradient step on MR-RAG Eq. 2: ``(alpha, beta, gamma) <- (alpha, beta, gamma) - eta * grad L``.

    Returns the loss before the step. The similarities are treated as constants (the encoders are frozen in
    MR-RAG; only the three weights train).
    """
    scorer.train()
    optimizer.zero_grad(set_to_none=True)
    detached = CandidateSims(
        img_txt=sims.img_txt.detach(),
        img_img=sims.img_img.detach(),
        txt_txt=None if sims.txt_txt is None else sims.txt_txt.detach(),
    )
    loss = scorer.loss(detached, positive_mask, candidate_mask)
    loss.backward()
    optimizer.step()
    return float(loss.detach())
