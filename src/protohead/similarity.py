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

__all__ = ["masked_max", "masked_min", "paired_similarity", "patch_similarity", "prototype_similarity",
           "token_similarity"]


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


def token_similarity(tokens: torch.Tensor, prototypes: torch.Tensor, distance: str = "cosine"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity and distance of every patch token to every prototype (the prototypes are shared).

    Args:
        tokens: (B, N, D) projected patch tokens.
        prototypes: (C, M, D).
        distance: as for :func:`prototype_similarity`.

    Returns:
        (similarity, distance), each (B, C, M, N).
    """
    batch, num_tokens, dim = tokens.shape
    sim, dist = _shared_similarity(tokens.reshape(batch * num_tokens, dim), prototypes, distance)  # (B·N, C, M)
    shape = (batch, *prototypes.shape[:2], num_tokens)
    return (sim.reshape(batch, num_tokens, -1).transpose(1, 2).reshape(shape),
            dist.reshape(batch, num_tokens, -1).transpose(1, 2).reshape(shape))


def patch_similarity(tokens: torch.Tensor, prototypes: torch.Tensor, distance: str = "cosine",
                     pooling: str = "max", sharpness: float = 10.0, return_map: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Patch-grounded similarity: each prototype is scored against the sample's own patch tokens.

    - ``max`` (ProtoPNet): the prototype's similarity to its best-matching token; the evidence is exactly
      that token.
    - ``soft``: the similarity to an attention-pooled mixture of the tokens, ``Σₙ wₙ tₙ`` with
      ``w = softmax(sharpness · sₙ)`` over the tokens' own similarities ``sₙ`` (cosine: a mixture of the
      unit tokens, so its cosine is ``Σ wₙ sₙ / ‖Σ wₙ t̂ₙ‖``); the evidence is the weight map ``w``.
      ``sharpness → ∞`` gives ``max``.

    Args:
        tokens: (B, N, D) projected patch tokens.
        prototypes: (C, M, D).

    Returns:
        (similarity (B, C, M), distance (B, C, M), per-token similarity map (B, C, M, N); with ``return_map``
        false and soft pooling the map is None). The map is on the similarity's own absolute scale; the score is
        its maximum (``max``) or its ``w``-weighted mixture.
    """
    if pooling == "max":
        sim, dist = token_similarity(tokens, prototypes, distance)
        return sim.amax(dim=-1), dist.amin(dim=-1), sim
    if pooling != "soft":
        raise ValueError(f"unknown patch pooling {pooling!r}; choose max or soft")
    if distance not in ("cosine", "cosine01"):
        raise ValueError("soft patch pooling is defined for cosine similarity only")
    # Soft pooling needs the per-token cosines only (no per-token distances): one (B·N, D) × (D, P) product kept
    # in its (B, N, P) layout (softmax and sums over the tokens, dim 1), so no transposed copies; the
    # (B, C, M, N) map is laid out only when asked for.
    batch, num_tokens, dim = tokens.shape
    num_classes, max_slots, _ = prototypes.shape
    unit = F.normalize(tokens, dim=-1)
    flat = F.normalize(prototypes.reshape(-1, dim), dim=-1)
    cosine = (unit.reshape(-1, dim) @ flat.t()).view(batch, num_tokens, -1)  # (B, N, P)
    weights = (sharpness * cosine).softmax(dim=1)  # over the tokens
    gram = unit @ unit.transpose(1, 2)  # (B, N, N)
    squared_norm = ((gram @ weights) * weights).sum(dim=1)  # (B, P): ‖Σₙ wₙ t̂ₙ‖²
    pooled = (weights * cosine).sum(dim=1) / squared_norm.clamp_min(1e-12).sqrt()
    pooled = pooled.view(batch, num_classes, max_slots)
    pooled = pooled if distance == "cosine" else (pooled + 1.0) / 2.0
    token_map = None
    if return_map:
        token_map = cosine.transpose(1, 2).reshape(batch, num_classes, max_slots, num_tokens)
        token_map = token_map if distance == "cosine" else (token_map + 1.0) / 2.0
    return pooled, 1.0 - pooled, token_map


def paired_similarity(first: torch.Tensor, second: torch.Tensor, distance: str = "cosine") -> torch.Tensor:
    """Similarity of each vector in ``first`` (..., D) to the matching one in ``second`` (..., D) → (...)."""
    if distance in ("cosine", "cosine01"):
        sim = (F.normalize(first, dim=-1) * F.normalize(second, dim=-1)).sum(dim=-1)
        return sim if distance == "cosine" else (sim + 1.0) / 2.0
    if distance in ("l2", "log_activation"):
        dist = (first - second).pow(2).sum(dim=-1) / first.shape[-1]
        return -dist if distance == "l2" else torch.log((dist + 1.0) / (dist + 1e-4))
    raise ValueError(f"unknown distance {distance!r}; choose cosine, cosine01, l2 or log_activation")
