from __future__ import annotations

import math

import pytest
import torch

from medrag_ray.retrieval.fusion import (
    CandidateSims,
    FusedScorer,
    candidate_sims,
    fused_score,
    fused_train_step,
)


def _hand_sims(with_text: bool = True) -> CandidateSims:
    return CandidateSims(
        img_txt=torch.tensor([[0.5, 0.1]]),
        img_img=torch.tensor([[0.2, 0.9]]),
        txt_txt=torch.tensor([[0.3, -0.4]]) if with_text else None,
    )


def test_fused_score_hand_made_values() -> None:
    got = fused_score(_hand_sims(), (1.0, 2.0, 0.5))
    # [0.5 + 2*0.2 + 0.5*0.3, 0.1 + 2*0.9 + 0.5*(-0.4)]
    assert torch.allclose(got, torch.tensor([[1.05, 1.7]]))
    assert torch.allclose(fused_score(_hand_sims(), (1.0, 0.0, 0.0)), torch.tensor([[0.5, 0.1]]))


def test_missing_query_text_drops_gamma_term() -> None:
    got = fused_score(_hand_sims(with_text=False), (1.0, 2.0, 0.5))
    assert torch.allclose(got, torch.tensor([[0.9, 1.9]]))
    scorer = FusedScorer(init=(1.0, 2.0, 123.0))
    assert torch.allclose(scorer(_hand_sims(with_text=False)), torch.tensor([[0.9, 1.9]]))
    scorer(_hand_sims(with_text=False)).sum().backward()
    assert scorer.weights.grad is not None and scorer.weights.grad[2].item() == 0.0


def test_candidate_sims_cosines() -> None:
    q_img = torch.tensor([[2.0, 0.0]])
    q_txt = torch.tensor([[0.0, 5.0]])
    d_img = torch.tensor([[[0.0, 2.0], [3.0, 0.0]]])
    d_txt = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    sims = candidate_sims(q_img, d_img, d_txt, q_txt)
    r = 1 / math.sqrt(2)
    assert torch.allclose(sims.img_txt, torch.tensor([[r, 0.0]]))
    assert torch.allclose(sims.img_img, torch.tensor([[0.0, 1.0]]))
    assert sims.txt_txt is not None and torch.allclose(sims.txt_txt, torch.tensor([[r, 1.0]]))
    assert candidate_sims(q_img, d_img, d_txt).txt_txt is None


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="img_img"):
        CandidateSims(img_txt=torch.zeros(2, 3), img_img=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        CandidateSims(img_txt=torch.zeros(3), img_img=torch.zeros(3))
    with pytest.raises(ValueError, match="alpha, beta, gamma"):
        fused_score(_hand_sims(), (1.0, 2.0))
    with pytest.raises(ValueError, match="alpha, beta, gamma"):
        FusedScorer(init=(1.0,))
    with pytest.raises(ValueError, match=r"\[B, C, D\]"):
        candidate_sims(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


def _synthetic(n: int, n_cand: int, seed: int) -> tuple[CandidateSims, torch.Tensor, torch.Tensor]:
    """Only image<->image similarity identifies the positive; the two text similarities are pure noise."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, n_cand, (n,), generator=gen)
    positive = torch.zeros(n, n_cand, dtype=torch.bool)
    positive[torch.arange(n), target] = True
    img_img = 0.1 * torch.randn(n, n_cand, generator=gen) + 0.25 * positive
    sims = CandidateSims(
        img_txt=0.1 * torch.randn(n, n_cand, generator=gen),
        img_img=img_img,
        txt_txt=0.1 * torch.randn(n, n_cand, generator=gen),
    )
    return sims, positive, target


def _top1(scorer: FusedScorer, sims: CandidateSims, target: torch.Tensor) -> float:
    with torch.no_grad():
        return float((scorer(sims).argmax(dim=1) == target).float().mean())


def test_training_moves_weight_to_informative_modality() -> None:
    train, positive, _ = _synthetic(512, 8, seed=0)
    test, _, test_target = _synthetic(1024, 8, seed=1)
    scorer = FusedScorer(init=(1.0, 0.0, 0.0), temperature=0.1)
    baseline = _top1(scorer, test, test_target)  # plain image->text retrieval: chance level here
    assert baseline < 0.25
    optimizer = torch.optim.Adam(scorer.parameters(), lr=0.05)
    losses = [fused_train_step(scorer, optimizer, train, positive) for _ in range(100)]
    assert scorer.beta > 0.5
    assert abs(scorer.beta) > 3 * abs(scorer.alpha) and abs(scorer.beta) > 3 * abs(scorer.gamma)
    trained = _top1(scorer, test, test_target)
    assert trained > baseline + 0.4
    assert trained > 0.75
    assert losses[-1] < losses[0] - 0.5


def test_first_step_gradient_raises_beta() -> None:
    train, positive, _ = _synthetic(128, 6, seed=2)
    scorer = FusedScorer()
    optimizer = torch.optim.SGD(scorer.parameters(), lr=0.1)
    fused_train_step(scorer, optimizer, train, positive)
    assert scorer.beta > 0.0
    assert abs(scorer.beta) > abs(scorer.alpha - 1.0) and abs(scorer.beta) > abs(scorer.gamma)
