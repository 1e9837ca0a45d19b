"""protohead: multi-prototype classification heads for long-tailed, safety-critical image classification."""

from protohead.config import PRESET_DESCRIPTIONS, PRESETS, HeadConfig, preset_config
from protohead.head import Head, HeadOptimal

__all__ = ["PRESETS", "PRESET_DESCRIPTIONS", "Head", "HeadConfig", "HeadOptimal", "preset_config"]
__version__ = "0.1.0"
