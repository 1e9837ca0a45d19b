"""The prototype bank: a (C, M, D) parameter, per-class counts, the derived valid mask, and push records.

Slot ``k`` of class ``c`` is valid iff ``k < counts[c]``. Counts live in ``state_dict`` (a buffer), so a
head expanded during training reloads into a freshly built one exactly. Unused slots are inert: the head
masks them out of attention, logits and losses, so they get exactly zero gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeBank(nn.Module):
    """Per-class prototypes with a variable number of valid slots.

    Args:
        num_classes: C.
        max_prototypes: M, slots per class.
        dim: D.
        initial: valid slots per class at construction (1 ≤ initial ≤ M).
        normalized: keep prototypes on the unit sphere (cosine similarity).
        generator: optional RNG for the initial values.
        source_dim: F, the width of the backbone features; with it the bank can be *anchored*: each prototype
            becomes the projection of its source patch's feature vector (``source_features`` (C, M, F)).
    """

    def __init__(self, num_classes: int, max_prototypes: int, dim: int, initial: int,
                 normalized: bool = True, generator: torch.Generator | None = None, source_dim: int = 0) -> None:
        super().__init__()
        if not 1 <= initial <= max_prototypes:
            raise ValueError(f"initial prototypes ({initial}) must be in [1, max_prototypes={max_prototypes}]")
        values = torch.randn(num_classes, max_prototypes, dim, generator=generator)
        if normalized:
            values = F.normalize(values, dim=-1)
        self.normalized = normalized
        self.prototypes = nn.Parameter(values)
        self.register_buffer("counts", torch.full((num_classes,), initial, dtype=torch.long))
        # push records (SPEC §5): training image index and token index of each prototype's source, the
        # prototype's similarity to that token after the push (what the head scores on the source) and before it
        shape = (num_classes, max_prototypes)
        self.register_buffer("push_image", torch.full(shape, -1, dtype=torch.long))
        self.register_buffer("push_token", torch.full(shape, -1, dtype=torch.long))
        self.register_buffer("push_similarity", torch.full(shape, float("nan")))
        self.register_buffer("prepush_similarity", torch.full(shape, float("nan")))
        # anchoring (final push with patch scoring): the scored prototype is project(source feature)
        self.register_buffer("source_features", torch.zeros(num_classes, max_prototypes, source_dim))
        self.register_buffer("anchored", torch.zeros((), dtype=torch.bool))
        self.is_anchored = False  # mirrors the buffer on the host: scoring never reads a tensor value (tracing)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        if prefix + "push_image" in state_dict and prefix + "prepush_similarity" not in state_dict:
            # checkpoints from before the record kept both: their push_similarity was taken before the move
            state_dict[prefix + "prepush_similarity"] = state_dict[prefix + "push_similarity"].clone()
        if prefix + "push_image" in state_dict and prefix + "anchored" not in state_dict:  # before anchoring existed
            state_dict[prefix + "source_features"] = torch.zeros_like(self.source_features)
            state_dict[prefix + "anchored"] = torch.zeros((), dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]
        if prefix + "anchored" in state_dict:
            self.is_anchored = bool(state_dict[prefix + "anchored"])

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    @property
    def max_prototypes(self) -> int:
        return self.prototypes.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """(C, M) bool mask of valid slots."""
        slots = torch.arange(self.max_prototypes, device=self.counts.device)
        return slots[None, :] < self.counts[:, None]

    def vectors(self, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(C, M, D) the prototypes to score: the parameter, or once anchored ``project(source_features)``
        (normalised for a cosine bank), so the prototype is exactly its source patch as the head now sees it."""
        if not self.is_anchored:
            return self.prototypes
        projected = project(self.source_features)
        return F.normalize(projected, dim=-1) if self.normalized else projected

    @torch.no_grad()
    def anchor(self, features: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Anchor every valid prototype to its source patch's backbone feature vector ``features`` (C, M, F);
        the parameter is set to the anchored value (it no longer changes the scores)."""
        if self.source_features.shape[-1] != features.shape[-1] or features.shape[:2] != self.prototypes.shape[:2]:
            raise ValueError(f"source features must have shape {tuple(self.source_features.shape)}, "
                             f"got {tuple(features.shape)}")
        valid = self.valid
        if bool((self.push_image[valid] < 0).any()):
            raise ValueError("every valid prototype needs a push source before the bank can be anchored")
        self.source_features.copy_(torch.where(valid[..., None], features, torch.zeros_like(features)))
        self.anchored.fill_(True)
        self.is_anchored = True
        self.sync_anchored(project)

    @torch.no_grad()
    def sync_anchored(self, project: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Copy the anchored vectors into the parameter (so readers of ``prototypes`` see what is scored)."""
        if self.is_anchored:
            self.prototypes.copy_(torch.where(self.valid[..., None], self.vectors(project), self.prototypes))

    @torch.no_grad()
    def ema_update(self, class_index: int, slot: int, target: torch.Tensor, momentum: float) -> None:
        """Standard EMA: p ← normalise(m·p + (1−m)·normalise(v)) (no normalisation for L2 banks).

        Args:
            target: (D,) the vector to move toward.
        """
        self._check_slot(class_index, slot)
        current = self.prototypes[class_index, slot]
        if self.normalized:
            updated = F.normalize(momentum * current + (1 - momentum) * F.normalize(target, dim=-1), dim=-1)
        else:
            updated = momentum * current + (1 - momentum) * target
        self.prototypes[class_index, slot] = updated.to(self.prototypes.dtype)

    @torch.no_grad()
    def push(self, class_index: int, slot: int, target: torch.Tensor, momentum: float, image: int, token: int,
             similarity_before: float) -> None:
        """Move a prototype toward a training token (:meth:`ema_update`; ``momentum`` 0 puts it exactly there)
        and record that token as its source (``image``, ``token``; the similarity before the move is
        ``similarity_before``). The similarity after the move is recorded by :meth:`record_similarity`."""
        self.ema_update(class_index, slot, target, momentum)
        self.push_image[class_index, slot] = image
        self.push_token[class_index, slot] = token
        self.prepush_similarity[class_index, slot] = similarity_before
        self.push_similarity[class_index, slot] = float("nan")

    @torch.no_grad()
    def record_similarity(self, similarity: torch.Tensor, where: torch.Tensor) -> None:
        """Set ``push_similarity`` (C, M) where ``where`` (C, M) is true: the prototype's similarity to its source."""
        self.push_similarity[where] = similarity[where].to(self.push_similarity.dtype)

    @torch.no_grad()
    def remove(self, class_index: int, slot: int) -> None:
        """Drop one prototype: the class's later slots move down by one (values and push records); the last
        valid slot becomes unused. A class keeps at least one prototype."""
        self._check_slot(class_index, slot)
        count = int(self.counts[class_index])
        if count <= 1:
            raise ValueError(f"class {class_index} has one prototype left; it cannot be removed")
        for tensor in (self.prototypes, self.push_image, self.push_token, self.push_similarity,
                       self.prepush_similarity, self.source_features):
            tensor[class_index, slot:count - 1] = tensor[class_index, slot + 1:count].clone()
        self._clear_record(class_index, count - 1)
        self.counts[class_index] -= 1

    @torch.no_grad()
    def expand(self, class_index: int, vector: torch.Tensor) -> int:
        """Occupy the next free slot of ``class_index`` with ``vector`` (D,); returns the slot index."""
        if not 0 <= class_index < self.num_classes:
            raise ValueError(f"class index {class_index} out of range [0, {self.num_classes})")
        slot = int(self.counts[class_index])
        if slot >= self.max_prototypes:
            raise ValueError(f"class {class_index} already holds max_prototypes={self.max_prototypes}")
        if vector.shape != (self.prototypes.shape[-1],):
            raise ValueError(f"prototype vector must have shape ({self.prototypes.shape[-1]},), "
                             f"got {tuple(vector.shape)}")
        if not torch.isfinite(vector).all():
            raise ValueError("prototype vector contains NaN or Inf")
        self.prototypes[class_index, slot] = F.normalize(vector, dim=-1) if self.normalized else vector
        self.counts[class_index] += 1
        self._clear_record(class_index, slot)  # a new slot has no source until it is pushed
        return slot

    def _clear_record(self, class_index: int, slot: int) -> None:
        """Forget a slot's push source: no image or token, similarities NaN."""
        self.push_image[class_index, slot] = -1
        self.push_token[class_index, slot] = -1
        self.push_similarity[class_index, slot] = float("nan")
        self.prepush_similarity[class_index, slot] = float("nan")

    def _check_slot(self, class_index: int, slot: int) -> None:
        if not 0 <= class_index < self.num_classes:
            raise ValueError(f"class index {class_index} out of range [0, {self.num_classes})")
        if not 0 <= slot < int(self.counts[class_index]):
            raise ValueError(f"slot {slot} of class {class_index} is not a valid prototype")
