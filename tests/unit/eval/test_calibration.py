"""Temperature scaling, ECE and the unknown-domain threshold, by hand and on data with a known temperature."""

from __future__ import annotations

import numpy as np
import pytest

from medrag_ray.eval.calibration import (
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax,
    unknown_threshold,
)


def test_ece_by_hand() -> None:
    # two bins: confidence 0.95 (2 of 2 right: gap 0.05) and 0.6 (1 of 2 right: gap 0.1) -> (0.05 + 0.1) / 2
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.075)
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_fit_temperature_recovers_the_generating_one() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 4.0, size=(4000, 3))
    p = softmax(logits, 2.5)  # labels drawn at T = 2.5: the raw logits are overconfident
    labels = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    assert nll(logits, labels, t) < nll(logits, labels, 1.0) and nll(logits, labels, t) <= nll(logits, labels, 2.0)
    s = calibration_summary(logits, labels, keep=0.95)
    assert s["temperature"] == pytest.approx(t) and s["ece_after"] < s["ece_before"] / 3
    conf = softmax(logits, t).max(axis=1)
    assert np.mean(conf >= s["unknown_threshold"]) == pytest.approx(0.95, abs=0.002)


def test_unknown_threshold_is_a_quantile() -> None:
    conf = np.linspace(0.5, 1.0, 101)
    assert unknown_threshold(conf, 0.9) == pytest.approx(0.55)
    assert unknown_threshold(conf, 1.0) == 0.0
    with pytest.raises(ValueError, match="keep must be in"):
        unknown_threshold(conf, 0.0)
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.zeros(3), np.zeros(3, dtype=int))
