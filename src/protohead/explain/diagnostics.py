"""Prototype diagnostics (SPEC §5): purity, near-duplicates and dead prototypes. Pure functions.

Inputs are tensors or arrays, outputs plain JSON-ready dicts. Prototype identities are ``(class, slot)``
pairs; only valid slots (``valid[c, k]``) are reported.

- purity: the share of a prototype's ``k`` nearest projected training tokens (nearest under the head's own
  similarity) that come from images of the prototype's class;
- near-duplicates: pairs of valid prototypes whose cosine similarity exceeds a threshold (0.95);
- dead prototypes: valid prototypes that are never the winning prototype of their class on a split (val).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protohead.similarity import prototype_similarity

TokenBatches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""Batches of (tokens (B, N, D) or (B, N, F) before projection, labels (B,))."""


def _name(class_names: Sequence[str] | None, c: int) -> str:
    return str(class_names[c]) if class_names is not None else str(c)


def _valid_pairs(valid: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(c), int(k)) for c, k in torch.as_tensor(valid).bool().nonzero().tolist()]


@torch.no_grad()
def purity(prototypes: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray, token_batches: TokenBatches,
           k: int = 50, distance: str = "cosine", project: Callable[[torch.Tensor], torch.Tensor] | None = None,
           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Purity of every valid prototype: the share of its ``k`` nearest training tokens from its own class.

    Vectorised per batch: each batch's (B·N, C·M) similarities are merged into a running top-``k`` per
    prototype, so memory stays O((k + B·N)·C·M) whatever the training-set size.

    Args:
        prototypes: (C, M, D) prototype vectors.
        valid: (C, M) bool mask of valid slots.
        token_batches: iterable of (tokens (B, N, D), labels (B,)); tokens already projected unless
            ``project`` is given, in which case ``project`` maps (B, N, F) → (B, N, D) (e.g. ``head.proj``).
        k: neighbours per prototype (capped at the number of training tokens).
        distance: the head's similarity (``cosine``, ``l2`` or ``log_activation``); nearer = more similar.
        class_names: optional names for the report.

    Returns:
        ``{"k": k_used, "distance", "prototypes": [{"class", "class_name", "slot", "purity"}], "mean",
        "per_class": {name: mean purity}}``.
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    prototypes = torch.as_tensor(prototypes, dtype=torch.float32)
    valid = torch.as_tensor(valid).bool()
    num_classes, max_slots, dim = prototypes.shape
    best_sim = torch.empty(0, num_classes * max_slots)  # (k', C·M) running top-k similarities
    best_label = torch.empty(0, num_classes * max_slots, dtype=torch.long)
    for tokens, labels in token_batches:
        tokens = torch.as_tensor(tokens, dtype=torch.float32)
        if project is not None:
            tokens = project(tokens)
        batch, num_tokens, _ = tokens.shape
        flat = tokens.reshape(batch * num_tokens, dim)
        sim, _ = prototype_similarity(flat, prototypes, distance)  # (B·N, C, M)
        token_labels = torch.as_tensor(labels, dtype=torch.long).repeat_interleave(num_tokens)
        sims = torch.cat([best_sim, sim.reshape(batch * num_tokens, -1)])
        labels_all = torch.cat([best_label, token_labels[:, None].expand(-1, num_classes * max_slots)])
        keep = min(k, sims.shape[0])
        best_sim, where = sims.topk(keep, dim=0)  # (keep, C·M)
        best_label = labels_all.gather(0, where)
    if best_sim.shape[0] == 0:
        raise ValueError("purity needs at least one training token")
    own = torch.arange(num_classes).repeat_interleave(max_slots)  # (C·M,) class of each slot
    share = (best_label == own[None]).float().mean(dim=0).reshape(num_classes, max_slots)
    rows = [{"class": c, "class_name": _name(class_names, c), "slot": s, "purity": float(share[c, s])}
            for c, s in _valid_pairs(valid)]
    per_class: dict[str, float] = {}
    for c in range(num_classes):
        values = [row["purity"] for row in rows if row["class"] == c]
        if values:
            per_class[_name(class_names, c)] = float(np.mean(values))
    return {"k": int(best_sim.shape[0]), "distance": distance, "prototypes": rows,
            "mean": float(np.mean([row["purity"] for row in rows])) if rows else float("nan"),
            "per_class": per_class}


@torch.no_grad()
def near_duplicates(prototypes: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray,
                    threshold: float = 0.95, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Pairs of valid prototypes (any classes) whose cosine similarity exceeds ``threshold``.

    Args:
        prototypes: (C, M, D) prototype vectors.
        valid: (C, M) bool mask.
        threshold: cosine above which two prototypes count as near-duplicates.

    Returns:
        ``{"threshold", "pairs": [{"a": {"class", "class_name", "slot"}, "b": {...}, "cosine", "same_class"}],
        "count"}``, pairs sorted by decreasing cosine.
    """
    prototypes = torch.as_tensor(prototypes, dtype=torch.float32)
    slots = _valid_pairs(torch.as_tensor(valid))
    pairs: list[dict[str, Any]] = []
    if len(slots) >= 2:
        index = torch.tensor(slots)
        vectors = F.normalize(prototypes[index[:, 0], index[:, 1]], dim=-1)  # (P, D)
        cosine = vectors @ vectors.t()
        upper = torch.triu(torch.ones_like(cosine, dtype=torch.bool), diagonal=1)
        for i, j in ((cosine > threshold) & upper).nonzero().tolist():
            (ca, sa), (cb, sb) = slots[i], slots[j]
            pairs.append({"a": {"class": ca, "class_name": _name(class_names, ca), "slot": sa},
                          "b": {"class": cb, "class_name": _name(class_names, cb), "slot": sb},
                          "cosine": float(cosine[i, j]), "same_class": ca == cb})
    pairs.sort(key=lambda pair: -pair["cosine"])
    return {"threshold": threshold, "pairs": pairs, "count": len(pairs)}


def win_counts(winners: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray,
               labels: torch.Tensor | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """How often each slot is the winning prototype of its class.

    Args:
        winners: (n, C) winning slot of every class for each image (``info["winning_prototype"]``).
        valid: (C, M) bool mask.
        labels: optional (n,) true labels.

    Returns:
        (all (C, M), own (C, M)) int64 counts: over all ``n`` images, and over the images of the slot's own
        class (zeros without ``labels``).
    """
    winners = np.asarray(torch.as_tensor(winners).cpu(), dtype=np.int64)
    num_classes, max_slots = np.asarray(torch.as_tensor(valid).cpu()).shape
    counts = np.zeros((num_classes, max_slots), dtype=np.int64)
    own = np.zeros_like(counts)
    for c in range(num_classes):
        counts[c] = np.bincount(winners[:, c], minlength=max_slots)[:max_slots]
        if labels is not None:
            mask = np.asarray(labels) == c
            own[c] = np.bincount(winners[mask, c], minlength=max_slots)[:max_slots]
    return counts, own


def dead_prototypes(winners: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray,
                    labels: torch.Tensor | np.ndarray | None = None,
                    class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Valid prototypes that are never the winning prototype of their class on the given images.

    A prototype that never wins its class's max over slots never sets any logit on those images.

    Args:
        winners: (n, C) winning slot per class and image (on val).
        valid: (C, M) bool mask.
        labels: optional (n,) true labels, for the own-class win counts.

    Returns:
        ``{"num_images", "dead": [{"class", "class_name", "slot"}], "count", "wins": [{"class", "class_name",
        "slot", "wins", "wins_own_class"}]}``.
    """
    counts, own = win_counts(winners, valid, labels)
    slots = _valid_pairs(torch.as_tensor(valid))
    wins = [{"class": c, "class_name": _name(class_names, c), "slot": s, "wins": int(counts[c, s]),
             "wins_own_class": int(own[c, s])} for c, s in slots]
    dead = [{"class": c, "class_name": _name(class_names, c), "slot": s} for c, s in slots if counts[c, s] == 0]
    return {"num_images": int(np.asarray(torch.as_tensor(winners)).shape[0]), "dead": dead, "count": len(dead),
            "wins": wins}


def push_records(push_image: torch.Tensor | np.ndarray, push_token: torch.Tensor | np.ndarray,
                 push_similarity: torch.Tensor | np.ndarray, valid: torch.Tensor | np.ndarray,
                 train_ids: Sequence[str], train_labels: Sequence[int] | np.ndarray,
                 class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The push record of every valid prototype, resolved to training image ids.

    Args:
        push_image: (C, M) index into the training split (−1 = never pushed).
        push_token: (C, M) token index (row-major over the token grid).
        push_similarity: (C, M) similarity at the last push.
        valid: (C, M) bool mask.
        train_ids: the training split's image ids, in the order ``push_image`` indexes.
        train_labels: (n_train,) labels of the training split.

    Returns:
        one dict per valid prototype: ``class``, ``class_name``, ``slot``, ``image_index``, ``image_id``
        (None if never pushed), ``image_label``, ``token``, ``similarity``, ``own_class`` (the source image
        has the prototype's class).
    """
    image = np.asarray(torch.as_tensor(push_image).cpu())
    token = np.asarray(torch.as_tensor(push_token).cpu())
    similarity = np.asarray(torch.as_tensor(push_similarity).cpu(), dtype=np.float64)
    labels = np.asarray(train_labels)
    rows = []
    for c, s in _valid_pairs(torch.as_tensor(valid)):
        index = int(image[c, s])
        if index >= len(train_ids):
            raise ValueError(f"push record of prototype {c}/{s} points at training image {index}, but the "
                             f"training split has {len(train_ids)} images (data changed since the run?)")
        pushed = index >= 0
        rows.append({"class": c, "class_name": _name(class_names, c), "slot": s,
                     "image_index": index if pushed else None,
                     "image_id": str(train_ids[index]) if pushed else None,
                     "image_label": int(labels[index]) if pushed else None,
                     "token": int(token[c, s]) if pushed else None,
                     "similarity": float(similarity[c, s]) if pushed else None,
                     "own_class": bool(pushed and int(labels[index]) == c)})
    return rows


def shared_sources(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of prototypes whose last push went toward the same (training image, token).

    Args:
        records: the output of :func:`push_records`.

    Returns:
        ``[{"image_id", "token", "prototypes": [{"class", "class_name", "slot"}]}]`` for every source shared by
        two or more prototypes.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if r["image_id"] is not None:
            groups.setdefault((r["image_id"], r["token"]), []).append(
                {"class": r["class"], "class_name": r["class_name"], "slot": r["slot"]})
    return [{"image_id": image_id, "token": token, "prototypes": members}
            for (image_id, token), members in groups.items() if len(members) > 1]
