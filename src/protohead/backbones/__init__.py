"""Image backbones producing token grids + pooled features; :func:`build_backbone` is the entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protohead.backbones.base import Backbone
from protohead.backbones.efficientnet_lite import EfficientNetLite0Backbone
from protohead.backbones.timm_backbone import TimmBackbone

__all__ = ["BACKBONE_NAMES", "Backbone", "EfficientNetLite0Backbone", "TimmBackbone", "build_backbone",
           "train_backbone"]

BACKBONE_NAMES = ("efficientnet_lite0", "timm:<timm model name>")


def train_backbone(backbone: Backbone, blocks: int = 0) -> Backbone:
    """Make ``backbone`` trainable: all of it (``blocks=0``), or only its last ``blocks`` blocks and head conv
    (partial fine-tuning on cached front maps; EfficientNet-Lite0 only — another backbone is a ``ValueError``)."""
    if not blocks:
        return backbone.set_trainable(True)
    if not isinstance(backbone, EfficientNetLite0Backbone):
        raise ValueError(f"finetune_blocks={blocks}: partial fine-tuning is built for efficientnet_lite0, not "
                         f"{backbone.name}; use finetune_blocks=0 to fine-tune {backbone.name} whole")
    return backbone.set_trainable_tail(blocks)


def build_backbone(name: str = "efficientnet_lite0", image_size: int = 224,
                   weights_path: str | Path | None = None, multiscale: bool = False, **kwargs: Any) -> Backbone:
    """Build a backbone by name.

    Args:
        name: ``"efficientnet_lite0"`` (default, pretrained weights ship with the package) or
            ``"timm:<model>"`` (e.g. ``"timm:vit_small_patch16_224"``; needs ``pip install -e .[timm]``).
        image_size: input side ``S``.
        weights_path: local weights file (``.pth``/``.pt``/``.bin`` state dict or ``.safetensors``).
        multiscale: EfficientNet-Lite0 only: append its sixth stage's output to every token
            (:class:`EfficientNetLite0Backbone`); another backbone with ``multiscale=True`` is a ``ValueError``.
        **kwargs: passed to the backbone class (``trainable``; for timm also ``pretrained``, ``pooled``).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name == "efficientnet_lite0":
        return EfficientNetLite0Backbone(image_size=image_size, weights_path=weights_path, multiscale=multiscale,
                                         **kwargs)
    if multiscale:
        raise ValueError(f"multiscale features are built for efficientnet_lite0, not {name!r}")
    if name.startswith("timm:") and len(name) > len("timm:"):
        return TimmBackbone(name[len("timm:"):], image_size=image_size, weights_path=weights_path, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)} "
                     "(e.g. 'timm:vit_small_patch16_224')")
