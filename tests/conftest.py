"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ham10000_root() -> Path:
    """The shared HAM10000 folder (override with ``PROTOHEAD_HAM10000``); fails if absent."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
    root = Path(os.environ.get("PROTOHEAD_HAM10000", default))
    if not (root / "HAM10000_metadata.csv").is_file():
        pytest.fail(f"HAM10000 data not found at {root}: the tests need ../shared/data/ham10000")
    return root


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature cache shared by the pipeline tests of a session (never inside the repository)."""
    return tmp_path_factory.mktemp("feature-cache")
