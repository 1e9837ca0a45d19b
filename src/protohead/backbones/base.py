"""The backbone contract: images in, a grid of token features plus a pooled vector out.

Every backbone maps a batch of preprocessed images ``(B, 3, S, S)`` to

* ``tokens``: ``(B, N, F)`` local features (CNN feature-map cells in row-major order, or ViT patch
  tokens without prefix tokens), and
* ``pooled``: ``(B, F)`` the global image feature the backbone itself would use for classification.

The feature cache (:mod:`protohead.features`) keys extracted features on :meth:`Backbone.cache_key`.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn


class Backbone(nn.Module, abc.ABC):
    """Abstract image backbone.

    Attributes:
        name: registry name, e.g. ``"efficientnet_lite0"`` or ``"timm:vit_small_patch16_224"``.
        image_size: side ``S`` of the square input the model is run at.
        feature_dim: ``F``, channels per token.
        num_tokens: ``N``, tokens per image at ``image_size``.
        pixel_mean: per-channel mean subtracted from 0..255 RGB pixels.
        pixel_std: per-channel divisor applied after subtracting ``pixel_mean`` (0..255 scale).

    Frozen by default: parameters have ``requires_grad=False`` and the module stays in eval mode even
    when a parent module calls ``.train()`` (so batch-norm statistics never drift). Call
    :meth:`set_trainable` to fine-tune.
    """

    name: str
    image_size: int
    feature_dim: int
    num_tokens: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    def __init__(self) -> None:
        super().__init__()
        self.trainable = False

    # ------------------------------------------------------------------ preprocessing
    def resize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (S, S, 3) uint8, PIL bilinear (aspect ratio is not kept)."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3
                and image.dtype == np.uint8):
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", None)
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got shape={shape} dtype={dtype}")
        size = self.image_size
        if image.shape[:2] == (size, size):
            return image
        return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 with the model's own normalisation."""
        x = pixels.permute(0, 3, 1, 2).to(torch.float32)
        mean = torch.tensor(self.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """List of (H, W, 3) uint8 RGB images -> (B, 3, S, S) float32 CPU tensor ready for :meth:`forward`.

        Each image is resized to ``S x S`` with PIL bilinear, then normalised with ``pixel_mean`` /
        ``pixel_std``.
        """
        size = self.image_size
        batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
        for k, image in enumerate(images):
            batch[k] = self.resize(image)
        return self.normalize(torch.from_numpy(batch))

    # ------------------------------------------------------------------ model
    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) float32 -> (tokens (B, N, F), pooled (B, F))."""

    def set_trainable(self, trainable: bool) -> Backbone:
        """Unfreeze (``True``) or freeze (``False``) every parameter; frozen backbones stay in eval mode."""
        self.trainable = bool(trainable)
        for parameter in self.parameters():
            parameter.requires_grad_(self.trainable)
        if not self.trainable:
            self.eval()
        return self

    def train(self, mode: bool = True) -> Backbone:
        """Like :meth:`nn.Module.train`, but a frozen backbone always stays in eval mode."""
        return super().train(mode and self.trainable)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter (CPU for a parameterless module)."""
        for parameter in self.parameters():
            return parameter.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ identity
    def cache_config(self) -> dict[str, object]:
        """Everything besides the weights that changes the extracted features (subclasses extend)."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "name": self.name,
            "image_size": self.image_size,
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "resize": "pil-bilinear-square",
        }

    def weights_digest(self) -> str:
        """sha256 over every tensor in ``state_dict()`` (names, shapes, dtypes, bytes).

        Hashing the live weights rather than the weights file means fine-tuned or re-initialised
        weights can never be served stale cached features. Lite0 (18 MB) takes ~20 ms.
        """
        digest = hashlib.sha256()
        for key, value in self.state_dict().items():
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def cache_key(self) -> str:
        """``"<name>@<S>px:<digest>"``: changes with the name, image size, preprocessing or any weight."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.cache_config(), sort_keys=True).encode())
        digest.update(self.weights_digest().encode())
        return f"{self.name}@{self.image_size}px:{digest.hexdigest()[:32]}"


def load_torch_weights(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary objects.

    A file that is not such a weights file (corrupt, or a pickle of other objects) is a ``ValueError``
    naming it.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"weights file {path} cannot be loaded safely as tensors ({first_line})") from None

