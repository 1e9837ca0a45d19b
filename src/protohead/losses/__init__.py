"""Loss terms of the design document, each a pure, vectorised function (one file per term)."""

from protohead.losses.abstention import abstention_loss, abstention_probability
from protohead.losses.class_weights import class_weights
from protohead.losses.cluster import cluster_loss
from protohead.losses.contrastive import contrastive_loss, mean_same_class_cosine
from protohead.losses.cross_entropy import cross_entropy_loss
from protohead.losses.diversity import diversity_loss
from protohead.losses.orthogonality import orthogonality_loss
from protohead.losses.separation import separation_loss
from protohead.losses.uncertainty_weighting import uncertainty_weighted_total
from protohead.losses.usage import balanced_assignment, prototype_usage_loss

__all__ = [
    "abstention_loss",
    "abstention_probability",
    "balanced_assignment",
    "class_weights",
    "cluster_loss",
    "contrastive_loss",
    "cross_entropy_loss",
    "diversity_loss",
    "mean_same_class_cosine",
    "orthogonality_loss",
    "prototype_usage_loss",
    "separation_loss",
    "uncertainty_weighted_total",
]
