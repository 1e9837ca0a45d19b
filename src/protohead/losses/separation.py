"""Separation (push-away) loss: margin form (§2.2) or ProtoPNet's unbounded form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protohead.losses.masked import masked_min


def separation_loss(distances: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor,
                    margin: float = 0.3, form: str = "margin") -> torch.Tensor:
    """Penalise samples close to prototypes of other classes.

    Args:
        distances: (B, C, M).
        valid: (C, M) bool.
        labels: (B,) int64.
        margin: used by the margin form.
        form: ``margin`` → mean_i ReLU(margin − min_{c≠y_i, k} d); ``unbounded`` → mean_i min_{c≠y_i, k} d
            (ProtoPNet; the preset gives it a negative coefficient).

    Returns:
        scalar; 0 when there is only one class.
    """
    num_classes = distances.shape[1]
    if num_classes < 2:
        return distances.new_zeros(())
    per_class_min = masked_min(distances, valid)  # (B, C)
    own = F.one_hot(labels, num_classes).bool()
    nearest_other = per_class_min.masked_fill(own, float("inf")).amin(dim=1)  # (B,)
    if form == "margin":
        return F.relu(margin - nearest_other).mean()
    if form == "unbounded":
        return nearest_other.mean()
    raise ValueError(f"unknown separation form {form!r}; choose margin or unbounded")
