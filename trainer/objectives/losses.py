"""The preference losses, as pure functions of per-sequence log-probabilities (fp32 tensors).

Every function returns per-example losses (the loop sums them and divides by the examples of the
global batch) and the implicit rewards that the metrics report. Conventions:

    logps     sum of log p(token) over an answer's trained tokens, shape (B,)
    ref_*     the same under the reference model (detached)
    lengths   trained tokens per answer (SimPO's length normalisation, the SFT term)

DPO   Rafailov et al. 2023: L = -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r).
      label smoothing eps (conservative DPO, Mitchell 2023): (1-eps) L(h) + eps L(-h).
      robust (rDPO, Chowdhury et al. 2024): ((1-eps) L(h) - eps L(-h)) / (1 - 2 eps), unbiased under flips.
      ipo (Azar et al. 2023): (h - 1/(2 beta))^2.
SimPO Meng et al. 2024: L = -log sigmoid(beta/|y_c| pi_c - beta/|y_r| pi_r - gamma), no reference.
KTO   Ethayarajh et al. 2024: z0 = max(0, KL estimate) (detached), r = pi - ref;
      desirable: w_d (1 - sigmoid(beta (r - z0))), undesirable: w_u (1 - sigmoid(beta (z0 - r))).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "robust")


def dpo_losses(logps_chosen: torch.Tensor, logps_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, rewards of chosen, rewards of rejected), each (B,)."""
    chosen_ratio = logps_chosen - ref_chosen
    rejected_ratio = logps_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * h) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"objective.loss_type={loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_losses(logps_chosen: torch.Tensor, logps_rejected: torch.Tensor, len_chosen: torch.Tensor,
                 len_rejected: torch.Tensor, beta: float, gamma: float
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses, rewards of chosen, rewards of rejected): rewards are beta x the average log-prob."""
    chosen_reward = beta * logps_chosen / len_chosen
    rejected_reward = beta * logps_rejected / len_rejected
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def kto_reference_point(kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> Tuple[float, int]:
    """This batch's contribution to KTO's KL estimate: (sum of log-ratios, count). The caller adds
    the contributions of every rank and takes max(0, sum / count), detached: z0 is a baseline, not
    a term the gradient flows through (as in the paper)."""
    return float((kl_logps - kl_ref_logps).detach().sum()), int(kl_logps.numel())


def kto_losses(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: float, beta: float,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(losses, rewards), each (B,); `desirable` is a boolean (B,) tensor."""
    ratio = logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    return torch.where(desirable, good, bad), beta * ratio.detach()
