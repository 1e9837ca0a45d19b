"""Optional adapter for any `timm <https://github.com/huggingface/pytorch-image-models>`_ model.

``timm`` is an optional extra (``pip install -e .[timm]``) and is imported lazily. Two feature layouts
are handled, detected from a probe forward at construction:

* transformer-like: ``forward_features`` -> ``(B, P + N, F)`` with ``P = model.num_prefix_tokens``
  (class / register tokens): tokens are the ``N`` patch tokens, pooled is the class token
  (``pooled="cls"``) or the mean of the patch tokens (``pooled="mean"``);
* CNN-like: ``forward_features`` -> ``(B, F, h, w)`` (or channels-last ``(B, h, w, F)``): tokens are the
  ``h*w`` cells in row-major order, pooled is their mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from protohead.backbones.base import Backbone, load_torch_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling arbitrary objects.

    Checkpoints wrapping the weights in ``{"state_dict": ...}`` or ``{"model": ...}`` are unwrapped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = load_torch_weights(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


class TimmBackbone(Backbone):
    """A timm model as a :class:`Backbone`.

    Args:
        model_name: timm model name, e.g. ``"vit_small_patch16_224"`` or ``"resnet50"``.
        image_size: input side ``S``; passed as ``img_size`` to models that take it (ViTs), so the
            number of patch tokens follows ``S``.
        weights_path: local ``.safetensors`` / ``torch.save`` state dict (classifier-head keys are
            ignored; any other missing or unexpected key raises ``ValueError``; ViT absolute position
            embeddings are resampled to ``S`` when needed).
        pretrained: let timm fetch its pretrained weights (network access; mutually exclusive with
            ``weights_path``). Default: random init.
        pooled: ``"cls"`` (class token), ``"mean"`` (mean of tokens) or ``"auto"`` (class token when the
            model has prefix tokens, else mean). ``"cls"`` on a model without a class token raises.
        trainable: start unfrozen (default frozen).
        **model_kwargs: extra ``timm.create_model`` keyword arguments.

    Raises:
        ImportError: timm is not installed (message: ``pip install -e .[timm]``).
    """

    def __init__(self, model_name: str, image_size: int = 224, weights_path: str | Path | None = None,
                 pretrained: bool = False, pooled: str = "auto", trainable: bool = False,
                 **model_kwargs: Any) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as error:
            raise ImportError(f"TimmBackbone({model_name!r}) needs timm: pip install -e .[timm]") from error
        if pooled not in ("cls", "mean", "auto"):
            raise ValueError(f"pooled must be 'cls', 'mean' or 'auto', got {pooled!r}")
        if pretrained and weights_path is not None:
            raise ValueError("give either pretrained=True or weights_path, not both")

        self.model_name = model_name
        self.name = f"timm:{model_name}"
        self.image_size = int(image_size)
        self.model = self._create(timm, model_name, pretrained, model_kwargs)
        self.weights_path = Path(weights_path) if weights_path is not None else None
        if self.weights_path is not None:
            self._load_weights(self.weights_path)

        cfg = dict(getattr(self.model, "pretrained_cfg", None) or getattr(self.model, "default_cfg", None)
                   or {})
        mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
        std = tuple(cfg.get("std") or IMAGENET_STD)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{model_name}: expected 3-channel mean/std in pretrained_cfg, got {mean}, {std}")
        self.pixel_mean = (255.0 * mean[0], 255.0 * mean[1], 255.0 * mean[2])
        self.pixel_std = (255.0 * std[0], 255.0 * std[1], 255.0 * std[2])

        self.model.eval()
        self._probe(pooled)
        self.eval()
        self.set_trainable(trainable)

    # ------------------------------------------------------------------ construction helpers
    def _create(self, timm: Any, model_name: str, pretrained: bool, model_kwargs: dict[str, Any]) -> Any:
        kwargs = {"pretrained": pretrained, "num_classes": 0, **model_kwargs}
        try:
            return timm.create_model(model_name, img_size=self.image_size, **kwargs)
        except TypeError as error:  # CNNs do not take img_size
            if "img_size" not in str(error):
                raise
            return timm.create_model(model_name, **kwargs)

    def _classifier_prefixes(self) -> tuple[str, ...]:
        cfg = dict(getattr(self.model, "pretrained_cfg", None) or {})
        classifier = cfg.get("classifier") or ("head", "fc", "classifier")
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        return tuple(f"{name}." for name in names)

    def _load_weights(self, path: Path) -> None:
        state = load_state_dict_file(path)
        prefixes = self._classifier_prefixes()
        state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
        pos_embed = getattr(self.model, "pos_embed", None)
        if (isinstance(pos_embed, torch.Tensor) and "pos_embed" in state
                and state["pos_embed"].shape != pos_embed.shape):
            try:
                from timm.layers import resample_abs_pos_embed
            except ImportError as error:
                raise ValueError(f"{path}: pos_embed shape {tuple(state['pos_embed'].shape)} does not "
                                 f"match the model's {tuple(pos_embed.shape)}") from error
            prefix = 0 if getattr(self.model, "no_embed_class", False) else self.model.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=list(self.model.patch_embed.grid_size), num_prefix_tokens=prefix)
        result = self.model.load_state_dict(state, strict=False)
        unexpected = [k for k in result.unexpected_keys if not k.startswith(prefixes)]
        missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit {self.model_name} "
                             f"(missing keys {missing[:5]}, unexpected keys {unexpected[:5]})")

    @torch.no_grad()
    def _probe(self, pooled: str) -> None:
        """Run one zero image to learn the output layout, ``num_tokens`` and ``feature_dim``."""
        out = self.model.forward_features(torch.zeros(1, 3, self.image_size, self.image_size))
        if isinstance(out, (list, tuple)):
            raise ValueError(f"{self.model_name}: forward_features returned a {type(out).__name__}; "
                             "only single-tensor feature outputs are supported")
        num_features = int(getattr(self.model, "num_features", -1))
        if out.ndim == 3:
            self.layout = "nlc"
            self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
            self.num_tokens = out.shape[1] - self.num_prefix_tokens
            self.feature_dim = out.shape[2]
        elif out.ndim == 4:
            self.layout = "nchw" if out.shape[1] == num_features or out.shape[3] != num_features else "nhwc"
            self.num_prefix_tokens = 0
            if self.layout == "nchw":
                self.num_tokens, self.feature_dim = out.shape[2] * out.shape[3], out.shape[1]
            else:
                self.num_tokens, self.feature_dim = out.shape[1] * out.shape[2], out.shape[3]
        else:
            raise ValueError(f"{self.model_name}: unsupported forward_features output shape {tuple(out.shape)}")
        if self.num_tokens < 1:
            raise ValueError(f"{self.model_name}: no spatial tokens at image_size={self.image_size}")
        if pooled == "auto":
            pooled = "cls" if self.num_prefix_tokens > 0 else "mean"
        if pooled == "cls" and self.num_prefix_tokens == 0:
            raise ValueError(f"{self.model_name} has no class token; use pooled='mean'")
        self.pooled = pooled

    # ------------------------------------------------------------------ Backbone API
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> tokens (B, N, F), pooled (B, F)."""
        out = self.model.forward_features(x)
        if self.layout == "nlc":
            tokens = out[:, self.num_prefix_tokens:]
            pooled = out[:, 0] if self.pooled == "cls" else tokens.mean(dim=1)
            return tokens, pooled
        tokens = out.flatten(2).transpose(1, 2) if self.layout == "nchw" else out.flatten(1, 2)
        return tokens, tokens.mean(dim=1)

    def cache_config(self) -> dict[str, object]:
        """Base config plus the timm model name, layout and pooling."""
        config = super().cache_config()
        config.update(model_name=self.model_name, layout=self.layout, pooled=self.pooled)
        return config
