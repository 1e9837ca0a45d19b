"""The prototype bank: a (C, M, D) parameter, per-class counts, the derived valid mask, and push records.

Slot ``k`` of class ``c`` is valid iff ``k < counts[c]``. Counts live in ``state_dict`` (a buffer), so a
head expanded during training reloads into a freshly built one exactly. Unused slots are inert: the head
masks them out of attention, logits and losses, so they get exactly zero gradient.
"""

from __future__ import annotations

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
    """

    def __init__(self, num_classes: int, max_prototypes: int, dim: int, initial: int,
                 normalized: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= initial <= max_prototypes:
            raise ValueError(f"initial prototypes ({initial}) must be in [1, max_prototypes={max_prototypes}]")
        values = torch.randn(num_classes, max_prototypes, dim, generator=generator)
        if normalized:
            values = F.normalize(values, dim=-1)
        self.normalized = normalized
        self.prototypes = nn.Parameter(values)
        self.register_buffer("counts", torch.full((num_classes,), initial, dtype=torch.long))
        # push records (SPEC §5): training image index, token index and similarity of each prototype's source
        shape = (num_classes, max_prototypes)
        self.register_buffer("push_image", torch.full(shape, -1, dtype=torch.long))
        self.register_buffer("push_token", torch.full(shape, -1, dtype=torch.long))
        self.register_buffer("push_similarity", torch.full(shape, float("nan")))

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
             similarity: float) -> None:
        """Move a prototype toward a training token (:meth:`ema_update`; ``momentum`` 0 puts it exactly there)
        and record that token as its source (``image``, ``token``, ``similarity`` before the move)."""
        self.ema_update(class_index, slot, target, momentum)
        self.push_image[class_index, slot] = image
        self.push_token[class_index, slot] = token
        self.push_similarity[class_index, slot] = similarity

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
        self.push_image[class_index, slot] = -1  # a new slot has no source until it is pushed
        self.push_token[class_index, slot] = -1
        self.push_similarity[class_index, slot] = float("nan")
        return slot

    def _check_slot(self, class_index: int, slot: int) -> None:
        if not 0 <= class_index < self.num_classes:
            raise ValueError(f"class index {class_index} out of range [0, {self.num_classes})")
        if not 0 <= slot < int(self.counts[class_index]):
            raise ValueError(f"slot {slot} of class {class_index} is not a valid prototype")
