"""Homoscedastic uncertainty weighting of two loss groups (Kendall et al. 2018)."""

from __future__ import annotations

import torch


def uncertainty_weighted_total(classification: torch.Tensor, prototype: torch.Tensor,
                               log_sigma: torch.Tensor) -> torch.Tensor:
    """e^{−s₁}·L_cls + s₁ + e^{−s₂}·L_proto + s₂ with learnable ``log_sigma`` = (s₁, s₂) (2,).

    The total can be negative; callers should report the components too.
    """
    return (torch.exp(-log_sigma[0]) * classification + log_sigma[0]
            + torch.exp(-log_sigma[1]) * prototype + log_sigma[1])
