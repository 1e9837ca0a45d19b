"""Diversity among the prototypes of one class."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diversity_loss(prototypes: torch.Tensor, valid: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean over classes with ≥ 2 valid prototypes of mean_{j<k} ReLU(cos(p_j, p_k) − threshold).

    Args:
        prototypes: (C, M, D).
        valid: (C, M) bool.

    Returns:
        scalar; 0 if no class has two prototypes.
    """
    unit = F.normalize(prototypes, dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (C, M, M)
    max_slots = prototypes.shape[1]
    upper = torch.ones(max_slots, max_slots, dtype=torch.bool, device=prototypes.device).triu(1)
    pair_mask = valid[:, :, None] & valid[:, None, :] & upper  # (C, M, M)
    penalties = F.relu(cos - threshold) * pair_mask
    pairs = pair_mask.sum((1, 2))
    has_pairs = pairs > 0
    per_class = penalties.sum((1, 2)) / pairs.clamp_min(1)
    return (per_class * has_pairs).sum() / has_pairs.sum().clamp_min(1)
