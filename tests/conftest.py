"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ham10000_root() -> Path:
    """The shared HAM10000 folder (override with ``PROTOHEAD_HAM10000``); skips if absent."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
    root = Path(os.environ.get("PROTOHEAD_HAM10000", default))
    if not (root / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"HAM10000 data not found at {root}")
    return root
