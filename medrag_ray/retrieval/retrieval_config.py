"""How a query is retrieved: top-k, which head(s) score, and which adaptive-k rule truncates the list.

A plain frozen dataclass with no torch/faiss import, so job configs in :mod:`medrag_ray.config` can nest it
(``retrieval: RetrievalConfig``) and YAML loading stays fast. Invalid values raise ``ValueError`` naming the
key (``retrieval.<field>``) and the fix; :func:`medrag_ray.config.load_config` re-raises them as
``ConfigError``.

Modes (DESIGN.md features 3, 10, 13):

* ``text``  -- the query image (text head) against document TEXT embeddings: MMed-RAG's image->report
  retrieval, JOMED's text head.
* ``image`` -- the query image (image head) against document IMAGE embeddings: JOMED's image head.
* ``fused`` -- MR-RAG's MCR score ``alpha*sim(q_img, d_txt) + beta*sim(q_img, d_img) + gamma*sim(q_txt, d_txt)``
  re-scored over the union of the top-``candidates`` documents of the text and the image index.

Adaptive-k rules (DESIGN.md feature 4; :mod:`medrag_ray.retrieval.adaptive_k`):

* ``gap``   -- the paper's rule: truncate at the first i with ``log(S_i / S_{i+1}) > gamma``.
* ``ratio`` -- the reference code's rule: keep the candidates with ``S_1 / S_i < tau`` (capped by ``k_max``,
  default ``k``: the code's ``fixed_k``).
* ``none``  -- keep all ``k`` (capped by ``k_max``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

RetrievalMode = Literal["text", "image", "fused"]
AdaptiveRule = Literal["gap", "ratio", "none"]
AdaptiveScale = Literal["ratio", "softmax"]

RETRIEVAL_MODES: tuple[str, ...] = ("text", "image", "fused")
ADAPTIVE_RULES: tuple[str, ...] = ("gap", "ratio", "none")
ADAPTIVE_SCALES: tuple[str, ...] = ("ratio", "softmax")
DEFAULT_CANDIDATE_FACTOR = 4
"""Fused mode without ``candidates``: re-score ``4 * k`` candidates from each index."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """Top-k retrieval, scoring mode and adaptive-k truncation for one query (or one batch)."""

    k: int = 10
    """Documents FAISS returns per query (the top-K the adaptive rule then truncates)."""
    mode: RetrievalMode = "text"
    candidates: int | None = None
    """Fused mode: top-``candidates`` of the text index and of the image index are re-scored (their union);
    None means ``4 * k``. Must be >= k. Ignored by the other modes."""
    adaptive: AdaptiveRule = "gap"
    gamma: float = 0.1
    """Gap rule threshold on ``log(S_i / S_{i+1})`` (>= 0); 0.1 cuts at a drop of more than ~10 %."""
    tau: float = 1.5
    """Ratio rule threshold on ``S_1 / S_i`` (> 1; the reference code uses 1.5)."""
    k_min: int = 1
    k_max: int | None = None
    """Cap on the kept count (None: ``k``). Must satisfy ``k_min <= k_max <= k``."""
    scale: AdaptiveScale = "ratio"
    """``ratio``: the rules on the raw scores (cosines or fused scores; needs positive scores, see adaptive_k).
    ``softmax``: the rules on ``softmax(scores / temperature)`` probabilities (defined for any sign)."""
    temperature: float | None = None
    """Softmax scale only: None uses the domain retriever's CLIP temperature ``1 / logit_scale``, i.e. the
    reference code's ``logit_scale * cos`` scores."""
    fused_weights: tuple[float, float, float] | None = None
    """Fused mode ``(alpha, beta, gamma)``; None uses the weights stored with the retriever (its FusedScorer,
    learned by MR-RAG training; ``(1, 0, 0)`` for an untrained one)."""
    batch_size: int = 64
    """Images per encoder forward (a domain group larger than this is encoded in chunks)."""

    def __post_init__(self) -> None:
        for name in ("k", "k_min", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"retrieval.{name}={value!r} must be an integer >= 1")
        if self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"retrieval.mode={self.mode!r} is not one of {list(RETRIEVAL_MODES)}; pick one")
        if self.adaptive not in ADAPTIVE_RULES:
            raise ValueError(
                f"retrieval.adaptive={self.adaptive!r} is not one of {list(ADAPTIVE_RULES)}; 'gap' is the paper's "
                "rule, 'ratio' the reference code's, 'none' keeps all k"
            )
        if self.scale not in ADAPTIVE_SCALES:
            raise ValueError(f"retrieval.scale={self.scale!r} is not one of {list(ADAPTIVE_SCALES)}")
        if self.k_min > self.k:
            raise ValueError(f"retrieval.k_min={self.k_min} exceeds retrieval.k={self.k}; lower k_min or raise k")
        if self.k_max is not None:
            if not _is_int(self.k_max) or not self.k_min <= self.k_max <= self.k:
                raise ValueError(
                    f"retrieval.k_max={self.k_max!r} must be an integer with k_min ({self.k_min}) <= k_max <= "
                    f"k ({self.k}) (FAISS returns only k candidates), or null for no cap"
                )
        if self.candidates is not None and (not _is_int(self.candidates) or self.candidates < self.k):
            raise ValueError(
                f"retrieval.candidates={self.candidates!r} must be an integer >= retrieval.k ({self.k}) (the fused "
                "score re-ranks these candidates and keeps k), or null for 4*k"
            )
        if not _is_number(self.gamma) or self.gamma < 0:
            raise ValueError(
                f"retrieval.gamma={self.gamma!r} must be a finite number >= 0 (a threshold on log(S_i/S_i+1))"
            )
        if not _is_number(self.tau) or self.tau <= 1:
            raise ValueError(
                f"retrieval.tau={self.tau!r} must be a finite number > 1 (the top-1 candidate has S_1/S_1 = 1)"
            )
        if self.temperature is not None and (not _is_number(self.temperature) or self.temperature <= 0):
            raise ValueError(
                f"retrieval.temperature={self.temperature!r} must be a number > 0, or null for the retriever's "
                "own 1/logit_scale"
            )
        if self.fused_weights is not None:
            weights = tuple(self.fused_weights)
            if len(weights) != 3 or not all(_is_number(w) for w in weights):
                raise ValueError(
                    f"retrieval.fused_weights={self.fused_weights!r} must be three finite numbers "
                    "[alpha, beta, gamma], or null for the retriever's learned weights"
                )
            if not any(w != 0 for w in weights):
                raise ValueError("retrieval.fused_weights are all 0: every candidate would score 0; set one weight")
            object.__setattr__(self, "fused_weights", tuple(float(w) for w in weights))

    @property
    def n_candidates(self) -> int:
        """Candidates per index that fused mode re-scores."""
        return self.candidates if self.candidates is not None else DEFAULT_CANDIDATE_FACTOR * self.k

    @property
    def effective_k_max(self) -> int:
        """``k_max`` or ``k`` when there is no cap."""
        return self.k_max if self.k_max is not None else self.k

    def replace(self, **changes: object) -> RetrievalConfig:
        """A validated copy with ``changes`` applied (e.g. ``cfg.replace(mode="fused")``)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        if self.fused_weights is not None:
            data["fused_weights"] = list(self.fused_weights)
        return data
