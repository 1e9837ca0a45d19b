"""Class-conditional Gaussians of a head's input features: the out-of-distribution score that survives fine-tuning.

A head scores an image from the backbone's pooled feature vector (B, F) and tokens. After training, the
pooled vectors of the training images are summarised per class by their mean, with one covariance shared by
all classes (Lee et al., NeurIPS 2018, "A simple unified framework for detecting out-of-distribution samples":
class means as the class centres, a tied covariance as the metric). An image's *feature distance* is its
squared Mahalanobis distance to the nearest class mean — higher = further from every class the run has seen.

Why not the prototype similarities alone (``protohead.ood``): they only see the directions the head was trained
to separate. Measured on the official HAM10000 split (``benchmarks/bench_ood.py``, BENCHMARKS §8), the
logit-energy score of the default ``patch`` head reaches far-OOD natural AUROC 0.75–0.80 on frozen features and
0.64–0.86 after partial fine-tuning (3 seeds each; the fine-tuned block maps photos and noise onto lesion
prototypes), while this distance on the same models' pooled features reaches 0.977–1.000 (natural images, noise).

The covariance is shrunk towards a scaled identity, Σ_s = (1 − a)·Σ + a·(tr Σ / F)·I with a =
:data:`DEFAULT_SHRINKAGE`, only so that it is invertible (constant feature dimensions, n < F); AUROC moved by
< 0.01 for a between 0 and 0.3 (at most 0.015 up to 0.6) on both kinds of model
(``benchmarks/bench_feature_ood.py``). The module stores the class means (C, F) and a whitening matrix W (F, F)
with W Wᵀ = Σ_s⁻¹, so the distance is ‖(x − μ_c) W‖².

Pure functions first (:func:`fit_class_gaussians`, :func:`mahalanobis_distances`); :class:`FeatureDensity` holds
the fitted tensors as buffers, so they travel in the checkpoint with the head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_SHRINKAGE = 0.01


def fit_class_gaussians(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        shrinkage: float = DEFAULT_SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the whitening matrix of the shared (tied) covariance, computed in float64.

    Args:
        features: (n, F) finite feature vectors. labels: (n,) class indices in [0, num_classes).
        num_classes: C; every class needs at least one sample.
        shrinkage: a in [0, 1): weight of the scaled identity in the shrunk covariance.

    Returns:
        ``(means (C, F), whitening (F, F))`` float64, with ``whitening @ whitening.T`` the inverse of the
        shrunk covariance.

    Raises:
        ValueError: wrong shapes, non-finite features, labels out of range, a class without samples, a
            shrinkage outside [0, 1), or a covariance that is not positive definite (all features equal).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (n, F), got shape {tuple(features.shape)}")
    if labels.shape != (len(features),):
        raise ValueError(f"labels must be ({len(features)},), got shape {tuple(labels.shape)}")
    if not 0 <= shrinkage < 1:
        raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
    x = features.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    labels = labels.to(torch.int64)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"class(es) {empty} have no samples to fit a feature Gaussian on")
    means = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x) / counts[:, None]
    residuals = x - means[labels]
    covariance = residuals.T @ residuals / len(x)
    scale = torch.trace(covariance) / len(covariance)
    shrunk = (1 - shrinkage) * covariance + shrinkage * scale * torch.eye(len(covariance), dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(shrunk)  # Σ_s = L Lᵀ → Σ_s⁻¹ = L⁻ᵀ L⁻¹ = W Wᵀ with W = L⁻ᵀ
    if int(info) != 0 or not scale > 0:
        raise ValueError("the feature covariance is not positive definite (are all feature vectors equal?); "
                         "raise the shrinkage")
    identity = torch.eye(len(factor), dtype=torch.float64)
    whitening = torch.linalg.solve_triangular(factor, identity, upper=False).T
    return means, whitening


def mahalanobis_distances(features: torch.Tensor, means: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """(B, F) features → (B, C) squared Mahalanobis distances ‖(x − μ_c) W‖², computed in float64.

    Args:
        features: (B, F). means: (C, F) class means. whitening: (F, F), as :func:`fit_class_gaussians` gives it.
    """
    if features.dim() != 2 or features.shape[1] != means.shape[1]:
        raise ValueError(f"features must be (B, {means.shape[1]}), got shape {tuple(features.shape)}")
    whitened = features.detach().to(torch.float64) @ whitening.to(torch.float64)
    centres = means.to(torch.float64) @ whitening.to(torch.float64)
    distances = (whitened.pow(2).sum(1, keepdim=True) - 2 * whitened @ centres.T + centres.pow(2).sum(1)[None])
    return distances.clamp_min(0.0)


class FeatureDensity(nn.Module):
    """Fitted class Gaussians of a head's pooled input features (buffers ``means`` (C, F), ``whitening``
    (F, F)); empty until :meth:`fit`. ``forward`` (B, F) → (B,) squared distance to the nearest class mean."""

    means: torch.Tensor | None
    whitening: torch.Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("means", None)
        self.register_buffer("whitening", None)

    @property
    def fitted(self) -> bool:
        return self.means is not None

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
            shrinkage: float = DEFAULT_SHRINKAGE) -> None:
        """Fit on (n, F) training features and (n,) labels (see :func:`fit_class_gaussians`); stored as float32."""
        means, whitening = fit_class_gaussians(features, labels, num_classes, shrinkage)
        self.means, self.whitening = means.float(), whitening.float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.means is None or self.whitening is None:
            raise RuntimeError("the feature density is not fitted (call fit on training features first)")
        return mahalanobis_distances(features, self.means, self.whitening).amin(dim=1).float()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint of a fitted head holds the buffers; make room for them (an unfitted one holds none)
        for name in ("means", "whitening"):
            if prefix + name in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def ood_outputs(density: FeatureDensity, features: torch.Tensor, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """A head's out-of-distribution outputs for (B, F) pooled features and (B, C) logits: ``ood_score`` (B,) —
    the feature distance when ``density`` is fitted, else the logit energy −logsumexp(logits) — and, when
    fitted, ``feature_distance`` (B,)."""
    if not density.fitted:
        return {"ood_score": -torch.logsumexp(logits.detach(), dim=-1)}
    distance = density(features)
    return {"ood_score": distance, "feature_distance": distance}
