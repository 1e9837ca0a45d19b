"""Orthogonality of each class's prototypes (off by default, §4.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def orthogonality_loss(prototypes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over classes of ‖P̂_c P̂_cᵀ − I‖²_F over the class's valid, L2-normalised prototypes P̂_c.

    Args:
        prototypes: (C, M, D).
        valid: (C, M) bool.

    Returns:
        scalar.
    """
    unit = F.normalize(prototypes, dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (C, M, M)
    eye = torch.eye(prototypes.shape[1], device=prototypes.device, dtype=gram.dtype)
    pair_mask = valid[:, :, None] & valid[:, None, :]
    residual = (gram - eye) * pair_mask
    return residual.pow(2).sum((1, 2)).mean()
