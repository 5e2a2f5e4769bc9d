"""Sharded safetensors checkpoints (format v1) and their export to a standard HF folder."""

from .errors import CheckpointError
from .format import Manifest
from .sharded import latest_checkpoint

__all__ = ["CheckpointError", "Manifest", "latest_checkpoint"]
