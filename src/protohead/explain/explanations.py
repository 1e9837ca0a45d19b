"""Per-image explanations: prediction, uncertainty and the top-3 prototypes ("this looks like that").

For each of the three most similar valid prototypes (over all classes) the figure shows the image with a
heat map of that prototype's own evidence over the image's tokens (bilinearly upsampled from the h×w token grid
to the image size), next to the prototype's source training image with the source token's grid cell boxed, and
the crop of that cell.

The heat maps are drawn on an absolute scale (:func:`evidence_scale`), so maps of different prototypes and
images compare: a patch-scored head's per-token similarity on 0–1 (cosine), a pooled head's cross-attention
weights on 0–max(max weight, 2/N) with the uniform weight 1/N marked on the colour bar.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from protohead.explain.gallery import DPI, draw_source, new_figure, save_png

TOP_K = 3
HEAT_CMAP = "jet"
EXPLANATION_SIZE = (1000, 1050)  # (width, height) pixels of every explanation PNG


@dataclass(frozen=True)
class ImagePrediction:
    """The head's output for one image.

    Attributes:
        probabilities: (C,) class probabilities.
        uncertainty: scalar uncertainty.
        similarities: (C, M) similarity to each (adapted) prototype, −inf for unused slots.
        evidence: (C, M, N) each prototype's evidence over the N tokens (``info["evidence"]``), or None.
        evidence_kind: what ``evidence`` holds (the head's ``evidence_kind``): ``similarity`` (per-token
            similarity, patch scoring), ``attention`` (head-averaged cross-attention weights, summing to 1) or
            None (unknown: drawn on the map's own range).
        distance: the head's similarity (``cosine``, ``cosine01``, ``l2``, ``log_activation``), for the scale of
            similarity maps.
    """

    probabilities: np.ndarray
    uncertainty: float
    similarities: np.ndarray
    evidence: np.ndarray | None
    evidence_kind: str | None = None
    distance: str | None = None


@dataclass(frozen=True)
class EvidenceScale:
    """How one evidence map is coloured: ``vmin``–``vmax``, a reference level on the colour bar (``marker``:
    the uniform weight 1/N for attention, the prototype's score = the map's maximum for similarity) and the
    title note saying so."""

    vmin: float
    vmax: float
    marker: float | None
    marker_label: str
    note: str


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


def evidence_scale(values: np.ndarray, kind: str | None, distance: str | None = None) -> EvidenceScale:
    """The absolute colour scale of one prototype's (N,) evidence map.

    - ``similarity`` with a cosine distance (``cosine``: [−1, 1], ``cosine01``: [0, 1]): 0–1 (negative
      cosines get the lowest colour), marker at the map's maximum (the prototype's score under max pooling);
    - ``similarity`` with another distance: the map's own range (no absolute bound exists), said in the note;
    - ``attention``: 0–max(max weight, 2/N), marker at the uniform weight 1/N;
    - unknown kind: the map's own range.
    """
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    own = (low, max(high, low + 1e-12))
    if kind == "similarity":
        if distance in ("cosine", "cosine01"):
            return EvidenceScale(0.0, 1.0, high, "max", f"similarity map, scale 0–1, max {high:.2f}")
        return EvidenceScale(*own, high, "max",
                             f"similarity map ({distance or 'unknown distance'}), own range {low:.3g}–{high:.3g}")
    if kind == "attention":
        uniform = 1.0 / values.size
        top = max(high, 2.0 * uniform)
        return EvidenceScale(0.0, top, uniform, "1/N",
                             f"attention {low:.4f}–{high:.4f} (uniform {uniform:.4f}), scale 0–{top:.3g}")
    return EvidenceScale(*own, None, "", f"evidence, own range {low:.3g}–{high:.3g}")


def explanation_rows(prediction: ImagePrediction, k: int = TOP_K
                     ) -> list[tuple[int, int, float, np.ndarray | None]]:
    """The prototypes an explanation cites: [(class, slot, similarity, that prototype's own (N,) evidence map
    or None)], most similar first."""
    evidence = prediction.evidence
    return [(c, slot, similarity, None if evidence is None else np.asarray(evidence[c, slot]))
            for c, slot, similarity in top_prototypes(prediction.similarities, k)]


def top_prototypes(similarities: np.ndarray, k: int = TOP_K) -> list[tuple[int, int, float]]:
    """The ``k`` most similar valid prototypes: [(class, slot, similarity)], most similar first.

    Args:
        similarities: (C, M) with −inf at unused slots.
    """
    flat = np.asarray(similarities, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    max_slots = similarities.shape[1]
    return [(int(i // max_slots), int(i % max_slots), float(flat[i])) for i in order[:k] if np.isfinite(flat[i])]


def _colour_bar(fig: Any, ax: Any, scale: EvidenceScale) -> None:
    """A colour bar beside ``ax`` for ``scale`` (opaque colours), with its marker level drawn across it."""
    bar = fig.colorbar(ScalarMappable(Normalize(scale.vmin, scale.vmax), HEAT_CMAP), ax=ax, fraction=0.046,
                       pad=0.02)
    bar.ax.tick_params(labelsize=7)
    if scale.marker is not None and scale.vmin <= scale.marker <= scale.vmax:
        bar.ax.axhline(scale.marker, color="white", linewidth=2)
        bar.ax.axhline(scale.marker, color="black", linewidth=1, linestyle="--")
        bar.ax.set_xlabel(f"-- {scale.marker_label}", fontsize=7)  # under the bar; the value is in the title


def plot_explanation(image: np.ndarray, image_id: str, label: int | None, class_names: Sequence[str],
                     prediction: ImagePrediction, sources: Mapping[tuple[int, int], SourcePatch],
                     grid: tuple[int, int], image_size: int, path: str | os.PathLike[str]) -> Path:
    """One image's explanation PNG (``EXPLANATION_SIZE`` pixels).

    Rows: the top-3 prototypes. Columns: the image with that prototype's own evidence heat map on its absolute
    scale (:func:`evidence_scale`, with a colour bar); the prototype's source training image with the source
    token's grid cell boxed; the crop of that cell.

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
    ranked = explanation_rows(prediction)
    for row in range(TOP_K):
        axes = [fig.add_subplot(grid_spec[row, col]) for col in range(3)]
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        if row >= len(ranked):
            for ax in axes:
                ax.axis("off")
            continue
        c, slot, similarity, values = ranked[row]
        ax_heat, ax_source, ax_crop = axes
        ax_heat.imshow(image)
        if values is not None:
            scale = evidence_scale(values, prediction.evidence_kind, prediction.distance)
            heat = upsample_attention(values, grid, (height, width))
            ax_heat.imshow(heat, cmap=HEAT_CMAP, alpha=0.45, vmin=scale.vmin, vmax=scale.vmax,
                           extent=(0, width, height, 0))
            _colour_bar(fig, ax_heat, scale)
            note = scale.note
        else:
            note = "no evidence map in this head"
        ax_heat.set_title(f"#{row + 1} this looks like… class {class_names[c]}, prototype {slot}\n"
                          f"similarity {similarity:.3f}\n{note}", fontsize=8)
        source = sources.get((c, slot), SourcePatch(None, None, None))
        draw_source(ax_source, ax_crop, source.image, source.token, grid, image_size,
                    label=f"{source.image_id} · token {source.token}" if source.image_id else "")
        ax_source.set_title("…that: the prototype's source image", fontsize=9)
        ax_crop.set_title("source token cell", fontsize=9)
    return save_png(fig, path)
