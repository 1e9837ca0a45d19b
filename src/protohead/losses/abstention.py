"""ProtoASNet abstention loss (Sacha et al., MICCAI 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def abstention_probability(class_logits: torch.Tensor, abstain_logit: torch.Tensor) -> torch.Tensor:
    """α = softmax([z_1..z_K, z_abstain])[K]: (B, K), (B,) → (B,)."""
    return torch.softmax(torch.cat([class_logits, abstain_logit[:, None]], dim=1), dim=1)[:, -1]


def abstention_loss(class_logits: torch.Tensor, abstain_logit: torch.Tensor, labels: torch.Tensor,
                    scale: float = 0.1, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of the virtual prediction (1−α)·softmax(z) + α·onehot(y), plus scale·mean(−log(1−α)).

    Args:
        class_logits: (B, K).
        abstain_logit: (B,).
        labels: (B,) int64.
        scale: weight of the abstention penalty.
        weights: optional (K,) class weights for the NLL (weighted mean as in cross-entropy).

    Returns:
        (total, penalty): scalars; ``penalty`` = mean(−log(1−α)) before scaling.
    """
    all_logits = torch.cat([class_logits, abstain_logit[:, None]], dim=1)
    log_joint = F.log_softmax(all_logits, dim=1)  # log of p_k(1−α) for k < K, log α at K
    log_alpha = log_joint[:, -1]
    log_p_true = log_joint[:, :-1].gather(1, labels[:, None]).squeeze(1)  # log((1−α) p_y)
    nll = -torch.logaddexp(log_p_true, log_alpha)  # −log((1−α) p_y + α)
    log_one_minus_alpha = torch.logsumexp(log_joint[:, :-1], dim=1)
    penalty = (-log_one_minus_alpha).mean()
    if weights is None:
        nll_mean = nll.mean()
    else:
        sample_weights = weights[labels]
        nll_mean = (sample_weights * nll).sum() / sample_weights.sum()
    return nll_mean + scale * penalty, penalty
