"""Checkpoints: one safetensors file (tensors) with JSON metadata, written atomically.

Nothing in the load path unpickles: tensors come from safetensors, everything else from JSON.

Integrity: safetensors itself has no checksum, so a flipped bit in tensor data would load silently.
Every checkpoint therefore carries ``protohead_sha256`` in its safetensors metadata: a sha256 over the
JSON metadata string and every tensor (name, dtype, shape, bytes, in sorted name order).
:func:`read_checkpoint` recomputes it and rejects a mismatch. A file without the entry (written before
the checksum existed, or with the entry stripped, which a forger would do) still loads, but with an
:class:`UnverifiedCheckpointWarning` naming it; ``read_checkpoint(path, require_checksum=True)`` refuses it.

Atomicity: the file is written to a hidden temporary sibling (``.<name>.<random>.tmp``), fsynced and
``os.replace``-d over ``path``; a process killed mid-write leaves the previous checkpoint intact (plus
at worst a stray ``.tmp`` file, which no loader reads). The final file has the usual permissions
(``0666 & ~umask``): safetensors' ``save_file`` replaces the file it is given by one of mode 0600, so the
mode is set after it has written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

OPTIMIZER_PREFIX = "optimizer/"
MODEL_PREFIX = "model/"
RNG_KEY = "rng/torch"
META_KEY = "protohead"
CHECKSUM_KEY = "protohead_sha256"


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint was loaded without a stored sha256, so its tensors and metadata are unverified."""


def checkpoint_digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 hex over ``meta_json`` and every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slot in state["state"].items():
        for key, value in slot.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIMIZER_PREFIX}{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIMIZER_PREFIX):
            index, key = name[len(OPTIMIZER_PREFIX):].split("/", 1)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write model (+ optimiser, torch RNG) tensors and JSON ``metadata`` to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {MODEL_PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"user": metadata or {}}
    if optimizer is not None:
        optimizer_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update({k: v.contiguous().cpu() for k, v in optimizer_tensors.items()})
    tensors[RNG_KEY] = torch.get_rng_state()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-write (one writer)
        stale.unlink(missing_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        meta_json = json.dumps(meta)
        save_file(tensors, temp_name, metadata={META_KEY: meta_json,
                                                CHECKSUM_KEY: checkpoint_digest(tensors, meta_json)})
        # mkstemp makes 0600, and save_file swaps in a new 0600 file of its own: set the mode afterwards
        os.chmod(temp_name, 0o666 & ~umask)
        with open(temp_name, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def read_checkpoint(path: str | Path, require_checksum: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint; a missing, truncated or corrupt file is a ``ValueError`` naming it.

    Corrupt includes: not a safetensors file (e.g. a pickle), a garbage header, truncation, and tensor or
    metadata bytes that no longer match the stored sha256. A file with no stored sha256 cannot be checked:
    it is a ``ValueError`` naming it when ``require_checksum``, else it loads with an
    :class:`UnverifiedCheckpointWarning` naming it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            meta_json = header[META_KEY]
            meta = json.loads(meta_json)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        expected = header.get(CHECKSUM_KEY)
        actual = checkpoint_digest(tensors, meta_json) if expected is not None else None
    except Exception as error:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error})") from None
    if expected is None:
        if require_checksum:
            raise ValueError(f"checkpoint {path} carries no sha256 ({CHECKSUM_KEY}), so it cannot be verified; "
                             "refusing it (re-save it with this version, or load it without require_checksum)")
        warnings.warn(f"checkpoint {path} carries no sha256 ({CHECKSUM_KEY}): loaded UNVERIFIED, its tensors "
                      "and metadata may have been altered", UnverifiedCheckpointWarning, stacklevel=2)
    elif actual != expected:
        raise ValueError(f"checkpoint {path} is corrupt: its tensors or metadata fail the sha256 check "
                         f"(stored {expected[:12]}…, computed {actual[:12]}…)")
    return tensors, meta


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = False, require_checksum: bool = False) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``); returns the user metadata.

    ``require_checksum``: refuse a checkpoint without a stored sha256 (see :func:`read_checkpoint`).
    """
    tensors, meta = read_checkpoint(path, require_checksum=require_checksum)
    return load_state(path, model, tensors, meta, optimizer, restore_rng)


def load_state(path: str | Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
               optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = False) -> dict[str, Any]:
    """Load what :func:`read_checkpoint` returned into ``model`` (and ``optimizer``); returns the user metadata.

    A checkpoint whose metadata carries the model's ``signature`` (see :func:`protohead.model.model_signature`)
    refuses a model of another configuration, naming both, even when every tensor shape matches.
    """
    from protohead.model import model_signature, signature_differences

    stored = meta.get("user", {}).get("signature")
    if stored is not None:
        differences = signature_differences(stored, model_signature(model))
        if differences:
            raise ValueError(f"checkpoint {path} holds a model of another configuration than the one it is loaded "
                             f"into (checkpoint → model: {'; '.join(differences[:6])})")
    model_state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not match the model: {error}") from None
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"checkpoint {path} holds no optimiser state")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if restore_rng:
        torch.set_rng_state(tensors[RNG_KEY])
    return meta["user"]
