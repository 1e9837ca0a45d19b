"""PyTorch distributed (torchrun) helpers: gloo on CPU, nccl on GPU.

Scheme: every rank runs the same model with the same seed; each global batch is split into rank shards
(``indices[rank::world]``); per-sample outputs are all-gathered (differentiably) so every rank computes the
*global-batch* loss, and gradients are averaged across ranks. Non-decomposable terms (cluster loss over the
classes present, class weights) therefore see the same batch as a single process would.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist


def init_from_env(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns (rank, world size). NCCL when the
    run computes on CUDA (``device`` auto with a GPU, or cuda; each rank on GPU ``LOCAL_RANK``), else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        from protohead.device import resolve_device

        backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of ``indices``: every world-th element starting at the rank."""
    rank, world = rank_and_world()
    return indices[rank::world]


def _padded_gather(rows: torch.Tensor, differentiable: bool) -> torch.Tensor:
    world = rank_and_world()[1]
    sizes = [torch.zeros((), dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(rows.shape[0], dtype=torch.long, device=rows.device))
    largest = int(max(sizes))
    padded = torch.cat([rows, rows.new_zeros(largest - rows.shape[0], *rows.shape[1:])]) if rows.shape[0] < largest \
        else rows
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes, strict=True)])


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n_r, ...) rows in rank order; differentiable. Identity in one process."""
    if rank_and_world()[1] == 1:
        return rows
    return _padded_gather(rows, differentiable=rows.requires_grad)


def gather_rows_nograd(rows: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] == 1:
        return rows
    return _padded_gather(rows.detach(), differentiable=False)


def average_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the gradients of ``parameters`` across ranks (no-op in one process)."""
    world = rank_and_world()[1]
    if world == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad /= world


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (e.g. a fine-tuned backbone's BatchNorm running statistics) to every rank."""
    if rank_and_world()[1] == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def sample_gather() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The per-sample gather a head should apply before its loss, or None in a single process."""
    return gather_rows if rank_and_world()[1] > 1 else None
