"""Per-image explanations: prediction, uncertainty and the top-3 prototypes ("this looks like that").

For each of the three most similar valid prototypes (over all classes) the figure shows the image with a
heat map of that prototype's cross-attention weights over the image's tokens (head-averaged, bilinearly
upsampled from the h×w token grid to the image size), next to the prototype's source training image with
the source token's grid cell boxed, and the crop of that cell.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from protohead.explain.gallery import DPI, draw_source, new_figure, save_png

TOP_K = 3
EXPLANATION_SIZE = (1000, 1050)  # (width, height) pixels of every explanation PNG


@dataclass(frozen=True)
class ImagePrediction:
    """The head's output for one image.

    Attributes:
        probabilities: (C,) class probabilities.
        uncertainty: scalar uncertainty.
        similarities: (C, M) similarity to each (adapted) prototype, −inf for unused slots.
        attention: (C, M, N) head-averaged cross-attention weights over the N tokens, or None (no attention).
    """

    probabilities: np.ndarray
    uncertainty: float
    similarities: np.ndarray
    attention: np.ndarray | None


@dataclass(frozen=True)
class SourcePatch:
    """A prototype's push source: training image (H, W, 3) uint8, its id and the token index."""

    image: np.ndarray | None
    image_id: str | None
    token: int | None


def resolve_image_ids(ids: Sequence[str], requested: Sequence[str]) -> list[int]:
    """Indices of ``requested`` ids in ``ids``; ``ValueError`` naming every unknown id."""
    position = {image_id: i for i, image_id in enumerate(ids)}
    unknown = [image_id for image_id in requested if image_id not in position]
    if unknown:
        raise ValueError(f"unknown test image id(s): {', '.join(unknown)} (not in the run's test split)")
    return [position[image_id] for image_id in dict.fromkeys(requested)]


def select_images(labels: np.ndarray, predicted: np.ndarray, count: int = 6) -> list[int]:
    """A deterministic, varied choice of ``count`` images: first correct / first incorrect per class.

    Classes are visited in order, alternating which kind comes first (class 0 correct, class 1 incorrect,
    ...), one image per class; a second pass adds the other kind. Kinds a class lacks are skipped.

    Args:
        labels: (n,) true labels.
        predicted: (n,) predicted labels.

    Returns:
        up to ``count`` image indices.
    """
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    classes = np.unique(labels).tolist()
    firsts: dict[tuple[int, bool], int] = {}
    for i, (label, guess) in enumerate(zip(labels.tolist(), predicted.tolist(), strict=True)):
        firsts.setdefault((label, label == guess), i)
    order = [(c, (n % 2 == 0) == first) for first in (True, False) for n, c in enumerate(classes)]
    chosen = [firsts[key] for key in order if key in firsts]
    return chosen[:count]


def upsample_attention(weights: np.ndarray | torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
                       ) -> np.ndarray:
    """(N,) attention weights on an (h, w) grid → (H, W) map, bilinear (``align_corners=False``)."""
    grid_map = torch.as_tensor(np.asarray(weights), dtype=torch.float32).reshape(1, 1, *grid)
    return F.interpolate(grid_map, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def top_prototypes(similarities: np.ndarray, k: int = TOP_K) -> list[tuple[int, int, float]]:
    """The ``k`` most similar valid prototypes: [(class, slot, similarity)], most similar first.

    Args:
        similarities: (C, M) with −inf at unused slots.
    """
    flat = np.asarray(similarities, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    max_slots = similarities.shape[1]
    return [(int(i // max_slots), int(i % max_slots), float(flat[i])) for i in order[:k] if np.isfinite(flat[i])]


def plot_explanation(image: np.ndarray, image_id: str, label: int | None, class_names: Sequence[str],
                     prediction: ImagePrediction, sources: Mapping[tuple[int, int], SourcePatch],
                     grid: tuple[int, int], image_size: int, path: str | os.PathLike[str]) -> Path:
    """One image's explanation PNG (``EXPLANATION_SIZE`` pixels).

    Rows: the top-3 prototypes. Columns: the image with the prototype's attention heat map; the prototype's
    source training image with the source token's grid cell boxed; the crop of that cell.

    Args:
        image: (H, W, 3) uint8.
        label: true class index or None.
        prediction: the head's output for this image.
        sources: push source per (class, slot).
        grid: (h, w) token grid; image_size: the backbone's input side S.
    """
    probabilities = np.asarray(prediction.probabilities)
    predicted = int(probabilities.argmax())
    truth = "?" if label is None else class_names[label]
    verdict = "" if label is None else (" ✓" if label == predicted else " ✗")
    fig = new_figure(EXPLANATION_SIZE[0] / DPI, EXPLANATION_SIZE[1] / DPI)
    fig.suptitle(f"{image_id}: predicted {class_names[predicted]} (p={probabilities[predicted]:.2f}){verdict} · "
                 f"true {truth} · uncertainty {prediction.uncertainty:.3f}", fontsize=12)
    grid_spec = fig.add_gridspec(TOP_K, 3, left=0.03, right=0.97, bottom=0.04, top=0.9, hspace=0.4, wspace=0.08,
                                 width_ratios=[1.3, 1.3, 0.8])
    height, width = image.shape[:2]
    ranked = top_prototypes(prediction.similarities)
    for row in range(TOP_K):
        axes = [fig.add_subplot(grid_spec[row, col]) for col in range(3)]
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        if row >= len(ranked):
            for ax in axes:
                ax.axis("off")
            continue
        c, slot, similarity = ranked[row]
        ax_heat, ax_source, ax_crop = axes
        ax_heat.imshow(image)
        if prediction.attention is not None:
            weights = np.asarray(prediction.attention[c, slot])
            heat = upsample_attention(weights, grid, (height, width))
            low, high = float(weights.min()), float(weights.max())
            ax_heat.imshow(heat, cmap="jet", alpha=0.45, vmin=low, vmax=max(high, low + 1e-12),
                           extent=(0, width, height, 0))
            note = f"attention {low:.4f}–{high:.4f} (uniform {1 / weights.size:.4f})"
        else:
            note = "no attention in this head"
        ax_heat.set_title(f"#{row + 1} this looks like… class {class_names[c]}, prototype {slot}\n"
                          f"similarity {similarity:.3f} · {note}", fontsize=9)
        source = sources.get((c, slot), SourcePatch(None, None, None))
        draw_source(ax_source, ax_crop, source.image, source.token, grid, image_size,
                    label=f"{source.image_id} · token {source.token}" if source.image_id else "")
        ax_source.set_title("…that: the prototype's source image", fontsize=9)
        ax_crop.set_title("source token cell", fontsize=9)
    return save_png(fig, path)
