"""The run configuration: YAML file + ``key=value`` overrides, type-checked, unknown keys rejected."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from protohead.baselines import BASELINES
from protohead.config import PRESETS, HeadConfig, preset_config

# The repository sits beside shared/ (the HAM10000 copy): src/protohead/runconfig.py → ../../../shared
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ham10000"


@dataclass
class RunConfig:
    """Everything a ``protohead run`` needs. ``head`` holds :class:`HeadConfig` overrides on the preset."""

    data: str = str(DEFAULT_DATA)
    split: Literal["official", "lesion"] = "official"
    seed: int = 0
    model: str = "basic"  # a head preset, or a baseline: linear, linear_la, balanced_softmax, cosine
    head: dict[str, Any] = field(default_factory=dict)
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    cache_dir: str | None = None
    subset_per_class: int | None = None  # cap images per class and split (quick runs, tests)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    push_every: int = 5  # epochs between pushes; 0 disables push
    expand_every: int = 5  # epochs between expansion checks; 0 disables expansion
    expand_min_fraction: float = 0.2  # expand a class when this share of its samples is poorly covered
    finetune: bool = False  # train the backbone end to end (no feature cache)
    backbone_lr: float = 1e-4
    finetune_image_size: int = 160
    logit_adjustment_tau: float = 1.0
    posthoc_tau: float | Literal["auto"] = "auto"  # post-hoc logit adjustment at prediction; "auto": chosen on val
    posthoc_accuracy_tolerance: float = 0.01  # "auto": val accuracy one may give up for val balanced accuracy
    eval_batch_size: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 32:
            raise ValueError("epochs and batch_size must be ≥ 1 and image_size ≥ 32")
        if self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError("learning rates must be positive")
        if (self.posthoc_tau != "auto" and self.posthoc_tau < 0) or not 0 <= self.posthoc_accuracy_tolerance <= 1:
            raise ValueError("posthoc_tau must be 'auto' or ≥ 0, and posthoc_accuracy_tolerance in [0, 1]")
        if self.model not in PRESETS and self.model not in BASELINES:
            raise ValueError(f"unknown model {self.model!r}; choose a preset ({', '.join(sorted(PRESETS))}) "
                             f"or a baseline ({', '.join(BASELINES)})")
        head = {k: v for k, v in self.head.items() if k != "class_counts"}
        if self.model in PRESETS:  # validates keys and values against the preset, before any data is read
            preset_config(self.model, **head)
        else:
            HeadConfig().replace(**head)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)} (valid keys: {', '.join(sorted(names))})")
        return cls(**data)


def check_types(config: Any) -> None:
    """Raise ``ValueError`` naming a field whose value has the wrong type."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise ValueError(f"config key {f.name!r} expects {_describe(hints[f.name])}, got {value!r} "
                             f"({type(value).__name__})")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML/JSON scalar)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        import yaml

        value = yaml.safe_load(raw) if raw != "" else ""
    except ImportError:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
    except Exception as error:  # yaml.YAMLError
        raise ValueError(f"cannot parse the value of override {text!r}: {error}") from None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
    return key.split("."), value


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                    **fields: Any) -> RunConfig:
    """A :class:`RunConfig` from an optional YAML file, then ``fields``, then ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
        data.update(loaded or {})
    data.update({k: v for k, v in fields.items() if v is not None})
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {text!r}: {key!r} is not a mapping")
        target[keys[-1]] = value
    return RunConfig.from_dict(data)
