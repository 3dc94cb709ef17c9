"""Confidence calibration of the domain router: temperature scaling, expected calibration error, unknown domain.

* **Temperature scaling** (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, §4.2): one scalar
  ``T > 0`` divides the logits, ``p = softmax(z / T)``; ``T`` minimises the negative log-likelihood on a held-out
  (validation) set. The argmax, hence accuracy, is unchanged.
* **Expected calibration error** (Guo et al., Eq. 3; Naeini et al. 2015): ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|``
  over ``n_bins`` equal-width confidence bins.
* **Unknown domain**: the maximum calibrated probability (Hendrycks & Gimpel, ICLR 2017's baseline detector)
  below a threshold means "not one of the router's domains". :func:`unknown_threshold` sets it so a share
  ``keep`` of the validation images (all of known domains) stay above it, the usual operating point for an
  out-of-distribution detector chosen without out-of-distribution data.
"""

from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
_T_GRID = np.exp(np.linspace(math.log(0.05), math.log(20.0), 121))


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``log softmax(logits / T)`` per row, computed stably."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits, temperature))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` (class indices) under ``softmax(logits / T)``."""
    return float(-log_softmax(logits, temperature)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising :func:`nll` on ``(logits, labels)``: a log-spaced grid over [0.05, 20], then golden-section
    refinement between the grid neighbours of the best point (NLL is convex in ``1/T``)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"fit_temperature needs logits [n, classes] and n labels, got {logits.shape}, {labels.shape}")
    losses = [nll(logits, labels, t) for t in _T_GRID]
    best = int(np.argmin(losses))
    lo, hi = math.log(_T_GRID[max(0, best - 1)]), math.log(_T_GRID[min(len(_T_GRID) - 1, best + 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(logits, labels, math.exp(a)) < nll(logits, labels, math.exp(b)):
            hi = b
        else:
            lo = a
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE of the argmax predictions of ``probs`` [n, classes] against ``labels`` (class indices)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    return confidence_ece(probs.max(axis=1), probs.argmax(axis=1) == labels, n_bins)


def confidence_ece(confidences: np.ndarray, right: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE from each prediction's confidence and whether it was right."""
    conf = np.asarray(confidences, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    if len(conf) == 0:
        return float("nan")
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        members = bins == b
        if members.any():
            total += members.mean() * abs(right[members].mean() - conf[members].mean())
    return float(total)


def unknown_threshold(confidences: np.ndarray, keep: float) -> float:
    """The confidence below which an image is of an unknown domain: the ``1 - keep`` quantile of the validation
    images' confidences (``keep=1`` never flags a known-domain validation image: threshold 0)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if keep == 1.0:
        return 0.0
    return float(np.quantile(np.asarray(confidences, dtype=np.float64), 1.0 - keep))


def calibration_summary(logits: np.ndarray, labels: np.ndarray, keep: float) -> dict[str, float]:
    """Fit ``T`` on ``(logits, labels)``; ECE and NLL before and after; the unknown-domain threshold at ``keep``."""
    temperature = fit_temperature(logits, labels)
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, temperature),
        "unknown_threshold": unknown_threshold(after.max(axis=1), keep),
        "unknown_keep": keep,
        "n": int(len(labels)),
    }
