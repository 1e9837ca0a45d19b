"""Building a model for a run: a head preset or a baseline on given features, optionally with its backbone.

:func:`build_model` makes a fresh model from a :class:`~protohead.runconfig.RunConfig`;
:func:`protohead.runfolder.load_model` is the one place that rebuilds a trained model from a run folder.
:func:`model_signature` describes a model's architecture in JSON, so a checkpoint can refuse to load into a
model of another configuration.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from protohead.baselines import BASELINES, BaselineHead
from protohead.config import HeadConfig
from protohead.head import HeadOptimal
from protohead.runconfig import RunConfig


class EndToEnd(nn.Module):
    """Backbone + head, so a fine-tuning checkpoint holds both; ``forward`` is the head's (features in)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.head(*args, **kwargs)

    def score(self, *args: Any, **kwargs: Any) -> Any:
        """The head's :meth:`score` (features in)."""
        return self.head.score(*args, **kwargs)

    @property
    def objective(self) -> Any:
        return self.head.objective


def build_model(config: RunConfig, num_classes: int, feature_dim: int, class_counts: list[int]) -> nn.Module:
    """A head preset (``HeadOptimal``) or a baseline (``BaselineHead``) for these features."""
    if config.preset in BASELINES:  # linear_la's τ is head.logit_adjustment, as for the head presets (default 1)
        return BaselineHead(config.preset, num_classes, feature_dim, class_counts,
                            float(config.head.get("logit_adjustment", 1.0)))
    return HeadOptimal(preset=config.preset, **{"num_classes": num_classes, "img_feat_dim": feature_dim,
                                               "class_counts": tuple(class_counts), **config.head})


def uncertainty_rule(model: nn.Module, selection: dict[str, Any] | None = None) -> tuple[bool, bool]:
    """(uncertainty from abstention, probabilities for a balanced prior) of a model's head: the two facts
    :func:`protohead.posthoc.final_outputs` needs to turn its outputs into the reported uncertainty.

    An abstention head reports its abstention probability unless the run's selection record says that the
    max-probability score ranked validation errors better (``uncertainty_source="max_probability"``).
    """
    head = head_of(model)
    if isinstance(head, HeadOptimal):
        abstention = head.config.use_abstention and (selection or {}).get("uncertainty_source") != "max_probability"
        return abstention, head.config.use_class_balanced or head.config.logit_adjustment > 0
    if isinstance(head, BaselineHead):
        return False, head.kind in ("linear_la", "balanced_softmax")
    return False, False


def head_of(model: nn.Module) -> nn.Module:
    """The head inside an :class:`EndToEnd` model, or the model itself."""
    return model.head if isinstance(model, EndToEnd) else model


def model_signature(model: nn.Module) -> dict[str, Any]:
    """JSON description of ``model``'s architecture and scoring (not its weights or class counts).

    Two models with equal signatures interpret the same ``state_dict`` the same way; a head preset and
    another preset with the same tensor shapes (e.g. ``basic`` vs ``head_v1``) differ here.
    """
    if isinstance(model, EndToEnd):
        backbone = model.backbone
        return {"backbone": {"name": getattr(backbone, "name", type(backbone).__name__),
                             "image_size": getattr(backbone, "image_size", None)},
                "head": model_signature(model.head)}
    if isinstance(model, HeadOptimal):
        config = model.config.to_dict()
        config.pop("class_counts", None)
        return {"kind": type(model).__name__, "config": config}
    if isinstance(model, BaselineHead):
        return {"kind": "BaselineHead", "baseline": model.kind, "num_classes": model.num_classes,
                "img_feat_dim": model.img_feat_dim}
    return {"kind": type(model).__name__}


LEGACY_HEAD_OPTIONS: dict[str, Any] = {"abstention_mode": "coupled"}
"""Head options that did not exist when older checkpoints were written, at the value those checkpoints meant."""


def head_from_signature(signature: dict[str, Any], class_counts: list[int] | None = None) -> HeadOptimal:
    """The head a checkpoint's signature describes, with its stored options exactly (defaults that changed since
    do not apply; options added since take :data:`LEGACY_HEAD_OPTIONS` or their defaults)."""
    options = {**LEGACY_HEAD_OPTIONS, **signature["config"]}
    known = HeadConfig.__dataclass_fields__
    config = HeadConfig.from_dict({k: v for k, v in options.items() if k in known and k != "class_counts"})
    if class_counts is not None:
        config = config.replace(class_counts=tuple(int(n) for n in class_counts))
    return HeadOptimal(config=config)


def signature_differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: stored → current`` for every leaf where two signatures differ (sorted). A key the stored
    signature lacks (an option added after it was written) differs only if the current value is not the one
    older checkpoints meant (:data:`LEGACY_HEAD_OPTIONS`)."""
    differences = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if key not in stored and prefix.endswith("config.") and LEGACY_HEAD_OPTIONS.get(key, new) == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differences += signature_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old!r} → {new!r}")
    return differences
