"""Where a run computes: ``device=auto|cpu|cuda`` and mixed precision on CUDA.

Data stay on the CPU (feature cache, decoded images) and each batch moves to the model's device when it is fetched
(:func:`to_device`); predictions come back to the CPU as NumPy. Under ``torchrun`` on CUDA every rank uses the GPU
``LOCAL_RANK`` names and the process group uses NCCL (:func:`protohead.training.distributed.init_from_env`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a ``ValueError`` naming the fix. Under
    torchrun the CUDA device is ``cuda:LOCAL_RANK`` (made current)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        raise ValueError("device=cuda, but this torch build or machine has no usable GPU "
                         "(torch.cuda.is_available() is False); use device=auto or device=cpu")
    if name == "cpu" or not available:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (CPU for an empty module)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Each tensor on ``device`` (no copy when it is there already; asynchronous from pinned CPU memory)."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX tiles). Without it CPU autocast
    still computes correctly, but emulated bfloat16 is slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's probes (private; may move)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool, cpu: bool = False) -> Iterator[None]:
    """bfloat16 autocast for a training step (no loss scaling needed: bfloat16 keeps float32's range): on CUDA when
    ``enabled``, on the CPU when ``cpu`` (opt-in: 1.8–2.5× faster partial fine-tuning steps on a CPU with AMX,
    BENCHMARKS §10). Otherwise a no-op: CPU runs stay in float32. Parameters, optimiser state and predictions are
    float32 either way."""
    if (enabled and device.type == "cuda") or (cpu and device.type == "cpu"):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
