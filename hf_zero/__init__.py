"""hf_zero: ZeRO (stages 0-3) for Hugging Face models on torch.distributed."""

from .checkpoint.consolidate import consolidate
from .config import ZeroConfig
from .engine import ZeroEngine, initialize

__all__ = ["ZeroConfig", "ZeroEngine", "consolidate", "initialize"]

__version__ = "0.1.0"
