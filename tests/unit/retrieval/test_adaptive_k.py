from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrag_ray.retrieval.adaptive_k import (
    adaptive_k_gap,
    adaptive_k_gap_batch,
    adaptive_k_ratio,
    adaptive_k_ratio_batch,
)

# ---------------------------------------------------------------- gap rule (paper)


def test_gap_hand_worked_example() -> None:
    scores = [0.9, 0.85, 0.8, 0.4, 0.38]
    # u = log(0.9/0.85)=0.057, log(0.85/0.8)=0.061, log(0.8/0.4)=0.693, log(0.4/0.38)=0.051
    assert math.log(0.8 / 0.4) > 0.5 > math.log(0.85 / 0.8)
    assert adaptive_k_gap(scores, gamma=0.5) == 3
    assert adaptive_k_gap(scores, gamma=0.06) == 2  # 0.061 > 0.06: cut after the second
    assert adaptive_k_gap(scores, gamma=0.05) == 1  # 0.057 > 0.05: the first gap already cuts
    assert adaptive_k_gap(scores, gamma=0.7) == 5  # no gap exceeds gamma: keep all


def test_gap_takes_first_exceeding_gap_not_largest() -> None:
    scores = [1.0, 0.5, 0.45, 0.1]  # u = 0.693, 0.105, 1.504
    assert adaptive_k_gap(scores, gamma=0.6) == 1


def test_gap_threshold_is_strict() -> None:
    scores = [2.0, 1.0]  # u = log 2 exactly
    assert adaptive_k_gap(scores, gamma=math.log(2.0) + 1e-12) == 2
    assert adaptive_k_gap(scores, gamma=math.log(2.0) - 1e-9) == 1


def test_gap_ties_never_cut() -> None:
    assert adaptive_k_gap([0.7, 0.7, 0.7, 0.7], gamma=0.0) == 4
    assert adaptive_k_gap([0.7, 0.7, 0.3], gamma=0.0) == 2


def test_gap_clamped_to_k_min_and_k_max() -> None:
    scores = [0.9, 0.3, 0.29, 0.28]  # first gap log 3 = 1.1 cuts at 1
    assert adaptive_k_gap(scores, gamma=0.5) == 1
    assert adaptive_k_gap(scores, gamma=0.5, k_min=2) == 2
    assert adaptive_k_gap(scores, gamma=5.0) == 4
    assert adaptive_k_gap(scores, gamma=5.0, k_max=3) == 3
    assert adaptive_k_gap(scores, gamma=5.0, k_max=10) == 4  # never more than the candidates
    assert adaptive_k_gap(scores, gamma=0.5, k_min=9) == 4  # k_min above K gives K


def test_gap_single_candidate() -> None:
    assert adaptive_k_gap([0.42], gamma=0.1) == 1
    assert adaptive_k_gap([-0.42], gamma=0.1) == 1


def test_gap_sign_change_is_a_cut_and_all_nonpositive_gives_k_min() -> None:
    assert adaptive_k_gap([0.5, 0.45, 0.0, -0.2], gamma=10.0) == 2
    assert adaptive_k_gap([0.5, 0.45, -0.1], gamma=10.0) == 2
    assert adaptive_k_gap([0.0, -0.1, -0.3], gamma=10.0) == 1
    assert adaptive_k_gap([-0.1, -0.1, -0.3], gamma=10.0, k_min=2) == 2
    # FAISS pads missing results with -FLT_MAX: the sign rule cuts before the padding.
    assert adaptive_k_gap([0.6, 0.55, -3.4e38], gamma=1.0) == 2


def test_gap_softmax_scale_uses_score_differences() -> None:
    logits = [3.0, 2.8, -1.0, -1.2]  # log(p_i/p_{i+1}) = differences: 0.2, 3.8, 0.2
    assert adaptive_k_gap(logits, gamma=1.0, scale="softmax") == 2
    p = np.exp(logits) / np.exp(logits).sum()
    assert math.log(p[1] / p[2]) == pytest.approx(3.8)
    # Shift-invariant, unlike the ratio scale.
    assert adaptive_k_gap([x - 10 for x in logits], gamma=1.0, scale="softmax") == 2
    assert adaptive_k_gap([-1.0, -1.1, -5.0], gamma=1.0, scale="softmax") == 2


def test_gap_accepts_numpy_and_torch() -> None:
    scores = [0.9, 0.85, 0.8, 0.4]
    assert adaptive_k_gap(np.array(scores, dtype=np.float32), gamma=0.5) == 3
    assert adaptive_k_gap(torch.tensor(scores, requires_grad=True), gamma=0.5) == 3


def test_gap_rejects_empty_unsorted_nonfinite_and_bad_params() -> None:
    with pytest.raises(ValueError, match="empty"):
        adaptive_k_gap([], gamma=0.5)
    with pytest.raises(ValueError, match="sorted descending.*argsort"):
        adaptive_k_gap([0.5, 0.9, 0.1], gamma=0.5)
    with pytest.raises(ValueError, match="NaN or inf"):
        adaptive_k_gap([0.5, float("nan")], gamma=0.5)
    with pytest.raises(ValueError, match="gamma"):
        adaptive_k_gap([0.5, 0.4], gamma=-0.1)
    with pytest.raises(ValueError, match="k_min"):
        adaptive_k_gap([0.5, 0.4], gamma=0.1, k_min=0)
    with pytest.raises(ValueError, match="k_max"):
        adaptive_k_gap([0.5, 0.4], gamma=0.1, k_min=3, k_max=2)
    with pytest.raises(ValueError, match="scale"):
        adaptive_k_gap([0.5, 0.4], gamma=0.1, scale="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1-D"):
        adaptive_k_gap([[0.5, 0.4]], gamma=0.1)


def test_gap_batch_matches_rows() -> None:
    rows = [
        [0.9, 0.85, 0.8, 0.4],
        [0.7, 0.7, 0.7, 0.7],
        [0.5, 0.45, -0.1, -0.2],
        [-0.1, -0.2, -0.3, -0.4],
        [1.0, 0.2, 0.19, 0.18],
    ]
    got = adaptive_k_gap_batch(np.array(rows), gamma=0.5, k_max=3)
    assert got.dtype == np.int64
    assert got.tolist() == [3, 3, 2, 1, 1]
    assert got.tolist() == [adaptive_k_gap(r, gamma=0.5, k_max=3) for r in rows]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        adaptive_k_gap_batch(np.array([[0.9, 0.8], [0.1, 0.2]]), gamma=0.5)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        adaptive_k_gap_batch(np.array([0.9, 0.8]), gamma=0.5)


# ---------------------------------------------------------------- ratio rule (reference code)


def test_ratio_hand_worked_example() -> None:
    scores = [0.9, 0.8, 0.6, 0.5]  # S_1/S_i = 1.0, 1.125, 1.5, 1.8
    assert adaptive_k_ratio(scores, tau=1.5, k_max=10) == 2  # 1.5 is not < 1.5
    assert adaptive_k_ratio(scores, tau=1.51, k_max=10) == 3
    assert adaptive_k_ratio(scores, tau=2.0, k_max=10) == 4
    assert adaptive_k_ratio(scores, tau=2.0, k_max=3) == 3  # capped by fixed_k
    assert adaptive_k_ratio(scores, tau=1.01, k_max=3) == 1


def test_ratio_ties_single_and_k_min() -> None:
    assert adaptive_k_ratio([0.4, 0.4, 0.4], tau=1.0001, k_max=5) == 3
    assert adaptive_k_ratio([0.4], tau=1.5, k_max=5) == 1
    assert adaptive_k_ratio([0.9, 0.1], tau=1.5, k_max=5, k_min=2) == 2


def test_ratio_never_keeps_nonpositive_scores() -> None:
    # Read literally, S_1 / S_i < tau would keep a negative S_i (negative ratio); here it is never kept.
    assert adaptive_k_ratio([0.5, 0.45, -0.2], tau=100.0, k_max=5) == 2
    assert adaptive_k_ratio([0.5, 0.0], tau=100.0, k_max=5) == 1
    assert adaptive_k_ratio([-0.5, -0.6], tau=100.0, k_max=5) == 1
    assert adaptive_k_ratio([-0.5, -0.6], tau=100.0, k_max=5, k_min=2) == 2


def test_ratio_softmax_scale() -> None:
    logits = [2.0, 1.8, 1.0, -3.0]  # p_1/p_i = exp(0), exp(0.2), exp(1.0), exp(5.0)
    assert adaptive_k_ratio(logits, tau=math.exp(0.5), k_max=10, scale="softmax") == 2
    assert adaptive_k_ratio(logits, tau=math.exp(1.5), k_max=10, scale="softmax") == 3
    assert adaptive_k_ratio([x - 7 for x in logits], tau=math.exp(1.5), k_max=10, scale="softmax") == 3


def test_ratio_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="tau"):
        adaptive_k_ratio([0.5, 0.4], tau=1.0, k_max=3)
    with pytest.raises(ValueError, match="empty"):
        adaptive_k_ratio(np.zeros(0), tau=1.5, k_max=3)
    with pytest.raises(ValueError, match="sorted descending"):
        adaptive_k_ratio([0.4, 0.5], tau=1.5, k_max=3)
    with pytest.raises(ValueError, match="k_max"):
        adaptive_k_ratio([0.5, 0.4], tau=1.5, k_max=0)


def test_ratio_batch_matches_rows_and_accepts_tensor() -> None:
    rows = [[0.9, 0.8, 0.55, 0.5], [0.5, 0.45, -0.2, -0.3], [0.3, 0.3, 0.3, 0.3]]
    got = adaptive_k_ratio_batch(torch.tensor(rows), tau=1.5, k_max=3)
    assert got.tolist() == [2, 2, 3]
    assert got.tolist() == [adaptive_k_ratio(r, tau=1.5, k_max=3) for r in rows]


def test_rules_differ_where_documented() -> None:
    # A slow steady decline: no consecutive gap is large, but the ratio to the top grows past tau.
    scores = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert adaptive_k_gap(scores, gamma=0.3) == 6
    assert adaptive_k_ratio(scores, tau=1.5, k_max=6) == 4  # 1/0.6 = 1.67 >= 1.5
