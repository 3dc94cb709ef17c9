"""Adaptive retrieved-context selection: how many of the top-K retrieved reports to keep.

Two rules, named after where they come from (DESIGN.md, "What MMed-RAG's public reference code does"):

* :func:`adaptive_k_gap` -- the paper's rule (MMed-RAG Sec. 2.2): ``u_i = log(S_i / S_{i+1})``; truncate at
  the first i where ``u_i > gamma`` and keep the first i candidates.
* :func:`adaptive_k_ratio` -- the reference code's rule: keep candidates with ``S_1 / S_i < tau``, capped by
  ``k_max`` (the code's ``fixed_k``).

Both take the retriever's scores of one query, sorted descending as a FAISS inner-product search returns
them, and return k; ``*_batch`` variants take a ``[B, K]`` array (or CPU tensor) and return ``[B]`` int64.

Edge cases (identical for both rules and both scales):

* Empty input or ``K == 0``: ``ValueError``. NaN or inf scores: ``ValueError``. FAISS's inner-product padding
  for missing results (``-3.4e38``, id -1) is finite, sorts last and is cut by the sign rule below.
* Unsorted input: ``ValueError`` naming the fix. The scores are paired with document ids, so sorting them here
  would silently desynchronize them; sort scores and ids together upstream (``np.argsort(-scores)``).
* Ties: ``u_i = 0`` never exceeds ``gamma >= 0`` and ``S_1 / S_i = 1 < tau``, so ties never cut.
* ``scale="ratio"`` (default, the papers' literal scores) needs positive scores for the logarithm. A sign
  change ``S_i > 0 >= S_{i+1}`` is a cut (the limit ``S_{i+1} -> 0+`` gives ``u_i -> +inf``; a non-positive
  similarity carries no evidence of relevance), and with the ratio rule a non-positive ``S_i`` is never kept.
  If even ``S_1 <= 0`` nothing is positively relevant and the result is ``k_min``.
* ``scale="softmax"`` compares softmax probabilities ``p = softmax(S)`` instead, which is defined for any real
  scores (``logit_scale * cos`` logits can be negative): ``log(p_i / p_{i+1}) = S_i - S_{i+1}`` and
  ``p_1 / p_i < tau  <=>  S_1 - S_i < log(tau)``. Shift-invariant; scale the scores (logit scale) to tune it.
* The result is clamped to ``[k_min, min(k_max, K)]``; ``k_min`` larger than K gives K (never more than
  the candidates there are). ``K == 1`` always gives 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "Scale",
    "adaptive_k_gap",
    "adaptive_k_gap_batch",
    "adaptive_k_ratio",
    "adaptive_k_ratio_batch",
]

Scale = Literal["ratio", "softmax"]


def adaptive_k_gap(
    scores: Sequence[float] | np.ndarray | Any,
    gamma: float,
    k_min: int = 1,
    k_max: int | None = None,
    *,
    scale: Scale = "ratio",
) -> int:
    """The paper's gap rule (MMed-RAG Sec. 2.2): ``u_i = log(S_i / S_{i+1})``, keep i at the first ``u_i > gamma``.

    Example: scores ``[0.9, 0.85, 0.8, 0.4]``, ``gamma = 0.5``: u = (0.057, 0.061, 0.693) -> k = 3.
    If no gap exceeds gamma every candidate is kept (then capped by ``k_max``). See the module docstring
    for ties, non-positive scores, unsorted and empty input.
    """
    return int(adaptive_k_gap_batch(_as_row(scores), gamma, k_min, k_max, scale=scale)[0])


def adaptive_k_gap_batch(
    scores: np.ndarray | Any,
    gamma: float,
    k_min: int = 1,
    k_max: int | None = None,
    *,
    scale: Scale = "ratio",
) -> np.ndarray:
    """:func:`adaptive_k_gap` per row of a ``[B, K]`` score array (MMed-RAG Sec. 2.2); returns ``[B]`` int64."""
    s = _as_matrix(scores)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0 (a threshold on log-ratios >= 0), got {gamma}")
    lo, hi = _bounds(s.shape[1], k_min, k_max)
    cur, nxt = s[:, :-1], s[:, 1:]
    if scale == "ratio":
        both_pos = (cur > 0) & (nxt > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = cur / nxt
        u = np.log(np.where(both_pos, ratio, 1.0))  # 0 where the log-ratio is undefined: never a cut (gamma >= 0)
        cut = (u > gamma) | ((cur > 0) & (nxt <= 0))
        nothing_relevant = s[:, 0] <= 0
    elif scale == "softmax":
        cut = (cur - nxt) > gamma
        nothing_relevant = np.zeros(s.shape[0], dtype=bool)
    else:
        raise ValueError(f"scale must be 'ratio' or 'softmax', got {scale!r}")
    # First cut at 0-based gap position j keeps j + 1 candidates; no cut keeps all K.
    # Append an always-true column so argmax is defined (K == 1 has no gaps) and "no cut" lands on K.
    cut = np.concatenate([cut, np.ones((s.shape[0], 1), dtype=bool)], axis=1)
    k = cut.argmax(axis=1) + 1
    k = np.where(nothing_relevant, lo, k)
    return np.clip(k, lo, hi).astype(np.int64)


def adaptive_k_ratio(
    scores: Sequence[float] | np.ndarray | Any,
    tau: float,
    k_max: int,
    k_min: int = 1,
    *,
    scale: Scale = "ratio",
) -> int:
    """The reference code's rule (MMed-RAG repository; DESIGN.md): keep candidates with ``S_1 / S_i < tau``.

    Capped by ``k_max`` (the code's ``fixed_k``). Example: scores ``[0.9, 0.8, 0.6, 0.5]``, ``tau = 1.5``:
    ratios (1.0, 1.125, 1.5, 1.8) -> k = 2 (1.5 is not < 1.5). ``tau`` must be > 1 so that S_1 itself
    qualifies. Non-positive scores are never kept under ``scale="ratio"`` (see the module docstring).
    """
    return int(adaptive_k_ratio_batch(_as_row(scores), tau, k_max, k_min, scale=scale)[0])


def adaptive_k_ratio_batch(
    scores: np.ndarray | Any,
    tau: float,
    k_max: int,
    k_min: int = 1,
    *,
    scale: Scale = "ratio",
) -> np.ndarray:
    """:func:`adaptive_k_ratio` per row of a ``[B, K]`` score array; returns ``[B]`` int64."""
    s = _as_matrix(scores)
    if not (math.isfinite(tau) and tau > 1):
        raise ValueError(f"tau must be a finite number > 1 (the top-1 candidate has ratio 1), got {tau}")
    lo, hi = _bounds(s.shape[1], k_min, k_max)
    top = s[:, :1]
    if scale == "ratio":
        positive = s > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = top / np.where(positive, s, 1.0)
        keep = positive & (top > 0) & (ratio < tau)
    elif scale == "softmax":
        keep = (top - s) < math.log(tau)
    else:
        raise ValueError(f"scale must be 'ratio' or 'softmax', got {scale!r}")
    # Scores are sorted, so the kept set is a prefix; count the leading run to be exact under float noise.
    k = np.cumprod(keep, axis=1).sum(axis=1)
    return np.clip(k, lo, hi).astype(np.int64)


def _bounds(n_candidates: int, k_min: int, k_max: int | None) -> tuple[int, int]:
    if isinstance(k_min, bool) or not isinstance(k_min, int | np.integer) or k_min < 1:
        raise ValueError(f"k_min must be an int >= 1, got {k_min!r}")
    if k_max is not None:
        if isinstance(k_max, bool) or not isinstance(k_max, int | np.integer) or k_max < k_min:
            raise ValueError(f"k_max must be an int >= k_min ({k_min}) or None for no cap, got {k_max!r}")
    hi = n_candidates if k_max is None else min(int(k_max), n_candidates)
    return min(int(k_min), hi), hi


def _to_numpy(scores: Any) -> np.ndarray:
    if hasattr(scores, "detach"):  # a torch tensor, without importing torch here
        scores = scores.detach().cpu().float().numpy()
    return np.asarray(scores, dtype=np.float64)


def _as_row(scores: Any) -> np.ndarray:
    s = _to_numpy(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one query's top-K), got shape {s.shape}; use the *_batch variant")
    return s[None, :]


def _as_matrix(scores: Any) -> np.ndarray:
    s = _to_numpy(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be [B, K], got shape {s.shape}; add a batch dim with scores[None]")
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"empty scores (shape {s.shape}): retrieve at least one candidate per query")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; drop padded candidates (FAISS id -1) before adaptive-k")
    bad = np.nonzero((s[:, 1:] > s[:, :-1]).any(axis=1))[0]
    if bad.size:
        raise ValueError(
            f"scores must be sorted descending per row (rows {bad[:10].tolist()} are not); sort scores and their "
            "document ids together upstream, e.g. order = np.argsort(-scores, axis=1, kind='stable')"
        )
    return s
