"""Input checks for the head: every problem is a ``ValueError`` whose message names it."""

from __future__ import annotations

import torch


def check_head_inputs(pool_features: torch.Tensor, img_features: torch.Tensor, labels: torch.Tensor | None,
                      feature_dim: int, num_classes: int) -> torch.Tensor:
    """Validate the head's inputs and return ``img_features`` as (B, F).

    Args:
        pool_features: (B, N, F) patch tokens.
        img_features: (B, F) or (B, 1, F) pooled vector.
        labels: optional (B,) integer class indices.

    One host synchronisation covers all value checks (NaN/Inf, label range).
    """
    for name, tensor in (("pool_features", pool_features), ("img_features", img_features)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if pool_features.dim() != 3:
        raise ValueError(f"pool_features must have shape (B, N, F), got rank {pool_features.dim()} "
                         f"shape {tuple(pool_features.shape)}")
    if img_features.dim() == 3 and img_features.shape[1] == 1:
        img_features = img_features[:, 0]
    if img_features.dim() != 2:
        raise ValueError(f"img_features must have shape (B, F) or (B, 1, F), got shape {tuple(img_features.shape)}")
    batch, tokens, dim = pool_features.shape
    if batch == 0:
        raise ValueError("empty batch: pool_features has B = 0")
    if tokens == 0:
        raise ValueError("pool_features has no tokens (N = 0)")
    if dim != feature_dim:
        raise ValueError(f"pool_features feature size {dim} does not match img_feat_dim={feature_dim}")
    if img_features.shape[1] != feature_dim:
        raise ValueError(f"img_features feature size {img_features.shape[1]} does not match "
                         f"img_feat_dim={feature_dim}")
    if img_features.shape[0] != batch:
        raise ValueError(f"batch sizes differ: pool_features has {batch}, img_features {img_features.shape[0]}")
    flags = [~torch.isfinite(pool_features).all(), ~torch.isfinite(img_features).all()]
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                        torch.uint8, torch.int8):
            raise ValueError(f"labels must be an integer tensor, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        flags.append(((labels < 0) | (labels >= num_classes)).any())
    bad = torch.stack(flags).tolist()
    if bad[0]:
        raise ValueError("pool_features contains NaN or Inf")
    if bad[1]:
        raise ValueError("img_features contains NaN or Inf")
    if labels is not None and bad[2]:
        raise ValueError(f"labels out of range [0, {num_classes}): min {int(labels.min())}, max {int(labels.max())}")
    return img_features
