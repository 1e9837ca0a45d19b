"""Baseline heads on the same features, with the head's call convention ``(pool, img, labels)``.

- ``linear``: linear layer on the pooled vector, cross-entropy.
- ``linear_la``: the same, trained with logit adjustment (Menon et al. 2021): CE on z + τ·log π.
- ``balanced_softmax``: CE on z + log n_c (Ren et al. 2020) — logit adjustment with τ = 1 on counts.
- ``cosine``: one prototype per class, cosine similarity × learnable temperature, cross-entropy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protohead.density import FeatureDensity, ood_outputs
from protohead.objective import AdjustedCrossEntropy, HeadScores, log_prior
from protohead.validation import check_head_inputs

BASELINES = ("linear", "linear_la", "balanced_softmax", "cosine")


class BaselineHead(nn.Module):
    """A one-layer classifier on the pooled vector (B, F); patch tokens are ignored."""

    def __init__(self, kind: str, num_classes: int, img_feat_dim: int, class_counts: list[int] | None = None,
                 tau: float = 1.0) -> None:
        super().__init__()
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")
        self.kind = kind
        self.num_classes = num_classes
        self.img_feat_dim = img_feat_dim
        self.norm = nn.LayerNorm(img_feat_dim)
        self.linear = nn.Linear(img_feat_dim, num_classes, bias=kind != "cosine")
        if kind == "cosine":
            self.log_temperature = nn.Parameter(torch.tensor(math.log(10.0)))
        counts = torch.zeros(num_classes) if class_counts is None else torch.as_tensor(class_counts,
                                                                                      dtype=torch.float32)
        scale = tau if kind == "linear_la" else 1.0
        self.register_buffer("logit_offset", (scale * log_prior(counts)).float()
                             if kind in ("linear_la", "balanced_softmax") else torch.zeros(num_classes))
        self.feature_density = FeatureDensity()  # fitted after training, as the prototype head's
        self.objective = AdjustedCrossEntropy()

    def score(self, pool_features: torch.Tensor, img_features: torch.Tensor, labels: torch.Tensor | None = None
              ) -> tuple[HeadScores, dict[str, Any]]:
        """Validate and score: ``(scores, outputs)`` as :meth:`protohead.HeadOptimal.score` (no prototypes)."""
        pooled = check_head_inputs(pool_features, img_features, labels, self.img_feat_dim, self.num_classes,
                                   dtype=self.linear.weight.dtype)
        x = self.norm(pooled)
        if self.kind == "cosine":
            weight = F.normalize(self.linear.weight, dim=-1)
            logits = self.log_temperature.exp() * F.linear(F.normalize(x, dim=-1), weight)
        else:
            logits = self.linear(x)
        uncertainty = (1 - logits.softmax(-1).amax(-1)).detach()
        outputs = {"uncertainty": uncertainty, **ood_outputs(self.feature_density, pooled, logits)}
        return HeadScores(logits, state={"logit_offset": self.logit_offset}), outputs

    def forward(self, pool_features: torch.Tensor, img_features: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Returns (logits (B, C), loss | None, info) like :class:`protohead.HeadOptimal`."""
        if labels is None and self.training:
            raise ValueError("labels are required in training mode (call .eval() for inference)")
        scores, outputs = self.score(pool_features, img_features, labels)
        if labels is None:
            return scores.logits, None, {**outputs, "probabilities": scores.logits.softmax(-1).detach()}
        loss, terms = self.objective(scores, labels)
        return scores.logits, loss, terms
