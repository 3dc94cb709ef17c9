from __future__ import annotations

import math

import pytest
import torch

from medrag_ray.retrieval.logit_fusion import class_probs, logit_fusion, retrieval_weights


def test_logit_fusion_matches_hand_computed_mixture() -> None:
    # Two candidates; class logits give p = (0.5, 0.5) and (e/(1+e), 1/(1+e)); scores (0, ln 3) -> p_R = (1/4, 3/4).
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    scores = torch.tensor([[0.0, math.log(3.0)]])
    p1 = math.e / (1 + math.e)
    expected = [0.25 * 0.5 + 0.75 * p1, 0.25 * 0.5 + 0.75 * (1 - p1)]
    fused = logit_fusion(logits, scores)
    assert fused.shape == (1, 2)
    assert fused[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_logit_fusion_can_overturn_the_top_candidate() -> None:
    # The most similar candidate says "yes" weakly; two slightly less similar ones say "no" strongly.
    logits = torch.tensor([[0.2, 0.0], [0.0, 3.0], [0.0, 3.0]])
    scores = torch.tensor([1.0, 0.8, 0.8])
    fused = logit_fusion(logits, scores)
    assert class_probs(logits[0]).argmax().item() == 0
    assert fused.argmax().item() == 1
    assert fused.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_one_candidate_or_equal_candidates_give_the_reader_distribution() -> None:
    logits = torch.tensor([[[2.0, -1.0]]])
    assert torch.allclose(logit_fusion(logits, torch.tensor([[5.0]])), class_probs(logits[:, 0]))
    same = logits.expand(1, 4, 2)
    assert torch.allclose(logit_fusion(same, torch.randn(1, 4)), class_probs(logits[:, 0]), atol=1e-6)


def test_retrieval_weights_temperature_and_padding() -> None:
    scores = torch.tensor([2.0, 1.0, float("-inf")])
    w = retrieval_weights(scores)
    assert w.tolist() == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1), 0.0], rel=1e-6)
    sharp = retrieval_weights(scores, temperature=0.1)
    assert sharp[0].item() > w[0].item()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        retrieval_weights(scores, temperature=0.0)
    with pytest.raises(ValueError, match="no valid candidate"):
        retrieval_weights(torch.full((2,), float("-inf")))


def test_logit_fusion_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[\.\.\., K, C\]"):
        logit_fusion(torch.zeros(2, 3, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_probs(torch.zeros(3, 1))
