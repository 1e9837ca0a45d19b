"""The run configuration: YAML file + ``key=value`` overrides, type-checked, unknown keys rejected."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from protohead.baselines import BASELINES
from protohead.config import PRESETS, HeadConfig, preset_config
from protohead.data.base import DEFAULT_MAX_IMAGE_PIXELS, read_utf8_text

# The repository sits beside shared/ (the HAM10000 copy): src/protohead/runconfig.py → ../../../shared
DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ham10000"


@dataclass
class RunConfig:
    """Everything a ``protohead run`` needs. ``head`` holds :class:`HeadConfig` overrides on the preset."""

    data: str = str(DEFAULT_DATA)
    split: Literal["official", "lesion"] = "official"
    seed: int = 0
    preset: str = "patch"  # a head preset, or a baseline: linear, linear_la, balanced_softmax, cosine
    head: dict[str, Any] = field(default_factory=dict)
    backbone: str = "efficientnet_lite0"
    image_size: int = 224
    multiscale: bool = False  # efficientnet_lite0: append block 14's output (192 ch) to every token (F = 1472)
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
    reseed_dead: bool = True  # patch scoring: at each push, move prototypes winning no training image onto a patch
    final_push: bool = True  # patch scoring: after training, anchor the selected checkpoint's prototypes on patches
    anchored_epochs: int = 3  # patch scoring: epochs training the rest of the head with prototypes anchored
    anchored_lr: float = 3e-4  # learning rate of that phase (cosine decay, no warm-up)
    views: int = 1  # flips / 90° rotations of each image (1–8, protohead.views): training draws one per epoch
    tta: bool = True  # with views > 1: validation and test predictions are the mean over the views
    finetune: bool = False  # train the backbone end to end (no feature cache)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when there is a GPU (torchrun: cuda:LOCAL_RANK)
    amp: bool = True  # bfloat16 autocast for training steps on CUDA (no effect on the CPU)
    amp_cpu: bool = False  # bfloat16 autocast for training steps on the CPU too (fast with AVX512-BF16 / AMX)
    backbone_lr: float = 1e-4
    finetune_image_size: int = 160
    finetune_blocks: int = 0  # with finetune: 0 trains the whole backbone on images (at finetune_image_size); k ≥ 1
    # trains only its last k blocks + head conv on cached feature maps of the frozen rest (at image_size)
    augment: Literal["none", "flips", "strong"] = "none"  # with finetune (protohead.augment): flips = a random
    # symmetry of the square per image and step (of the cached front map when partial); strong (whole backbone
    # only) = random resized crop + colour jitter + flips
    loader_threads: int = 2  # fine-tuning the whole backbone: threads decoding (and augmenting) the next batch
    posthoc_tau: float | Literal["auto"] = "auto"  # post-hoc logit adjustment at prediction; "auto": chosen on val
    posthoc_accuracy_tolerance: float = 0.01  # "auto": val accuracy one may give up for val balanced accuracy
    calibrate: bool = True  # temperature scaling fitted on validation after the post-hoc shift
    refer_coverage: float = 0.9  # share of validation images under the run's uncertainty threshold: more uncertain
    # images (and those unlike the training images) are referred (protohead.referral)
    eval_batch_size: int = 256
    progress: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # refuse images whose header claims more (width × height)

    def __post_init__(self) -> None:
        """Check types, then every value against its range (:data:`VALUE_RULES`), then preset and head.

        Each failure is a ``ValueError`` naming the key and its value: no bad count, size or rate reaches
        training (``subset_per_class=0``, ``eval_batch_size=0``, ``lr=nan`` or ``lr=inf`` fail here).
        """
        check_types(self)
        self.data = os.path.abspath(self.data)  # stored absolute: a run folder works from any directory
        for key, (valid, rule) in VALUE_RULES.items():
            value = getattr(self, key)
            if not valid(value):
                raise ValueError(f"config key {key!r} = {value!r} is invalid: {rule}")
        if self.augment != "none" and not self.finetune:
            raise ValueError(f"config key 'augment' = {self.augment!r} acts on images or front maps while fine-tuning "
                             "(finetune=true); frozen features take flips as cached views: views=V")
        if self.augment == "strong" and self.finetune_blocks:
            raise ValueError("config key 'augment' = 'strong' crops and recolours images, which partial fine-tuning "
                             f"(finetune_blocks={self.finetune_blocks}) never sees (it trains on cached front maps); "
                             "use augment=flips there, or finetune_blocks=0")
        if self.multiscale and self.backbone != "efficientnet_lite0":
            raise ValueError(f"config key 'multiscale' = True is built for backbone efficientnet_lite0, not "
                             f"{self.backbone!r}")
        if self.preset not in PRESETS and self.preset not in BASELINES:
            raise ValueError(f"unknown preset {self.preset!r}; choose a head preset ({', '.join(sorted(PRESETS))}) "
                             f"or a baseline ({', '.join(BASELINES)})")
        head = {k: v for k, v in self.head.items() if k != "class_counts"}
        if self.preset in PRESETS:  # validates keys and values against the preset, before any data is read
            preset_config(self.preset, **head)
        else:
            HeadConfig().replace(**head)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def input_size(self) -> int:
        """The side images are resized to: ``finetune_image_size`` when the whole backbone trains on images,
        else ``image_size`` (frozen features, and partial fine-tuning on cached front maps)."""
        return self.finetune_image_size if self.finetune and not self.finetune_blocks else self.image_size

    def build_backbone(self) -> Any:
        """The pretrained backbone this config names, at :attr:`input_size`; made trainable when fine-tuning (all
        of it, or its last ``finetune_blocks`` blocks). A run's trained weights come from its checkpoint."""
        from protohead.backbones import build_backbone, train_backbone

        backbone = build_backbone(self.backbone, self.input_size, multiscale=self.multiscale)
        return train_backbone(backbone, self.finetune_blocks) if self.finetune else backbone

    @classmethod
    def from_dict(cls, data: Any, source: str | Path | None = None) -> RunConfig:
        """A config from a mapping of keys to values (e.g. a parsed ``config.yaml``).

        ``ValueError`` (prefixed with ``source``, e.g. the file, when given) for anything but a mapping
        (``None`` from an empty file included), unknown keys, and every check of :meth:`__post_init__`.
        """
        where = f"{source}: " if source is not None else ""
        if not isinstance(data, dict):
            what = "nothing (an empty file?)" if data is None else f"a {type(data).__name__}"
            raise ValueError(f"{where}a run config must be a mapping of keys to values, got {what}")
        data = upgrade_legacy_keys(data, where)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise ValueError(f"{where}unknown config key(s): {', '.join(unknown)} "
                             f"(valid keys: {', '.join(sorted(names))})")
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{where}{error}") from None


def upgrade_legacy_keys(data: dict[Any, Any], where: str = "") -> dict[Any, Any]:
    """Configs written before one name per thing: ``model`` is now ``preset``; ``logit_adjustment_tau`` (the
    τ of the ``linear_la`` baseline) is now ``head.logit_adjustment``, the key head presets already used."""
    data = dict(data)
    if "model" in data:
        if "preset" in data:
            raise ValueError(f"{where}give the preset once: 'preset' (formerly 'model'), not both")
        data["preset"] = data.pop("model")
    if "logit_adjustment_tau" in data:
        tau = data.pop("logit_adjustment_tau")
        if data.get("preset") == "linear_la":  # no other model read it
            head = data["head"] = dict(data.get("head") or {})
            head.setdefault("logit_adjustment", tau)
    return data


def _finite(value: float) -> bool:
    return math.isfinite(value)


VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: v >= 0, "seed must be ≥ 0"),
    "subset_per_class": (lambda v: v is None or v >= 1, "subset_per_class must be ≥ 1 (or null for all images)"),
    "epochs": (lambda v: v >= 1, "epochs and batch_size must be ≥ 1"),
    "batch_size": (lambda v: v >= 1, "epochs and batch_size must be ≥ 1"),
    "eval_batch_size": (lambda v: v >= 1, "eval_batch_size must be ≥ 1"),
    "refer_coverage": (lambda v: 0 < v <= 1, "refer_coverage must be in (0, 1] (1: the threshold is the largest "
                                             "validation uncertainty)"),
    "views": (lambda v: 1 <= v <= 8, "views must be between 1 and 8 (the symmetries of the square)"),
    "image_size": (lambda v: v >= 32, "image_size must be ≥ 32"),
    "finetune_image_size": (lambda v: v >= 32, "finetune_image_size must be ≥ 32"),
    "finetune_blocks": (lambda v: v >= 0, "finetune_blocks must be ≥ 0 (0: the whole backbone)"),
    "loader_threads": (lambda v: v >= 0, "loader_threads must be ≥ 0 (0: decode in the training thread)"),
    "lr": (lambda v: _finite(v) and v > 0, "learning rates must be positive and finite"),
    "backbone_lr": (lambda v: _finite(v) and v > 0, "learning rates must be positive and finite"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "weight_decay must be finite and ≥ 0"),
    "warmup_epochs": (lambda v: v >= 0, "warmup_epochs must be ≥ 0"),
    "push_every": (lambda v: v >= 0, "push_every must be ≥ 0 (0 disables push)"),
    "expand_every": (lambda v: v >= 0, "expand_every must be ≥ 0 (0 disables expansion)"),
    "expand_min_fraction": (lambda v: 0 < v <= 1, "expand_min_fraction must be in (0, 1]"),
    "anchored_epochs": (lambda v: v >= 0, "anchored_epochs must be ≥ 0 (0: no training after the final push)"),
    "anchored_lr": (lambda v: _finite(v) and v > 0, "learning rates must be positive and finite"),
    "posthoc_tau": (lambda v: v == "auto" or (_finite(v) and v >= 0), "posthoc_tau must be 'auto' or finite and ≥ 0"),
    "posthoc_accuracy_tolerance": (lambda v: 0 <= v <= 1, "posthoc_accuracy_tolerance must be in [0, 1]"),
    "max_image_pixels": (lambda v: v >= 1, "max_image_pixels must be ≥ 1 (width × height of the largest image)"),
}
"""Range checks of :class:`RunConfig`, run after the type checks: key → (predicate, rule shown on failure).

Comparisons with NaN are false, so ``0 < v <= 1``-style rules reject NaN as well."""


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


def _describe_yaml_error(error: Any) -> str:
    """A one-line description of a ``yaml.YAMLError``: what went wrong, and where (line, column)."""
    parts: list[str] = []
    for text, mark in ((getattr(error, "context", None), getattr(error, "context_mark", None)),
                       (getattr(error, "problem", None), getattr(error, "problem_mark", None))):
        if text:
            parts.append(f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else text)
    return "; ".join(parts) if parts else " ".join(str(error).split())


def read_config_file(path: str | Path, allow_empty: bool = True) -> dict[str, Any]:
    """The mapping in the YAML file ``path``; every problem is a one-line ``ValueError`` naming the file.

    Checked: the file exists and is readable, is UTF-8 (a byte-order mark is accepted), is valid YAML
    for ``yaml.safe_load`` (so a ``!!python/...`` tag is refused, never constructed), and holds a
    mapping. An empty file (or one holding only ``null``) gives ``{}`` when ``allow_empty``, else an error
    (a run folder's ``config.yaml`` is never empty).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = read_utf8_text(path, "config file ")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:  # ConstructorError (e.g. a !!python tag: refused, never run) included
        raise ValueError(f"config file {path} is not valid YAML: {_describe_yaml_error(error)}") from None
    except RecursionError:
        raise ValueError(f"config file {path} is nested too deeply to be a run config") from None
    if loaded is None:
        if allow_empty:
            return {}
        raise ValueError(f"config file {path} is empty; it must hold a mapping of keys to values")
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, not a {type(loaded).__name__}")
    return loaded


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                    allow_empty: bool = True, base: dict[str, Any] | None = None, **fields: Any) -> RunConfig:
    """A :class:`RunConfig` from ``base`` (e.g. a resumed run's stored config; default: the defaults), then an
    optional YAML file, then ``fields`` (``None`` = not given), then ``key=value`` overrides.

    The file is read by :func:`read_config_file` (``allow_empty``: an empty file counts as ``{}``); every
    error is a ``ValueError``, prefixed with the file's name when the file's own keys are at fault.
    """
    import copy

    data: dict[str, Any] = copy.deepcopy(base) if base else {}
    given = {k: v for k, v in fields.items() if v is not None}
    if path is not None:
        path = Path(path)
        data.update(read_config_file(path, allow_empty=allow_empty))
        if not base and not given and not overrides:  # only the file's keys: its name helps
            return RunConfig.from_dict(data, source=f"config file {path}")
    data.update(given)
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {text!r}: {key!r} is not a mapping")
        target[keys[-1]] = value
    return RunConfig.from_dict(data)
