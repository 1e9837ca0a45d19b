"""Training-time augmentation while fine-tuning (``RunConfig.augment``).

- ``"flips"``: each training image gets a random symmetry of the square (one of the 8 :data:`protohead.views.VIEWS`,
  dermoscopy has no canonical orientation), drawn anew at every step. Fine-tuning the whole backbone applies it to
  the preprocessed image; partial fine-tuning applies it to the cached front feature map (a square grid of cells),
  which costs nothing and approximates the image's flip (the front's convolutions are not exactly symmetric).
- ``"strong"`` (whole-backbone fine-tuning only: a cached map cannot be cropped or recoloured): a random resized
  crop (area share in :data:`CROP_SCALE`, aspect ratio in :data:`CROP_RATIO`) and colour jitter (brightness,
  contrast, saturation :data:`COLOUR_JITTER`, hue :data:`HUE_JITTER`) on the decoded image, then ``"flips"``.
  The image operations are torchvision's (``torchvision.transforms.v2.functional``, the ``timm`` extra).

Every random number comes from torch's global generator in the calling thread, which checkpoints save and
restore: a seed fixes the augmentation and a resumed run draws what the uninterrupted one would have. The
parameters are drawn for a whole batch first (:func:`draw_crop_jitter`), so the image work itself may run anywhere.
Under torchrun every rank starts from the same seed and draws for its own shard, so the k-th image of each rank's
shard gets the same parameters (as the head's dropout masks do): each image's augmentation is still random, the
ranks' draws are not independent of one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from protohead.views import MAX_VIEWS, apply_views

AUGMENTS = ("none", "flips", "strong")
"""The values of ``RunConfig.augment``."""

CROP_SCALE = (0.35, 1.0)
"""Share of the image area a random resized crop keeps (timm's default lower bound 0.08 loses most of a lesion)."""

CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect ratio range of the crop (width / height), as timm and torchvision."""

COLOUR_JITTER = 0.2
"""Brightness, contrast and saturation factors are drawn from [1 − j, 1 + j]."""

HUE_JITTER = 0.02
"""Hue shift drawn from [−h, h] (a fraction of the colour wheel): dermoscopy colour carries diagnosis, so small."""


def check_augment(augment: str) -> str:
    """``augment`` itself when it is one of :data:`AUGMENTS`, else a ``ValueError`` naming them."""
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    return augment


def random_symmetries(grids: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) → each row under a random symmetry of the square (uniform over the 8 views)."""
    if grids.shape[-1] != grids.shape[-2]:
        raise ValueError(f"random symmetries need square grids, got {tuple(grids.shape[-2:])}")
    return apply_views(grids, torch.randint(MAX_VIEWS, (grids.shape[0],)))  # torch's CPU generator: checkpointed


def random_symmetric_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Row-major grid tokens (B, S·S, C) → the same under a random symmetry of the square per row."""
    batch, cells, channels = tokens.shape
    side = math.isqrt(cells)
    if side * side != cells:
        raise ValueError(f"tokens must form a square grid to be flipped, got {cells} per image")
    grids = tokens.reshape(batch, side, side, channels).permute(0, 3, 1, 2)
    return random_symmetries(grids).permute(0, 2, 3, 1).reshape(batch, cells, channels)


@dataclass(frozen=True)
class CropJitter:
    """One image's random draws: crop area share, log aspect ratio and place (uniforms in [0, 1) for the top and
    left offsets over where the crop fits), and colour factors."""

    area: float
    log_ratio: float
    top: float
    left: float
    brightness: float
    contrast: float
    saturation: float
    hue: float

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) in pixels of an image of ``height`` × ``width``: the crop keeps
        ``area`` of the image at aspect ratio exp(``log_ratio``) (width / height), clipped to the image."""
        ratio = math.exp(self.log_ratio)
        crop_w = min(width, max(1, round(math.sqrt(self.area * height * width * ratio))))
        crop_h = min(height, max(1, round(math.sqrt(self.area * height * width / ratio))))
        top = min(height - crop_h, math.floor(self.top * (height - crop_h + 1)))  # every place equally likely
        left = min(width - crop_w, math.floor(self.left * (width - crop_w + 1)))
        return top, left, crop_h, crop_w


def draw_crop_jitter(count: int) -> list[CropJitter]:
    """``count`` draws from torch's global generator: area share uniform in :data:`CROP_SCALE`, log aspect ratio
    uniform in log :data:`CROP_RATIO`, place uniform over where the crop fits, colour factors uniform in
    [1 − :data:`COLOUR_JITTER`, 1 + :data:`COLOUR_JITTER`] and hue in ±:data:`HUE_JITTER`."""
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    result = []
    for area_u, ratio_u, top, left, *colour in torch.rand(count, 8, dtype=torch.float64).tolist():
        brightness, contrast, saturation = (1 - COLOUR_JITTER + 2 * COLOUR_JITTER * u for u in colour[:3])
        result.append(CropJitter(area=CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * area_u,
                                 log_ratio=low + (high - low) * ratio_u, top=top, left=left,
                                 brightness=brightness, contrast=contrast, saturation=saturation,
                                 hue=HUE_JITTER * (2 * colour[3] - 1)))
    return result


def crop_jitter_image(image: np.ndarray, params: CropJitter, size: int) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3) uint8: the crop resized (bilinear, antialiased), then brightness, contrast,
    saturation and hue as ``params`` say (torchvision's functional transforms)."""
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape={getattr(image, 'shape', None)} "
                         f"dtype={getattr(image, 'dtype', None)}")
    functional = _torchvision_functional()
    top, left, crop_h, crop_w = params.box(*image.shape[:2])
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)  # a copy: loaders may share theirs
    pixels = functional.resized_crop(pixels, top, left, crop_h, crop_w, [size, size], antialias=True)
    pixels = functional.adjust_brightness(pixels, params.brightness)
    pixels = functional.adjust_contrast(pixels, params.contrast)
    pixels = functional.adjust_saturation(pixels, params.saturation)
    pixels = functional.adjust_hue(pixels, params.hue)
    return pixels.permute(1, 2, 0).numpy()


def _torchvision_functional() -> Any:
    try:
        from torchvision.transforms.v2 import functional
    except ImportError as error:  # the core needs torch and numpy only
        raise ImportError("augment='strong' needs torchvision: pip install 'protohead[timm]'") from error
    return functional
