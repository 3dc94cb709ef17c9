from __future__ import annotations

import math

import pytest
import torch

from medrag_ray.losses.kl_distill import candidate_posterior, sharp_perplexity_kl


def test_posterior_normalises_gold_probabilities_over_candidates() -> None:
    p_gold = torch.tensor([[0.9, 0.6, 0.3]])
    expected = p_gold / p_gold.sum()
    assert torch.allclose(candidate_posterior(p_gold.log()), expected, atol=1e-6)


def test_kl_is_zero_when_the_retriever_matches_the_reader() -> None:
    gold = torch.log(torch.tensor([[0.9, 0.6, 0.3], [0.2, 0.5, 0.7]]))
    tau = 0.05
    scores = tau * gold + 0.3  # softmax(s / tau) = p_k (a constant shift does not matter)
    assert sharp_perplexity_kl(gold, scores, tau).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_a_hand_computed_value() -> None:
    gold = torch.log(torch.tensor([[0.8, 0.2]]))  # p = (0.8, 0.2)
    scores = torch.tensor([[0.0, 0.1]])
    tau = 0.1  # p_R = softmax(0, 1) = (1 / (1 + e), e / (1 + e))
    q0, q1 = 1 / (1 + math.e), math.e / (1 + math.e)
    expected = 0.8 * math.log(0.8 / q0) + 0.2 * math.log(0.2 / q1)
    assert sharp_perplexity_kl(gold, scores, tau).item() == pytest.approx(expected, rel=1e-5)


def test_gradient_raises_the_score_of_the_helpful_candidate_only() -> None:
    gold = torch.log(torch.tensor([[0.95, 0.05, 0.05]]))
    scores = torch.zeros(1, 3, requires_grad=True)
    sharp_perplexity_kl(gold, scores, 0.1).backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # descent raises candidate 0, lowers the others
    teacher = gold.clone().requires_grad_(True)
    assert not sharp_perplexity_kl(teacher, torch.zeros(1, 3), 0.1).requires_grad  # the reader is a fixed teacher


def test_padding_candidates_are_ignored_and_errors_name_the_fix() -> None:
    gold = torch.log(torch.tensor([[0.8, 0.2, 0.5]]))
    scores = torch.tensor([[0.3, 0.1, 9.0]])
    mask = torch.tensor([[True, True, False]])
    assert sharp_perplexity_kl(gold, scores, 0.2, mask).item() == pytest.approx(
        sharp_perplexity_kl(gold[:, :2], scores[:, :2], 0.2).item(), rel=1e-6
    )
    assert candidate_posterior(gold, mask)[0, 2] == 0
    with pytest.raises(ValueError, match="at least one valid candidate"):
        sharp_perplexity_kl(gold, scores, 0.2, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="same"):
        sharp_perplexity_kl(gold, scores[:, :2], 0.2)
    with pytest.raises(ValueError, match="temperature"):
        sharp_perplexity_kl(gold, scores, 0.0)
