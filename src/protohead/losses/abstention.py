"""Abstention losses: ProtoASNet's (Sacha et al., MICCAI 2023) and Deep Gamblers' (Liu et al., NeurIPS 2019).

Both score the virtual prediction of a (K + 1)-way softmax whose last output α is the abstention: ProtoASNet
puts all of α on the true class and adds λ·mean(−log(1−α)); Deep Gamblers pays α back at odds 1/o
(payoff o ∈ (1, K]) and needs no penalty: abstaining is worth 1/o of being right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def abstention_probability(class_logits: torch.Tensor, abstain_logit: torch.Tensor) -> torch.Tensor:
    """α = softmax([z_1..z_K, z_abstain])[K]: (B, K), (B,) → (B,)."""
    return torch.softmax(torch.cat([class_logits, abstain_logit[:, None]], dim=1), dim=1)[:, -1]


def abstention_loss(class_logits: torch.Tensor, abstain_logit: torch.Tensor, labels: torch.Tensor,
                    scale: float = 0.1, weights: torch.Tensor | None = None,
                    payoff: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of the virtual prediction (1−α)·softmax(z) + (α / payoff)·onehot(y), plus scale·mean(−log(1−α)).

    ``payoff = 1`` is ProtoASNet's form (with its penalty ``scale``); ``payoff = o > 1`` with ``scale = 0`` is
    Deep Gamblers' loss −log((1−α)·p_y + α/o).

    Args:
        class_logits: (B, K).
        abstain_logit: (B,).
        labels: (B,) int64.
        scale: weight of the abstention penalty.
        weights: optional (K,) class weights for the NLL (weighted mean as in cross-entropy).
        payoff: o ≥ 1, what abstaining pays back (1: all of it).

    Returns:
        (total, penalty): scalars; ``penalty`` = mean(−log(1−α)) before scaling.
    """
    if not 1.0 <= payoff < float("inf"):
        raise ValueError(f"payoff must be finite and ≥ 1, got {payoff}")
    all_logits = torch.cat([class_logits, abstain_logit[:, None]], dim=1)
    log_joint = F.log_softmax(all_logits, dim=1)  # log of p_k(1−α) for k < K, log α at K
    log_alpha = log_joint[:, -1]
    log_p_true = log_joint[:, :-1].gather(1, labels[:, None]).squeeze(1)  # log((1−α) p_y)
    nll = -torch.logaddexp(log_p_true, log_alpha - math.log(payoff))  # −log((1−α) p_y + α / o)
    log_one_minus_alpha = torch.logsumexp(log_joint[:, :-1], dim=1)
    penalty = (-log_one_minus_alpha).mean()
    if weights is None:
        nll_mean = nll.mean()
    else:
        sample_weights = weights[labels]
        nll_mean = (sample_weights * nll).sum() / sample_weights.sum()
    return nll_mean + scale * penalty, penalty
