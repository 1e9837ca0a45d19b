"""protohead: multi-prototype classification heads for long-tailed, safety-critical image classification."""

from typing import Any

from protohead.config import PRESET_DESCRIPTIONS, PRESETS, HeadConfig, preset_config
from protohead.head import Head, HeadOptimal

__all__ = ["PRESETS", "PRESET_DESCRIPTIONS", "Head", "HeadConfig", "HeadOptimal", "load_run", "preset_config"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``protohead.load_run``: imported on first use (it needs the pipeline extras; the core does not)."""
    if name == "load_run":
        from protohead.predict import load_run

        return load_run
    raise AttributeError(f"module 'protohead' has no attribute {name!r}")
