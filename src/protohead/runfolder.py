"""The run folder: its layout, how it is recognised, created, replaced and locked, and its configuration.

A run folder is what ``protohead run`` / ``train`` write into ``--out``::

    run.json                  marker: format, status (training / finished / failed / interrupted), error
    config.yaml               the RunConfig
    checkpoints/best.safetensors, checkpoints/last.safetensors
    log.csv                   one row per epoch: loss, validation accuracy / balanced accuracy, τ, time
    history.json, train_ids.json, timing.json, metrics.json, report.md, *.png, predictions_<split>.npz
    prototypes/               each pushed prototype's source image + index.json (explanations need no data)
    eval-<split>/, explain/   written later by ``evaluate`` and ``explain``; export/ by ``export``

Safety rules (nothing that protohead did not write is ever removed):

- ``--out`` may not be the working directory or one of its parents, nor the data folder, one of its
  parents, or a folder inside it; this is checked before anything is created.
- ``--overwrite`` replaces only a folder recognised as a protohead run (``run.json``, or a ``config.yaml``
  that reads as a run config) and only when every file in it is one protohead writes (:func:`own_file`);
  otherwise it refuses and names the files it would not remove. Links are removed, never followed.
- The folder is created (or cleared) only once the data are prepared, so a failed start leaves nothing;
  a run that fails later says so in ``run.json`` (status ``failed`` and the error).
- One process at a time: an exclusive lock (``.protohead.lock``, via ``filelock``) is held while a run
  writes; a second ``run --overwrite`` against a live run is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fnmatch
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from protohead.atomic import write_text_atomic
from protohead.ood import HISTOGRAM_FILE, OOD_FILE, ROC_FILE, SCORES_FILE
from protohead.runconfig import RunConfig

CONFIG_FILE = "config.yaml"
MARKER_FILE = "run.json"
LOCK_FILE = ".protohead.lock"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = f"{CHECKPOINT_DIR}/best.safetensors"
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/last.safetensors"
HISTORY_FILE = "history.json"
TRAIN_IDS_FILE = "train_ids.json"
TIMING_FILE = "timing.json"
LOG_FILE = "log.csv"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
EXPLAIN_DIR = "explain"
EXPORT_DIR = "export"
MARKER_FORMAT = "protohead-run"

PLOT_FILES = ("confusion_matrix.png", "reliability.png", "risk_coverage.png")
EVALUATION_FILES = (METRICS_FILE, *PLOT_FILES, "predictions_*.npz")
OWN_PATTERNS: tuple[str, ...] = (
    MARKER_FILE, LOCK_FILE, CONFIG_FILE, HISTORY_FILE, TRAIN_IDS_FILE, TIMING_FILE, REPORT_FILE, LOG_FILE,
    "cell.json",
    *EVALUATION_FILES,
    f"{CHECKPOINT_DIR}/*.safetensors",
    *(f"eval-*/{name}" for name in EVALUATION_FILES),
    *(f"ood-*/{name}" for name in (OOD_FILE, SCORES_FILE, HISTOGRAM_FILE, ROC_FILE)),  # evaluate --ood's default
    f"{EXPLAIN_DIR}/*.png", f"{EXPLAIN_DIR}/*.json", f"{EXPLAIN_DIR}/*.html",
    "prototypes/source_*.png", "prototypes/index.json", f"{EXPORT_DIR}/model.onnx", f"{EXPORT_DIR}/model.pt",
)
"""Relative paths (``/``-separated; fnmatch patterns matched part by part, so ``*`` never spans a ``/``) of every
file protohead writes into a run folder."""

TEMP_PATTERN = ".*.tmp"  # atomic writers' temporary siblings (protohead.atomic, checkpoints), in any folder

Status = Literal["training", "finished", "failed", "interrupted"]
Plan = Literal["create", "resume", "replace"]


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------- recognising a run folder
def own_file(relative: str) -> bool:
    """Whether ``relative`` (a ``/``-separated path inside a run folder) is a file protohead writes there."""
    parts = relative.split("/")
    if fnmatch.fnmatchcase(parts[-1], TEMP_PATTERN) and len(parts) <= 2:
        return True
    return any(len(parts) == len(pattern_parts) and all(map(fnmatch.fnmatchcase, parts, pattern_parts))
               for pattern_parts in (pattern.split("/") for pattern in OWN_PATTERNS))


def _entries(run_dir: Path) -> Iterator[tuple[str, Path, bool]]:
    """(relative path, path, is a directory) of everything below ``run_dir``, links never followed."""
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        base = Path(root)
        for name in dirs:
            path = base / name
            relative = path.relative_to(run_dir).as_posix()
            if path.is_symlink():
                yield relative, path, False  # a link is an entry of its own, never descended into
            else:
                yield relative, path, True
        for name in files:
            path = base / name
            yield path.relative_to(run_dir).as_posix(), path, False


def foreign_files(run_dir: str | Path) -> list[str]:
    """Files (and links) below ``run_dir`` that protohead does not write, as relative paths, sorted."""
    run_dir = Path(run_dir)
    return sorted(rel for rel, _, is_dir in _entries(run_dir) if not is_dir and not own_file(rel))


def read_marker(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` marker of ``run_dir``, or ``None`` when it has none (or an unreadable one)."""
    path = Path(run_dir) / MARKER_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def write_marker(run_dir: str | Path, status: Status, error: str | None = None) -> None:
    """Write ``run.json`` (atomically) with ``status`` and, for a failed run, the error message."""
    from protohead import __version__

    path = Path(run_dir) / MARKER_FILE
    previous = read_marker(run_dir) or {}
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    marker = {"format": MARKER_FORMAT, "version": 1, "protohead": __version__, "status": status,
              "error": error, "started": previous.get("started", now), "updated": now}
    write_text_atomic(path, json.dumps(marker, indent=2) + "\n")


def is_run_dir(run_dir: str | Path) -> bool:
    """A folder protohead wrote: it has a ``run.json`` marker, or (runs written before the marker existed)
    a ``config.yaml`` that reads as a run configuration."""
    run_dir = Path(run_dir)
    if read_marker(run_dir) is not None:
        return True
    try:
        read_config(run_dir)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- configuration
def read_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` stored in ``run_dir/config.yaml``; one-line ``ValueError`` naming the file when
    it is missing, empty, not UTF-8, not YAML, not a mapping, carries a Python tag, or holds bad keys/values."""
    from protohead.runconfig import load_run_config

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir} is not a protohead run folder (no {CONFIG_FILE})")
    return load_run_config(path, allow_empty=False)


def write_config(run_dir: str | Path, config: RunConfig) -> None:
    """Write ``config.yaml`` atomically."""
    import yaml

    write_text_atomic(Path(run_dir) / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=True))


RESUME_FREE_KEYS = frozenset({"progress", "cache_dir", "data", "eval_batch_size", "max_image_pixels"})
"""Keys a resumed run may change: where things are and how they are shown, not what is trained."""


def _flatten(config: RunConfig) -> dict[str, Any]:
    flat = {k: v for k, v in config.to_dict().items() if k != "head"}
    flat.update({f"head.{k}": v for k, v in config.head.items()})
    return flat


def config_changes(stored: RunConfig, requested: RunConfig) -> list[str]:
    """Keys (``head.x`` for head options) whose values differ, apart from :data:`RESUME_FREE_KEYS`, as
    ``key: old → new`` lines, sorted."""
    old, new = _flatten(stored), _flatten(requested)

    def shown(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(unset)"

    return [f"{key}: {shown(old, key)} → {shown(new, key)}" for key in sorted(set(old) | set(new))
            if key not in RESUME_FREE_KEYS and shown(old, key) != shown(new, key)]


# ----------------------------------------------------------------------------- where a run may go
def _resolve(path: str | Path) -> Path:
    return Path(os.path.abspath(path)).resolve()


def check_location(run_dir: str | Path, data: str | Path | None) -> None:
    """Refuse a run folder that is the working directory or above it, or the data folder, above it or in it."""
    target = _resolve(run_dir)
    cwd = _resolve(Path.cwd())
    if target == cwd or target in cwd.parents:
        raise RunFolderError(f"--out {run_dir} is the working directory or one of its parents; choose a "
                             "folder of its own (e.g. runs/NAME)")
    if data is not None:
        data_path = _resolve(data)
        if target == data_path or target in data_path.parents:
            raise RunFolderError(f"--out {run_dir} is the data folder {data} or one of its parents; choose "
                                 "a folder outside the data")
        if data_path in target.parents:
            raise RunFolderError(f"--out {run_dir} lies inside the data folder {data}; choose a folder "
                                 "outside the data")


def describe_status(run_dir: Path) -> str:
    marker = read_marker(run_dir)
    if marker is None:
        return "a protohead run"
    text = f"a {marker.get('status', 'unknown')} protohead run"
    if marker.get("error"):
        text += f" ({marker['error']})"
    return text


def plan_run_dir(run_dir: str | Path, data: str | Path | None, resume: bool, overwrite: bool) -> Plan:
    """Decide what to do with ``run_dir`` without creating or changing anything.

    Returns ``"create"`` (absent or empty), ``"resume"`` (an existing run, ``resume``) or ``"replace"``
    (an existing run, ``overwrite``, every file protohead's own). Raises :class:`RunFolderError` otherwise.
    """
    run_dir = Path(run_dir)
    check_location(run_dir, data)
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunFolderError(f"run folder {run_dir} is a broken link")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} exists and is not a directory")
    if not run_dir.exists() or all(entry.name == LOCK_FILE for entry in run_dir.iterdir()):
        if resume:
            raise RunFolderError(f"nothing to resume: {run_dir} holds no run")
        return "create"
    if not is_run_dir(run_dir):
        raise RunFolderError(f"{run_dir} exists, is not empty and is not a protohead run folder (no {MARKER_FILE} "
                             f"or {CONFIG_FILE}); protohead never deletes or mixes into it: choose another --out")
    if resume:
        return "resume"
    if not overwrite:
        raise RunFolderError(f"run folder {run_dir} already holds {describe_status(run_dir)}; pass --resume to "
                             "continue it or --overwrite to replace it")
    foreign = foreign_files(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunFolderError(f"--overwrite refused: {run_dir} holds files protohead did not write ({shown}); "
                             "move them away or choose another --out")
    return "replace"


def remove_run_files(run_dir: str | Path) -> list[str]:
    """Delete protohead's own files below ``run_dir`` (never the lock, never a foreign file, links unlinked,
    not followed), then the folders left empty. Returns the removed relative paths."""
    run_dir = Path(run_dir)
    removed: list[str] = []
    entries = list(_entries(run_dir))
    for rel, path, is_dir in entries:
        if not is_dir and own_file(rel) and rel != LOCK_FILE:
            path.unlink()
            removed.append(rel)
    for _, path, is_dir in sorted(entries, key=lambda e: e[0].count("/"), reverse=True):
        if is_dir:
            with contextlib.suppress(OSError):  # not empty: it holds something that is not ours
                path.rmdir()
    return removed


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock (created inside it); :class:`RunFolderError` if another process has it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(run_dir) / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderError(f"run folder {run_dir} is in use by another protohead process") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def open_run_dir(run_dir: str | Path, plan: Plan, config: RunConfig, data: str | Path | None,
                 write: bool = True) -> Iterator[Path]:
    """Create / clear / reopen ``run_dir`` per ``plan`` under its lock, write ``config.yaml`` and the marker,
    and record how the body ends: ``finished``, ``failed`` (with the error) or ``interrupted``.

    ``write=False`` (other ranks under torchrun) only yields the path.
    """
    run_dir = Path(run_dir)
    if not write:
        yield run_dir
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with lock_run_dir(run_dir):
        # checked again under the lock: another process may have written here since the plan was made
        again = plan_run_dir(run_dir, data, resume=plan == "resume", overwrite=plan == "replace")
        if again == "replace":
            remove_run_files(run_dir)
        if again != "resume" or not (run_dir / CONFIG_FILE).is_file():
            write_config(run_dir, config)
        write_marker(run_dir, "training")
        try:
            yield run_dir
        except (KeyboardInterrupt, SystemExit):
            write_marker(run_dir, "interrupted")
            raise
        except BaseException as error:
            write_marker(run_dir, "failed", " ".join(f"{type(error).__name__}: {error}".split()))
            raise
        write_marker(run_dir, "finished")


# ----------------------------------------------------------------------------- the trained model
DESCRIPTION_VERSION = 1


def describe_run(config: RunConfig, data: Any) -> dict[str, Any]:
    """What a checkpoint needs to be used without the training data (stored in every checkpoint as ``run``).

    ``data``: the run's :class:`~protohead.pipeline.PreparedData`. Keys: ``config`` (the RunConfig),
    ``class_names``, ``class_counts`` (training split: the one class prior), ``feature_dim``, ``backbone``
    (name, image size, cache key of its features), ``features`` (``"float16_cache"`` for frozen features,
    which the head saw rounded to float16, or ``"end_to_end"``: the backbone's weights are in the checkpoint).
    """
    return {"version": DESCRIPTION_VERSION, "config": config.to_dict(), "class_names": list(data.class_names),
            "class_counts": [int(c) for c in data.class_counts], "feature_dim": int(data.feature_dim),
            "backbone": data.backbone_identity, "features": "end_to_end" if config.finetune else "float16_cache"}


@dataclasses.dataclass
class LoadedRun:
    """A trained model rebuilt from a run folder (eval mode) with everything needed to use it.

    Attributes:
        run_dir: the folder. config: its RunConfig. description: see :func:`describe_run`.
        model: the head (frozen features) or :class:`~protohead.model.EndToEnd` (fine-tuned), eval mode.
        selection: the checkpoint's selection record (``epoch``, ``val_balanced_accuracy``, ``posthoc_tau``).
    """

    run_dir: Path
    config: RunConfig
    description: dict[str, Any]
    model: Any
    selection: dict[str, Any]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.description["class_names"])

    @property
    def class_counts(self) -> list[int]:
        return list(self.description["class_counts"])

    @property
    def posthoc_tau(self) -> float:
        return float(self.selection.get("posthoc_tau", 0.0))

    @property
    def temperature(self) -> float:
        """The calibration temperature fitted on validation (1: none)."""
        return float(self.selection.get("calibration_temperature", 1.0))


def load_model(run_dir: str | Path, checkpoint: str = BEST_CHECKPOINT, data: Any = None) -> LoadedRun:
    """Rebuild the model of a run folder from its checkpoint alone — the one place that does so.

    The checkpoint's ``run`` description gives classes, counts, feature size and backbone, so neither the
    dataset nor its features are read. Runs written before checkpoints described themselves are rebuilt
    from their data (``data``: a prepared dataset to reuse, else it is prepared from the stored config).
    Raises ``ValueError`` naming the file when the folder, config or checkpoint is unusable.
    """
    from protohead.model import EndToEnd, build_model, head_from_signature
    from protohead.training.checkpoint import load_state, read_checkpoint

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    path = run_dir / checkpoint
    if not path.is_file():
        raise RunFolderError(f"run {run_dir} has no {checkpoint} (did it finish an epoch?)")
    tensors, meta = read_checkpoint(path)
    user = meta.get("user", {})
    description = user.get("run")
    if description is None:  # an older run: learn classes and features from its data
        if data is None:
            from protohead.pipeline import prepare

            data = prepare(config)
        description = describe_run(config, data)
    else:
        config = RunConfig.from_dict({**description["config"], "data": config.data})  # config.yaml's data path
    signature = user.get("signature") or {}
    if signature.get("kind") == "HeadOptimal" or signature.get("head", {}).get("kind") == "HeadOptimal":
        model = head_from_signature(signature.get("head", signature), description["class_counts"])
    else:
        model = build_model(config, len(description["class_names"]), description["feature_dim"],
                            description["class_counts"])
    if config.finetune:
        model = EndToEnd(config.build_backbone(), model)  # the backbone's weights come from the checkpoint
    load_state(path, model, tensors, meta)
    model.eval()
    return LoadedRun(run_dir, config, description, model, dict(user.get("best", {})))


def load_backbone(loaded: LoadedRun) -> Any:
    """The backbone that makes the run's features: the fine-tuned one inside the model, or the frozen one
    rebuilt by name (``ValueError`` when the installed weights differ from those the run was trained on)."""
    from protohead.model import EndToEnd

    if isinstance(loaded.model, EndToEnd):
        return loaded.model.backbone
    identity = loaded.description.get("backbone") or {}
    backbone = loaded.config.build_backbone()
    expected = identity.get("cache_key")
    if expected is not None and backbone.cache_key() != expected:
        raise RunFolderError(f"the installed backbone {loaded.config.backbone} ({backbone.cache_key()}) is not the "
                             f"one run {loaded.run_dir} was trained on ({expected}): its weights or preprocessing "
                             "differ")
    return backbone.eval()


def prepare_run(loaded: LoadedRun, config: RunConfig | None = None) -> Any:
    """The run's data prepared for its own model (:func:`protohead.pipeline.prepare`): features of the backbone
    :func:`load_backbone` gives — the fine-tuned one inside the model, or the frozen one checked against the run's
    weights. ``config``: the run's config with changes (e.g. where the data are now); default ``loaded.config``."""
    from protohead.pipeline import prepare

    return prepare(config if config is not None else loaded.config, backbone=load_backbone(loaded))


# ----------------------------------------------------------------------------- prototype sources
PROTOTYPES_DIR = "prototypes"
PROTOTYPES_INDEX = f"{PROTOTYPES_DIR}/index.json"
SOURCE_MAX_SIDE = 256  # source images are stored at most this large (HAM10000 images are 200 × 150)


def write_prototype_sources(run_dir: str | Path, head: Any, train_images: Any, image_size: int) -> int:
    """Store each pushed prototype's source training image (downsized PNG) and push record in the run folder,
    so explanations need no dataset. Returns the number of images written.

    ``train_images``: the training :class:`~protohead.data.base.ImageSplit` (row ``push_image`` indexes it).
    ``prototypes/index.json`` lists per (class, slot): image id, file, token, similarity, the token grid's
    image size and the stored image's original (H, W).
    """
    from PIL import Image

    from protohead.atomic import atomic_open

    run_dir = Path(run_dir)
    folder = run_dir / PROTOTYPES_DIR
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    valid = head.bank.valid
    records, written = [], {}
    for c, slot in valid.nonzero().tolist():
        index = int(head.push_image[c, slot])
        if index < 0:
            continue
        image_id = train_images.ids[index]
        if index not in written:
            image = train_images.load(index)
            original = image.shape[:2]
            picture = Image.fromarray(image)
            picture.thumbnail((SOURCE_MAX_SIDE, SOURCE_MAX_SIDE))
            name = f"source_{index}.png"
            with atomic_open(folder / name) as handle:
                picture.save(handle, format="PNG")
            written[index] = (name, original)
        name, original = written[index]
        records.append({"class": c, "slot": slot, "image_index": index, "image_id": image_id, "file": name,
                        "token": int(head.push_token[c, slot]), "similarity": float(head.push_similarity[c, slot]),
                        "original_size": list(original), "image_size": image_size})
    write_text_atomic(run_dir / PROTOTYPES_INDEX, json.dumps(records, indent=1) + "\n")
    return len(written)


def read_prototype_sources(run_dir: str | Path) -> dict[tuple[int, int], dict[str, Any]]:
    """(class, slot) → push record with ``image`` ((H, W, 3) uint8, resized back to the original size), from
    :func:`write_prototype_sources`; empty when the run stored none."""
    import numpy as np
    from PIL import Image

    run_dir = Path(run_dir)
    index_path = run_dir / PROTOTYPES_INDEX
    if not index_path.is_file():
        return {}
    sources = {}
    for record in json.loads(index_path.read_text(encoding="utf-8")):
        with Image.open(run_dir / PROTOTYPES_DIR / record["file"]) as stored:
            height, width = record["original_size"]
            image = np.asarray(stored.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
        sources[(int(record["class"]), int(record["slot"]))] = {**record, "image": image}
    return sources
