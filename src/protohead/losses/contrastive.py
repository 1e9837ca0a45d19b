"""Prototype-level contrastive loss: different-class pairs (fixed, §4.2) or all pairs (legacy, §2.3).

Computed in O(C·M·D) from sums of unit vectors instead of the (C·M)² cosine matrix:
Σ_{i≠j} uᵢ·uⱼ = ‖Σᵢ uᵢ‖² − Σᵢ ‖uᵢ‖², and over different-class pairs ‖Σᵢ uᵢ‖² − Σ_c ‖Σ_{i∈c} uᵢ‖².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(prototypes: torch.Tensor, valid: torch.Tensor, pairs: str = "different_class") -> torch.Tensor:
    """Mean cosine similarity over ordered pairs of valid prototypes.

    Args:
        prototypes: (C, M, D).
        valid: (C, M) bool.
        pairs: ``different_class`` (only prototypes of different classes) or ``all`` (every pair j ≠ k,
            same class included — the defect the document analyses, kept to measure it).

    Returns:
        scalar; 0 if there is no such pair.
    """
    unit = F.normalize(prototypes, dim=-1) * valid[..., None]  # (C, M, D), unused slots zeroed
    per_class_sum = unit.sum(dim=1)  # (C, D)
    total_sum = per_class_sum.sum(dim=0)  # (D,)
    per_class_count = valid.sum(dim=1).to(prototypes.dtype)
    count = per_class_count.sum()
    if pairs == "different_class":
        pair_sum = total_sum.pow(2).sum() - per_class_sum.pow(2).sum()
        pair_count = count.pow(2) - per_class_count.pow(2).sum()
    elif pairs == "all":
        pair_sum = total_sum.pow(2).sum() - unit.pow(2).sum()
        pair_count = count * (count - 1)
    else:
        raise ValueError(f"unknown contrastive pairs {pairs!r}; choose different_class or all")
    return pair_sum / pair_count.clamp_min(1)


def mean_same_class_cosine(prototypes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Diagnostic for §2.3: mean cosine over pairs of valid prototypes of the same class ((C, M, D) → scalar)."""
    unit = F.normalize(prototypes, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    eye = torch.eye(prototypes.shape[1], dtype=torch.bool, device=prototypes.device)
    pair_mask = valid[:, :, None] & valid[:, None, :] & ~eye
    return (cos * pair_mask).sum() / pair_mask.sum().clamp_min(1)
