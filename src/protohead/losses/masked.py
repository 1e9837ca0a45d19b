"""Reductions over the valid prototype slots only (pure; the losses and the head share them)."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def masked_max(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over the last axis among valid entries.

    Args:
        values: (..., C, M).
        valid: (C, M) bool; every row must hold at least one True.

    Returns:
        (max, argmax), each (..., C). Invalid entries take no part and receive exactly zero gradient.
    """
    return values.masked_fill(~valid, NEG_INF).max(dim=-1)


def masked_min(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Min over the last axis among valid entries: (..., C, M) with (C, M) mask → (..., C)."""
    return values.masked_fill(~valid, float("inf")).amin(dim=-1)
