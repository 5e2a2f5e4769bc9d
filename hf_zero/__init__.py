"""hf_zero: ZeRO (stages 0-3) for Hugging Face models on torch.distributed.

`import hf_zero` loads the engine and its config only: no transformers, accelerate, datasets or
peft. The integrations and the Hub push load on first use (module `__getattr__`), so a script
that never touches them never imports what they need.
"""

from .checkpoint.consolidate import consolidate
from .config import ZeroConfig
from .engine import ZeroEngine, initialize

__all__ = [
    "CardInfo",
    "ZeroAccelerator",
    "ZeroConfig",
    "ZeroEngine",
    "ZeroTrainer",
    "ZeroTrainingArguments",
    "consolidate",
    "initialize",
    "push_to_hub",
]

__version__ = "0.1.0"

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "ZeroAccelerator": "hf_zero.integrations.accelerate",  # imports accelerate
    "ZeroTrainer": "hf_zero.integrations.trainer",  # imports transformers
    "ZeroTrainingArguments": "hf_zero.integrations.trainer",
    "CardInfo": "hf_zero.card",
    "push_to_hub": "hf_zero.hub",  # imports huggingface_hub when called
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_zero' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
