"""Cluster (ProtoPNet pull) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protohead.losses.masked import masked_min


def cluster_loss(distances: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                 weights: torch.Tensor | None = None, reduction: str = "class_mean") -> torch.Tensor:
    """Weighted mean over classes present in the batch of mean_i min_k d(x_i, p_{y_i,k}).

    ``reduction="sample_mean"``: ProtoPNet's plain mean over the batch's samples (``weights`` not used).

    Args:
        distances: (B, C, M) sample-to-prototype distances.
        valid: (C, M) bool valid-slot mask.
        labels: (B,) int64.
        weights: optional (C,) class weights. Only classes present in the batch take weight.

    Returns:
        scalar.
    """
    num_classes = distances.shape[1]
    own = masked_min(distances, valid).gather(1, labels[:, None]).squeeze(1)  # (B,)
    if reduction == "sample_mean":
        return own.mean()
    if reduction != "class_mean":
        raise ValueError(f"unknown cluster reduction {reduction!r}; choose class_mean or sample_mean")
    onehot = F.one_hot(labels, num_classes).to(distances.dtype)  # (B, C)
    per_class_count = onehot.sum(0)
    per_class_sum = onehot.t() @ own
    present = per_class_count > 0
    per_class_mean = per_class_sum / per_class_count.clamp_min(1)
    class_weight = present.to(distances.dtype)
    if weights is not None:
        class_weight = class_weight * weights.to(distances.dtype)
    return (class_weight * per_class_mean).sum() / class_weight.sum()
