"""Fixed image views (flips and 90° rotations) for augmentation and test-time averaging.

Dermoscopy has no canonical orientation, so the eight symmetries of the square (the dihedral group) are
label-preserving views of an image. A run with ``views = V`` uses the first ``V`` of :data:`VIEWS`:
training samples one view per image per epoch (seeded, so a resumed run sees the same views), and with
``tta`` the validation and test predictions are the mean over the ``V`` views (:func:`average_view_outputs`).
Frozen-feature runs cache each view's features once (one cache entry per view); fine-tuning applies the view
to the preprocessed batch on the fly.

A view is applied to the preprocessed square input (B, 3, S, S), so it is an exact symmetry of what the
backbone sees (the resize to S × S happens before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip", "rot180", "rot90", "rot270", "transpose", "antitranspose")
"""The dihedral views in the order a run takes them: 2 = flips left-right, 4 = the flips and the half turn
(their group), 8 = all eight symmetries of the square."""

MAX_VIEWS = len(VIEWS)

AVERAGED_KEYS = ("probabilities", "uncertainty", "ood_score", "feature_distance")
"""Per-sample outputs averaged over views; every other output (similarities, evidence, winners) is the identity
view's, so the pictures show the image as it is."""


def check_view(view: str) -> str:
    """``view`` itself when it is one of :data:`VIEWS`, else a ``ValueError`` naming the valid ones."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    return view


def apply_view(images: torch.Tensor, view: str) -> torch.Tensor:
    """(B, C, S, S) → the same batch under ``view`` (one of :data:`VIEWS`); height and width must be equal for
    the rotations and transposes."""
    check_view(view)
    if view in ("rot90", "rot270", "transpose", "antitranspose") and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"view {view!r} needs square inputs, got {tuple(images.shape[-2:])}")
    height, width = images.dim() - 2, images.dim() - 1
    if view == "identity":
        return images
    if view == "hflip":
        return images.flip(width)
    if view == "vflip":
        return images.flip(height)
    if view == "rot180":
        return images.flip(height, width)
    # the quarter turns as a flip and a transpose: exactly torch.rot90(±1), and exportable to ONNX (rot90 is not)
    if view == "rot90":
        return images.flip(width).transpose(height, width)
    if view == "rot270":
        return images.flip(height).transpose(height, width)
    if view == "transpose":
        return images.transpose(height, width)
    return images.flip(height, width).transpose(height, width)  # antitranspose


def apply_views(images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) and (B,) indices into :data:`VIEWS` → a new batch, row ``i`` under view ``views[i]``."""
    result = images.clone()
    for view in views.unique().tolist():
        if view:
            where = (views == view).to(images.device)
            result[where] = apply_view(images[where], VIEWS[view])
    return result


def view_names(count: int) -> tuple[str, ...]:
    """The first ``count`` views (1 ≤ count ≤ 8)."""
    if not 1 <= count <= MAX_VIEWS:
        raise ValueError(f"views must be between 1 and {MAX_VIEWS}, got {count}")
    return VIEWS[:count]


def sample_views(size: int, views: int, generator: torch.Generator) -> torch.Tensor:
    """(size,) one view index per image, uniform over ``views`` (all zeros for one view, drawing nothing)."""
    if views == 1:
        return torch.zeros(size, dtype=torch.long)
    return torch.randint(views, (size,), generator=generator)


def average_view_outputs(outputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Head outputs of the same images under several views → one dict: the :data:`AVERAGED_KEYS` averaged,
    everything else taken from the first (identity) view."""
    if not outputs:
        raise ValueError("no view outputs to average")
    result = dict(outputs[0])
    if len(outputs) > 1:
        for key in AVERAGED_KEYS:
            if result.get(key) is not None:
                result[key] = torch.stack([out[key] for out in outputs]).mean(dim=0)
    return result
