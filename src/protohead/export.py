"""Deployment export: backbone + head as one ONNX or TorchScript graph, images in, logits out.

:class:`DeployModel` chains a backbone (``(B, 3, S, S)`` preprocessed images → tokens ``(B, N, F)``,
pooled ``(B, F)``) and an eval-mode head (``HeadOptimal`` or ``BaselineHead``) and returns the logits
``(B, C)``, optionally plus a fixed post-hoc logit shift (:func:`prior_logit_shift`).
:func:`export_model` traces it (``torch.jit.trace`` for TorchScript, the TorchScript-based
``torch.onnx.export`` for ONNX, the dynamo exporter as a fallback), checks that the exported graph
reproduces PyTorch on a batch of another size than the traced one (the batch axis is dynamic), and
writes the file atomically. :func:`run_exported` / :func:`load_exported` run an exported file
(onnxruntime on CPU, or ``torch.jit.load``).

Preprocessing (resize + normalise, ``Backbone.preprocess``) stays outside the graph; the file's
metadata (:func:`read_export_metadata`) records the image size it was exported for and any entries
the caller adds (class names, pixel mean / std, τ, ...).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import math
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from protohead.atomic import atomic_open

ExportFormat = Literal["onnx", "torchscript"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
ONNX_OPSET = 17
"""ONNX opset of exported files (LayerNormalization needs ≥ 17)."""
VERIFY_TOLERANCE = 1e-3
"""Largest accepted |exported − PyTorch| logit difference at export time, relative to max(1, max |logit|)."""
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FILE = "protohead.json"
"""Name of the metadata entry: an ONNX ``metadata_props`` key, a TorchScript extra file."""
ONNX_PACKAGES = ("onnx", "onnxruntime")


class DeployModel(nn.Module):
    """Backbone + head for deployment: ``forward(images (B, 3, S, S) float32) → logits (B, C)``.

    Args:
        backbone: module mapping preprocessed images ``(B, 3, S, S)`` to ``(tokens (B, N, F), pooled (B, F))``
            (a :class:`protohead.backbones.base.Backbone`, or any module with that contract).
        head: :class:`protohead.head.HeadOptimal` or :class:`protohead.baselines.BaselineHead`; called in
            eval mode as ``head(tokens, pooled)`` → ``(logits (B, C), None, info)``.
        logit_shift: optional fixed ``(C,)`` vector added to the logits (a buffer, exported with the
            graph). The run's post-hoc prior shift softmax(log p − τ·log π) is ``-τ·log π`` added to the
            logits: see :func:`prior_logit_shift`. ``None`` (default) exports the head's own logits.
        temperature: the run's calibration temperature T (fitted on validation): the logits, shift included,
            are divided by T, so softmax of the output is the run's calibrated probability. 1 (default): none.
        round_features: round tokens and pooled to float16 and back before the head, as the feature cache
            does: a head trained on cached (frozen-backbone) features saw only such values, and
            ``protohead predict`` rounds them the same way. Leave ``False`` for end-to-end (fine-tuned) runs.
        views: the flips / rotations (:mod:`protohead.views`) whose class probabilities a prediction averages, as
            ``protohead predict`` does for a run with ``views > 1`` and ``tta``: the output is then log of the
            views' mean probability (+ shift, / T), whose softmax is that mean. Default: the image as it is.
    """

    logit_shift: torch.Tensor | None

    def __init__(self, backbone: nn.Module, head: nn.Module, logit_shift: torch.Tensor | None = None,
                 round_features: bool = False, temperature: float = 1.0,
                 views: tuple[str, ...] = ("identity",)) -> None:
        from protohead.views import check_view

        super().__init__()
        if not views or views[0] != "identity":
            raise ValueError(f"views must start with 'identity', got {list(views)}")
        self.views = tuple(check_view(view) for view in views)
        self.backbone = backbone
        self.head = head
        self.num_classes = head_num_classes(head)
        if logit_shift is not None:
            logit_shift = torch.as_tensor(logit_shift, dtype=torch.float32).detach().clone()
            if logit_shift.shape != (self.num_classes,):
                raise ValueError(f"logit_shift must have shape ({self.num_classes},) (one entry per class), "
                                 f"got {tuple(logit_shift.shape)}")
            if not bool(torch.isfinite(logit_shift).all()):
                raise ValueError("logit_shift contains NaN or Inf")
        self.register_buffer("logit_shift", logit_shift)
        self.round_features = bool(round_features)
        if not 0 < float(temperature) < float("inf"):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        self.temperature = float(temperature)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 preprocessed images → (B, C) logits (+ ``logit_shift`` when set)."""
        if len(self.views) == 1:
            logits = self._head_logits(images)
        else:  # the mean of the views' probabilities, as log-probabilities
            from protohead.views import apply_view

            probabilities = torch.stack([self._head_logits(apply_view(images, view)).softmax(-1)
                                         for view in self.views]).mean(0)
            logits = probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
        if self.logit_shift is not None:
            logits = logits + self.logit_shift.to(logits.dtype)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits

    def _head_logits(self, images: torch.Tensor) -> torch.Tensor:
        tokens, pooled = self.backbone(images)
        if self.round_features:
            tokens, pooled = tokens.half().float(), pooled.half().float()
        return self.head(tokens, pooled)[0]


def head_num_classes(head: nn.Module) -> int:
    """C of a ``HeadOptimal`` (``config.num_classes``) or ``BaselineHead`` (``num_classes``)."""
    config = getattr(head, "config", None)
    count = getattr(config, "num_classes", None) if config is not None else getattr(head, "num_classes", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"cannot tell the number of classes of head {type(head).__name__}: expected a "
                         "HeadOptimal (config.num_classes) or BaselineHead (num_classes)")
    return count


def prior_logit_shift(class_counts: np.ndarray | list[int] | tuple[int, ...], tau: float) -> torch.Tensor:
    """The (C,) logit shift ``-τ·log π`` of the post-hoc prior adjustment (:mod:`protohead.posthoc`).

    softmax(z − τ·log π) equals :func:`protohead.posthoc.adjust_probabilities` of softmax(z) at τ, so a
    :class:`DeployModel` with this ``logit_shift`` exports the adjusted decision rule. τ = 0 gives zeros.
    """
    from protohead.posthoc import log_prior

    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be finite and >= 0, got {tau}")
    return torch.as_tensor(-tau * log_prior(class_counts), dtype=torch.float32)


# ------------------------------------------------------------------------------------------- export
def export_model(model: DeployModel, path: str | Path, format: ExportFormat, image_size: int,
                 batch_size: int = 1, metadata: Mapping[str, object] | None = None) -> Path:
    """Export ``model`` to ``path`` as ONNX or TorchScript, verify it, write it atomically; returns the path.

    Args:
        model: the backbone + head; exported in eval mode on CPU (a model elsewhere is copied to CPU;
            the model's own train/eval mode is restored afterwards).
        path: target file (``.onnx`` / ``.pt`` by convention); parent folders are created. Written via a
            temp file beside it and ``os.replace``, so a failed export never leaves a partial file.
        format: ``"onnx"`` (opset :data:`ONNX_OPSET`, input ``images`` (B, 3, S, S) float32, output
            ``logits`` (B, C), dynamic batch axis; needs ``onnx`` and ``onnxruntime``) or
            ``"torchscript"`` (``torch.jit.trace``; run with ``torch.jit.load``).
        image_size: side S of the preprocessed input; must equal the backbone's ``image_size`` if it has one.
        batch_size: batch size of the trace example (the exported batch axis stays dynamic).
        metadata: extra JSON-serialisable entries stored in the file (see :func:`read_export_metadata`);
            ``format``, ``image_size``, ``num_classes``, ``input``/``output`` names, ``logit_shift``,
            ``round_features``, ``temperature`` and the verification's ``verified_max_abs_diff`` are always
            recorded.

    Verification: the exported graph is run (onnxruntime CPU / ``torch.jit.load``) on seeded random
    images of batch ``batch_size + 1`` and must match the PyTorch logits within :data:`VERIFY_TOLERANCE`
    (× max(1, max |logit|)); otherwise nothing is written and a ``ValueError`` says by how much it differs.

    Raises:
        ValueError: unknown format, bad sizes, missing ``onnx`` / ``onnxruntime`` (named), a model that
            cannot be traced, or an exported graph that does not reproduce PyTorch.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if not isinstance(model, DeployModel):
        raise ValueError(f"export_model expects a DeployModel (backbone + head), got {type(model).__name__}")
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    backbone_size = getattr(model.backbone, "image_size", None)
    if isinstance(backbone_size, int) and backbone_size != image_size:
        raise ValueError(f"image_size={image_size} differs from the backbone's image_size={backbone_size} "
                         "(the images the exported model expects are preprocessed to the backbone's size)")
    if format == "onnx":
        _require_onnx()
    info: dict[str, object] = dict(metadata or {})
    info.update(format=format, image_size=image_size, num_classes=model.num_classes, input=INPUT_NAME,
                output=OUTPUT_NAME, logit_shift=None if model.logit_shift is None else model.logit_shift.tolist(),
                round_features=model.round_features, temperature=model.temperature)
    try:
        json.dumps(info)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from None

    with _cpu_eval(model) as deploy:
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        check = torch.randn(batch_size + 1, 3, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = deploy(check).numpy()
            data = (_onnx_bytes(deploy, example) if format == "onnx"
                    else _torchscript_bytes(deploy, example))
    runner, _ = _load_bytes(data, format)
    try:
        got = runner(check.numpy())
    except Exception as error:
        raise ValueError(f"the exported {format} model fails on a batch of {batch_size + 1} "
                         f"(traced with {batch_size}): {_first_line(error)}") from None
    if got.shape != expected.shape:
        raise ValueError(f"the exported {format} model returns shape {got.shape} on a batch of "
                         f"{batch_size + 1}, PyTorch {expected.shape} (is the batch axis dynamic?)")
    difference = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if not difference <= VERIFY_TOLERANCE * scale:  # also catches NaN
        raise ValueError(f"the exported {format} model does not reproduce PyTorch: max |logit difference| "
                         f"{difference:.3g} on a batch of {batch_size + 1} (tolerance "
                         f"{VERIFY_TOLERANCE * scale:.3g}); the head or backbone takes a data-dependent path "
                         "the trace cannot record")
    info["verified_max_abs_diff"] = difference
    data = _with_metadata(data, format, info)
    target = Path(path)
    with atomic_open(target, "wb") as handle:
        handle.write(data)
    return target


@contextlib.contextmanager
def _cpu_eval(model: DeployModel) -> Iterator[DeployModel]:
    """The model in eval mode on CPU (a copy if it lives elsewhere); restores the original's mode after."""
    was_training = model.training
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    deploy = model if on_cpu else copy.deepcopy(model).cpu()
    deploy.eval()
    try:
        yield deploy
    finally:
        model.train(was_training)


def _require_onnx() -> None:
    """Raise ``ValueError`` naming the ONNX packages that are not installed."""
    missing = []
    for package in ONNX_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(package)
    if missing:
        raise ValueError(f"ONNX export needs {' and '.join(missing)}, which "
                         f"{'is' if len(missing) == 1 else 'are'} not installed: "
                         "pip install 'protohead[export]' (or pip install onnx onnxruntime onnxscript)")


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the expected warnings: static Python branches on shapes, deprecation of TorchScript and
    of the TorchScript-based ONNX exporter (both still work in torch 2.14)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        yield


def _torchscript_bytes(model: DeployModel, example: torch.Tensor) -> bytes:
    """``torch.jit.trace`` of ``model`` on ``example`` (B, 3, S, S), serialised."""
    try:
        with _quiet_tracing():
            traced = torch.jit.trace(model, (example,), check_trace=False)
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"torch.jit.trace of {_describe(model)} failed: {_first_line(error)}") from None
    buffer = io.BytesIO()
    with _quiet_tracing():
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def _onnx_bytes(model: DeployModel, example: torch.Tensor) -> bytes:
    """ONNX of ``model`` traced on ``example``: the TorchScript-based exporter, else the dynamo one.

    The TorchScript-based exporter comes first: the dynamo exporter (torch 2.14, onnxscript 0.7) cannot
    translate ``scaled_dot_product_attention`` with the head's boolean key mask, and is ~20x slower.
    """
    errors = []
    try:
        buffer = io.BytesIO()
        with _quiet_tracing():
            torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return buffer.getvalue()
    except ValueError:
        raise
    except Exception as error:
        errors.append(f"torch.onnx.export(dynamo=False): {_first_line(error)}")
    try:
        with _quiet_tracing():
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=max(ONNX_OPSET, 18), external_data=False, verbose=False,
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
        return program.model_proto.SerializeToString()
    except ValueError:
        raise
    except Exception as error:
        errors.append(f"torch.onnx.export(dynamo=True): {_first_line(error)}")
    raise ValueError(f"ONNX export of {_describe(model)} failed; " + "; ".join(errors))


def _describe(model: DeployModel) -> str:
    head = model.head
    config = getattr(head, "config", None)
    if config is not None:
        return (f"{type(head).__name__} (distance={config.distance}, attention={config.use_attention}, "
                f"mixing={config.resolved_mixing()}, scope={config.resolved_attention_scope()}, "
                f"abstention={config.use_abstention}) on {type(model.backbone).__name__}")
    return f"{type(head).__name__}({getattr(head, 'kind', '')}) on {type(model.backbone).__name__}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _with_metadata(data: bytes, format: ExportFormat, info: Mapping[str, object]) -> bytes:
    """``data`` with ``info`` stored as JSON (ONNX ``metadata_props`` / TorchScript extra file)."""
    text = json.dumps(info, sort_keys=True)
    if format == "onnx":
        import onnx

        proto = onnx.load_from_string(data)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_FILE, text
        onnx.checker.check_model(proto)
        return proto.SerializeToString()
    buffer = io.BytesIO()
    with _quiet_tracing():  # torch.jit.save / load warn that TorchScript is deprecated
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        torch.jit.save(module, buffer, _extra_files={METADATA_FILE: text})
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- run
def exported_format(path: str | Path) -> ExportFormat:
    """``"torchscript"`` (a zip archive) or ``"onnx"`` (anything else is tried as an ONNX protobuf).

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    return "torchscript" if zipfile.is_zipfile(path) else "onnx"


def load_exported(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """Load an exported file once; the returned function maps (B, 3, S, S) float images → (B, C) logits.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an exported ONNX / TorchScript model (names the file), or ONNX without onnxruntime.
    """
    path = Path(path)
    format = exported_format(path)  # first: a missing file is a FileNotFoundError naming it
    runner, metadata = _load_bytes(path.read_bytes(), format, path)
    image_size = metadata.get("image_size")

    def run(images: np.ndarray) -> np.ndarray:
        return runner(_check_images(images, image_size if isinstance(image_size, int) else None))
    return run


def run_exported(path: str | Path, images: np.ndarray) -> np.ndarray:
    """Run an exported model on preprocessed images: (B, 3, S, S) float → (B, C) float32 logits.

    ONNX files run with onnxruntime's ``CPUExecutionProvider``, TorchScript files with ``torch.jit.load``
    on CPU; the format is read from the file. Raises as :func:`load_exported`, plus ``ValueError`` for
    images of the wrong rank, channels, size or dtype (uint8 HWC images must go through
    ``Backbone.preprocess`` first).
    """
    return load_exported(path)(images)


def read_export_metadata(path: str | Path) -> dict[str, object]:
    """The metadata :func:`export_model` stored in the file (``{}`` for a file without it)."""
    path = Path(path)
    format = exported_format(path)
    return _load_bytes(path.read_bytes(), format, path)[1]


def _load_bytes(data: bytes, format: ExportFormat, source: str | Path = "the exported model"
                ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, object]]:
    """A runner over serialised model bytes (float32 (B, 3, S, S) → (B, C) float32) and the file's metadata."""
    if format == "torchscript":
        extra = {METADATA_FILE: ""}
        try:
            with _quiet_tracing():
                module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra)
        except Exception as error:
            raise ValueError(f"{source} is not a TorchScript model ({_first_line(error)})") from None
        module.eval()

        def run_torchscript(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(images)).numpy()
        return run_torchscript, _parse_metadata(extra[METADATA_FILE], source)
    _require_onnx()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ValueError(f"{source} is not an ONNX or TorchScript model ({_first_line(error)})") from None
    input_name = session.get_inputs()[0].name

    def run_onnx(images: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {input_name: images})[0])
    return run_onnx, _parse_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_FILE), source)


def _parse_metadata(text: str | bytes | None, source: str | Path) -> dict[str, object]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: unreadable export metadata ({error})") from None
    return data if isinstance(data, dict) else {}


def _check_images(images: np.ndarray, image_size: int | None) -> np.ndarray:
    """(B, 3, S, S) real-valued array → contiguous float32; ``ValueError`` naming what is wrong."""
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"images must be preprocessed (B, 3, S, S) float arrays, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError("empty batch: images has B = 0")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"images must be floating point (preprocessed with Backbone.preprocess), got "
                         f"dtype {array.dtype}")
    if image_size is not None and array.shape[2:] != (image_size, image_size):
        raise ValueError(f"images are {array.shape[2]}x{array.shape[3]} but the model was exported for "
                         f"{image_size}x{image_size}")
    return np.ascontiguousarray(array, dtype=np.float32)
