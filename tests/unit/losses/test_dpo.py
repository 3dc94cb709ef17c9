from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medrag_ray.losses.dpo import IGNORE_INDEX, dpo_loss, sequence_logps


def _logps(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_dpo_loss_is_ln2_when_policy_equals_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = -5 * torch.rand(7, generator=gen), -5 * torch.rand(7, generator=gen)
    out = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert torch.equal(out.chosen_rewards, torch.zeros(7))
    assert out.reward_accuracy.item() == 0.0


def test_dpo_loss_matches_hand_computed_value() -> None:
    # Pair 0: chosen log-ratio 1.0 - (-1.0) = 2.0, rejected log-ratio -3.0 - (-2.0) = -1.0 -> margin beta * 3.
    # Pair 1: chosen log-ratio -0.5, rejected log-ratio 0.5 -> margin beta * -1.
    beta = 0.5
    out = dpo_loss(_logps(1.0, -1.5), _logps(-3.0, -1.5), _logps(-1.0, -1.0), _logps(-2.0, -2.0), beta=beta)
    expected = (-math.log(1 / (1 + math.exp(-1.5))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([1.0, -0.25])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.25])
    assert out.reward_accuracy.item() == 0.5
    assert out.reward_margin.item() == pytest.approx((1.5 - 0.5) / 2)


def test_dpo_gradient_moves_chosen_up_and_rejected_down() -> None:
    chosen = torch.tensor([-2.0, -4.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0], requires_grad=True)
    ref_chosen = torch.tensor([-2.5, -3.0], requires_grad=True)
    ref_rejected = torch.tensor([-2.0, -2.0], requires_grad=True)
    dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).loss.backward()
    assert (chosen.grad < 0).all()  # gradient descent raises log pi(y_w|x)
    assert (rejected.grad > 0).all()  # ... and lowers log pi(y_l|x)
    assert ref_chosen.grad is None and ref_rejected.grad is None  # the reference is frozen


def test_dpo_loss_falls_as_the_margin_grows_and_beta_scales_it() -> None:
    ref = _logps(-2.0)
    losses = [dpo_loss(_logps(-2.0 + d), _logps(-2.0 - d), ref, ref, beta=0.1).loss.item() for d in (0, 1, 5)]
    assert losses[0] > losses[1] > losses[2]
    # beta * margin is what matters: beta 0.2 with margin d equals beta 0.1 with margin 2d.
    a = dpo_loss(_logps(-1.0), _logps(-3.0), ref, ref, beta=0.2).loss
    b = dpo_loss(_logps(0.0), _logps(-4.0), ref, ref, beta=0.1).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_dpo_loss_rejects_non_positive_beta(beta: float) -> None:
    x = _logps(-1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=beta)


def test_dpo_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="one \\[B\\] shape"):
        dpo_loss(_logps(-1.0, -2.0), _logps(-1.0), _logps(-1.0), _logps(-1.0), beta=0.1)


def test_sequence_logps_sums_response_tokens_only() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=gen)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 7, 2], [IGNORE_INDEX, 3, 3, IGNORE_INDEX, IGNORE_INDEX]])
    logp = F.log_softmax(logits, dim=-1)
    # Position t predicts token t + 1.
    expected = [
        (logp[0, 1, 4] + logp[0, 2, 7] + logp[0, 3, 2]).item(),
        (logp[1, 0, 3] + logp[1, 1, 3]).item(),
    ]
    assert sequence_logps(logits, labels).tolist() == pytest.approx(expected, rel=1e-6)


def test_sequence_logps_of_a_certain_response_is_zero() -> None:
    logits = torch.full((1, 3, 4), -1e4)
    logits[0, 0, 2] = logits[0, 1, 1] = 1e4
    labels = torch.tensor([[IGNORE_INDEX, 2, 1]])
    assert sequence_logps(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_sequence_logps_rejects_rows_without_response_tokens() -> None:
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [5, IGNORE_INDEX, IGNORE_INDEX]])  # row 1: only the first token
    with pytest.raises(ValueError, match="rows \\[1\\] have no response tokens"):
        sequence_logps(torch.zeros(2, 3, 8), labels)


def test_sequence_logps_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="logits must be \\[B, T, V\\]"):
        sequence_logps(torch.zeros(2, 3, 8), torch.zeros(2, 4, dtype=torch.long))
