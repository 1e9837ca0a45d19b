"""Prototype galleries: each prototype as its source training image, the source token's box and a crop.

Figures use ``matplotlib.figure.Figure`` with an explicit ``FigureCanvasAgg`` (no pyplot global state) and
are written atomically (temp file + ``os.replace``) at a fixed, predictable pixel size.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from protohead.atomic import atomic_open

DPI = 100
GALLERY_CELL_IN = 2.5  # inches per prototype column and per row
GALLERY_TITLE_IN = 0.5


@dataclass(frozen=True)
class PrototypeSource:
    """What a gallery shows for one prototype.

    Attributes:
        slot: the prototype's slot index in its class.
        image: (H, W, 3) uint8 source training image, or None when the prototype was never pushed.
        image_id: id of the source image.
        token: token index of the source (row-major over the grid).
        similarity: similarity recorded at the last push.
        wins: how often it is its class's winning prototype on val (all val images).
        wins_own: the same, over val images of its own class.
        num_images: number of val images counted.
    """

    slot: int
    image: np.ndarray | None
    image_id: str | None
    token: int | None
    similarity: float | None
    wins: int
    wins_own: int
    num_images: int


def safe_name(text: str) -> str:
    """``text`` made safe for a file name (anything but letters, digits, ``._-`` becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(text)) or "_"


def grid_shape(num_tokens: int) -> tuple[int, int]:
    """(h, w) of a square token grid with ``num_tokens`` = h·w tokens; ``ValueError`` if not square."""
    side = math.isqrt(int(num_tokens))
    if side * side != num_tokens or side == 0:
        raise ValueError(f"cannot explain {num_tokens} tokens: expected a square h×w token grid")
    return side, side


def token_box(token: int, grid: tuple[int, int], image_size: int, original: tuple[int, int]
              ) -> tuple[float, float, float, float]:
    """The grid cell of token ``token`` in the original image's pixel coordinates.

    The backbone resizes the full (H, W) image to (S, S) without cropping, so the cell
    ``[col·S/w, (col+1)·S/w) × [row·S/h, (row+1)·S/h)`` maps back by scaling x by W/S and y by H/S. This is
    the token's grid cell, not its (larger) effective receptive field.

    Args:
        token: row-major token index in ``[0, h·w)``.
        grid: (h, w) token grid.
        image_size: S, the backbone's input side.
        original: (H, W) of the original image.

    Returns:
        (x0, y0, x1, y1) floats, x1/y1 exclusive.
    """
    h, w = grid
    if not 0 <= token < h * w:
        raise ValueError(f"token {token} outside the {h}×{w} grid")
    row, col = divmod(int(token), w)
    height, width = original
    sx, sy = width / image_size, height / image_size
    return (col * image_size / w * sx, row * image_size / h * sy,
            (col + 1) * image_size / w * sx, (row + 1) * image_size / h * sy)


def crop(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """(h', w', 3) pixels of ``image`` (H, W, 3) inside ``box`` (x0, y0, x1, y1), at least one pixel."""
    height, width = image.shape[:2]
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, max(x0 + 1, math.ceil(box[2]))), min(height, max(y0 + 1, math.ceil(box[3])))
    return image[y0:y1, x0:x1]


def new_figure(width_in: float, height_in: float) -> Figure:
    """A Figure with its own Agg canvas (never touches pyplot)."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` to ``path`` as PNG atomically."""
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=DPI)
    return Path(path)


def gallery_size(num_prototypes: int) -> tuple[int, int]:
    """(width, height) in pixels of a gallery PNG with ``num_prototypes`` columns (at least one)."""
    columns = max(1, num_prototypes)
    return round(columns * GALLERY_CELL_IN * DPI), round((2 * GALLERY_CELL_IN + GALLERY_TITLE_IN) * DPI)


def draw_source(ax_image: object, ax_crop: object | None, image: np.ndarray | None, token: int | None,
                grid: tuple[int, int], image_size: int, label: str = "") -> None:
    """Draw a source image with its token's box on ``ax_image`` and the crop on ``ax_crop``."""
    axes = [ax for ax in (ax_image, ax_crop) if ax is not None]
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if image is None or token is None:
        for ax in axes:
            ax.text(0.5, 0.5, "never pushed", ha="center", va="center", transform=ax.transAxes)
        return
    box = token_box(token, grid, image_size, image.shape[:2])
    ax_image.imshow(image)
    ax_image.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                 edgecolor="yellow", linewidth=2))
    if label:
        ax_image.set_xlabel(label, fontsize=8)
    if ax_crop is not None:
        ax_crop.imshow(crop(image, box), interpolation="nearest")


def plot_gallery(class_name: str, sources: Sequence[PrototypeSource], grid: tuple[int, int], image_size: int,
                 path: str | os.PathLike[str]) -> Path:
    """One class's prototype gallery PNG (size :func:`gallery_size` of ``len(sources)``).

    Column per prototype: top, the source training image with the source token's grid cell boxed; bottom,
    the crop of that cell, titled with the push similarity and the val win counts.
    """
    width, height = gallery_size(len(sources))
    fig = new_figure(width / DPI, height / DPI)
    fig.suptitle(f"class {class_name}: {len(sources)} prototype(s) — source image, token cell, crop", fontsize=11)
    columns = max(1, len(sources))
    top = 1 - GALLERY_TITLE_IN / (2 * GALLERY_CELL_IN + GALLERY_TITLE_IN)
    grid_spec = fig.add_gridspec(2, columns, left=0.02, right=0.98, bottom=0.06, top=top - 0.04,
                                 hspace=0.35, wspace=0.1)
    if not sources:
        ax = fig.add_subplot(grid_spec[:, 0])
        ax.axis("off")
        ax.text(0.5, 0.5, "no valid prototypes", ha="center", va="center")
    for i, source in enumerate(sources):
        ax_image, ax_crop = fig.add_subplot(grid_spec[0, i]), fig.add_subplot(grid_spec[1, i])
        draw_source(ax_image, ax_crop, source.image, source.token, grid, image_size,
                    label=f"{source.image_id} · token {source.token}" if source.image_id else "")
        ax_image.set_title(f"prototype {source.slot}", fontsize=10)
        similarity = "—" if source.similarity is None else f"{source.similarity:.3f}"
        ax_crop.set_title(f"sim {similarity} · wins {source.wins}/{source.num_images}\n"
                          f"({source.wins_own} on own class)", fontsize=8)
    return save_png(fig, path)
