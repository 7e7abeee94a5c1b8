"""vitamin: an open FPGA accelerator for edge transformers."""

from .config import PRESETS, Config, ConfigError, get_config

__all__ = ["Config", "ConfigError", "PRESETS", "get_config"]
__version__ = "0.1.0"
