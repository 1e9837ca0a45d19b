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


def assert_resume_is_exact(start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_epoch: int) -> None:
    """``start(run_dir, resume)`` trains a run; one run goes straight through, another is stopped at the start of
    epoch ``stop_epoch`` (0-based) and resumed. Their last checkpoints must be bit-identical (NaN marks
    never-pushed slots)."""
    import torch

    from protohead.training import loop
    from protohead.training.checkpoint import read_checkpoint

    start(tmp_path / "straight", False)
    original = loop.Trainer.train_epoch

    def stop(self, epoch, *args, **kwargs):
        if epoch == stop_epoch:
            raise KeyboardInterrupt("simulated stop")
        return original(self, epoch, *args, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        start(tmp_path / "stopped", False)
    monkeypatch.setattr(loop.Trainer, "train_epoch", original)
    start(tmp_path / "stopped", True)
    straight, _ = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    resumed, _ = read_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0, equal_nan=True, msg=key)
