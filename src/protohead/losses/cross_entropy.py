"""Cross-entropy on prototype logits, optionally class-weighted and focal."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                       focal_gamma: float = 0.0) -> torch.Tensor:
    """Weighted (focal) cross-entropy.

    Args:
        logits: (B, C).
        labels: (B,) int64.
        weights: optional (C,) class weights; the result is Σ w_{y_i} ℓ_i / Σ w_{y_i}.
        focal_gamma: γ ≥ 0; ℓ_i is multiplied by (1 − p_{i,y_i})^γ (Lin et al.).

    Returns:
        scalar.
    """
    log_probs = F.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    if focal_gamma > 0:
        nll = nll * (1.0 - nll.neg().exp()).pow(focal_gamma)
    if weights is None:
        return nll.mean()
    sample_weights = weights[labels]
    return (sample_weights * nll).sum() / sample_weights.sum()
