"""Similarities between a sample's pooled embedding and its (adapted) prototypes. Pure functions.

Every function returns a pair ``(similarity, distance)`` of the same shape; logits use the similarity,
prototype losses (cluster, separation) use the distance.

- ``cosine``: s = cos(x, p), d = 1 − s.
- ``cosine01`` (ProtoASNet): s = (cos(x, p) + 1) / 2 ∈ [0, 1], d = 1 − s.
- ``l2``: d = ‖x − p‖² / D (squared Euclidean, scaled by the dimension so margins stay meaningful
  whatever D is), s = −d.
- ``log_activation`` (ProtoPNet): d as for ``l2``, s = log((d + 1) / (d + 1e-4)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protohead.losses.masked import masked_max, masked_min

__all__ = ["masked_max", "masked_min", "prototype_similarity"]


def prototype_similarity(embedding: torch.Tensor, prototypes: torch.Tensor,
                         distance: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity and distance of each sample to each prototype.

    Args:
        embedding: (B, D) pooled sample embeddings.
        prototypes: (B, C, M, D) per-sample adapted prototypes, or (C, M, D) shared ones.
        distance: ``cosine``, ``cosine01``, ``l2`` or ``log_activation``.

    Returns:
        (similarity, distance), each (B, C, M).
    """
    if prototypes.dim() == 3:
        return _shared_similarity(embedding, prototypes, distance)
    if distance in ("cosine", "cosine01"):
        dots = torch.einsum("bd,bcmd->bcm", F.normalize(embedding, dim=-1), prototypes)
        sim = dots / prototypes.norm(dim=-1).clamp_min(1e-12)  # no normalised (B, C, M, D) copy
        sim = sim if distance == "cosine" else (sim + 1.0) / 2.0
        return sim, 1.0 - sim
    if distance in ("l2", "log_activation"):
        dim = embedding.shape[-1]
        diff = prototypes - embedding[:, None, None, :]
        dist = diff.pow(2).sum(-1) / dim
        if distance == "l2":
            return -dist, dist
        return torch.log((dist + 1.0) / (dist + 1e-4)), dist
    raise ValueError(f"unknown distance {distance!r}; choose cosine, cosine01, l2 or log_activation")


def _shared_similarity(embedding: torch.Tensor, prototypes: torch.Tensor, distance: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) vs shared (C, M, D) via one matrix product, without a (B, C, M, D) intermediate."""
    num_classes, max_slots, dim = prototypes.shape
    flat = prototypes.reshape(-1, dim)
    if distance in ("cosine", "cosine01"):
        sim = (F.normalize(embedding, dim=-1) @ F.normalize(flat, dim=-1).t()).reshape(-1, num_classes, max_slots)
        sim = sim if distance == "cosine" else (sim + 1.0) / 2.0
        return sim, 1.0 - sim
    if distance in ("l2", "log_activation"):
        sq = embedding.pow(2).sum(-1, keepdim=True) + flat.pow(2).sum(-1) - 2 * embedding @ flat.t()
        dist = (sq.clamp_min(0) / dim).reshape(-1, num_classes, max_slots)
        if distance == "l2":
            return -dist, dist
        return torch.log((dist + 1.0) / (dist + 1e-4)), dist
    raise ValueError(f"unknown distance {distance!r}; choose cosine, cosine01, l2 or log_activation")
