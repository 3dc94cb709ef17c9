"""Paired bootstrap confidence intervals for the difference of two evaluation rows on the same questions.

Two rows of an ablation (say "+ retrieval" and "no retrieval") answer the *same* questions, so their
accuracies are correlated; the paired bootstrap resamples questions (with replacement) and recomputes
``mean(correct_a) - mean(correct_b)`` on each resample, keeping the pairing. The 95% interval is the
2.5th / 97.5th percentile of those differences (percentile bootstrap, Efron & Tibshirani 1993, ch. 13).
Resampling is seeded, so the same rows give the same interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_RESAMPLES = 2000


@dataclass(frozen=True)
class PairedDifference:
    """``mean(a) - mean(b)`` over paired questions with its percentile-bootstrap interval."""

    difference: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float

    @property
    def above_zero(self) -> bool:
        return self.ci_low > 0.0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_bootstrap(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    n_resamples: int = N_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Accuracy of ``a`` minus accuracy of ``b`` (0/1 per question, same questions in the same order)."""
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired rows must be 1-D and of one length, got shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        raise ValueError("paired_bootstrap needs at least one question")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = a - b
    rng = np.random.default_rng(seed)
    resampled = np.empty(n_resamples)
    for start in range(0, n_resamples, 500):  # chunks bound the index matrix's memory
        stop = min(n_resamples, start + 500)
        idx = rng.integers(0, len(diff), size=(stop - start, len(diff)))
        resampled[start:stop] = diff[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), len(diff), confidence)


def bootstrap_interval(
    correct: np.ndarray, n_resamples: int = N_RESAMPLES, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of one row's accuracy (the paired difference against a row of zeros)."""
    a = np.asarray(correct, dtype=np.float64)
    d = paired_bootstrap(a, np.zeros_like(a), n_resamples, confidence, seed)
    return d.ci_low, d.ci_high
