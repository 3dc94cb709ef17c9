"""Direct preference optimisation for RAG-PT (MMed-RAG Eq. 3, the DPO objective of Eq. 4).

* :func:`sequence_logps` -- ``log pi(y | x)``: the summed log-probabilities of a response's tokens under a
  causal LM, from its logits and ``labels`` (``-100`` on the prompt), as the reference code computes them.
* :func:`dpo_loss` -- the sigmoid DPO loss over a batch of (chosen, rejected) pairs and the implicit rewards.

Both pair kinds of RAG-PT use the same loss: for D_cm the two sides carry the same answer with the clean and
the noised image (``x`` differs per side), for D_oa the same image with the right and the wrong answer. The
side-specific inputs only change how the caller computes the four log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medrag_ray.reader.engine import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "DPOOutput", "dpo_loss", "sequence_logps"]


@dataclass(frozen=True)
class DPOOutput:
    """The loss and what trainers log with it (all per pair except ``loss``)."""

    loss: Tensor
    """Scalar: the batch mean of ``-log sigmoid(margin)``."""
    chosen_rewards: Tensor
    """``beta * (log pi_theta(y_w|x) - log pi_ref(y_w|x))``, detached."""
    rejected_rewards: Tensor
    """``beta * (log pi_theta(y_l|x) - log pi_ref(y_l|x))``, detached."""

    @property
    def reward_accuracy(self) -> Tensor:
        """Share of pairs whose chosen reward exceeds the rejected one."""
        return (self.chosen_rewards > self.rejected_rewards).float().mean()

    @property
    def reward_margin(self) -> Tensor:
        return (self.chosen_rewards - self.rejected_rewards).mean()


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``log pi(y|x) = sum_t log p(y_t | x, y_<t)`` over the response tokens of each sequence.

    Args:
        logits: ``[B, T, V]`` next-token logits of a causal LM (position ``t`` predicts token ``t + 1``).
        labels: ``[B, T]`` the input ids with ``ignore_index`` wherever the token is not part of the response.

    Returns:
        ``[B]`` summed log-probabilities (float32). A row without response tokens raises: its DPO term
        would silently be 0, which hides a prompt/answer masking bug.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and labels [B, T]; got logits {tuple(logits.shape)}, labels "
            f"{tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    mask = targets != ignore_index
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"rows {empty} have no response tokens in labels (all {ignore_index}); a DPO pair needs its "
            "answer tokens labelled -- check the prompt masking and max_length truncation"
        )
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(dim=1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> DPOOutput:
    """MMed-RAG Eq. 3 (DPO, Eq. 4): ``L = -E[log sigma(beta log(pi_theta(y_w|x) / pi_ref(y_w|x))
    - beta log(pi_theta(y_l|x) / pi_ref(y_l|x)))]``; the paper writes beta as alpha.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` ``log pi_theta`` of the preferred / dispreferred
            responses (each with its own input: D_cm pairs differ in the image, D_oa pairs in the answer).
        reference_chosen_logps, reference_rejected_logps: ``[B]`` the same under the frozen reference
            ``pi_ref``; gradients through them are not taken.
        beta: the inverse temperature of the implicit reward (MMed-RAG's alpha; 0.1 in the reference code).

    Returns:
        :class:`DPOOutput`. When the policy equals the reference every margin is 0 and the loss is ``ln 2``.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the DPO inverse temperature; 0.1 in MMed-RAG), got {beta}")
    shapes = {
        t.shape for t in (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    }
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"the four log-probability tensors must share one [B] shape, got {sorted(map(tuple, shapes))}")
    chosen = beta * (policy_chosen_logps - reference_chosen_logps.detach())
    rejected = beta * (policy_rejected_logps - reference_rejected_logps.detach())
    loss = -F.logsigmoid(chosen - rejected).mean()
    return DPOOutput(loss=loss, chosen_rewards=chosen.detach(), rejected_rewards=rejected.detach())
