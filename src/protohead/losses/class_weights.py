"""Class weights from *dataset* class counts (never per-batch counts)."""

from __future__ import annotations

import torch


def class_weights(counts: torch.Tensor, scheme: str = "inv_sqrt", beta: float = 0.9999) -> torch.Tensor:
    """Per-class weights normalised to mean 1 over classes.

    Args:
        counts: (C,) number of training samples per class (dataset-level).
        scheme: ``inv_sqrt`` → 1/√n; ``effective_number`` → (1−β)/(1−βⁿ) (Cui et al. 2019);
            ``uniform`` → all ones.
        beta: β of the effective number.

    Returns:
        (C,) float weights with mean 1. Classes with zero count get the largest weight any class gets
        (as if they had one sample); they never change the weights of the other classes.
    """
    counts = counts.to(torch.float64).clamp_min(1.0)
    if scheme == "uniform":
        weights = torch.ones_like(counts)
    elif scheme == "inv_sqrt":
        weights = counts.rsqrt()
    elif scheme == "effective_number":
        weights = (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), counts))
    else:
        raise ValueError(f"unknown class-weight scheme {scheme!r}")
    return (weights / weights.mean()).to(torch.float32)
