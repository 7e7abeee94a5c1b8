"""vitamin: an open FPGA accelerator for edge transformers."""

from .api import compile, run
from .config import PRESETS, Config, ConfigError, get_config
from .program import Program

__all__ = ["Config", "ConfigError", "PRESETS", "get_config", "Program", "compile", "run"]
__version__ = "0.1.0"
