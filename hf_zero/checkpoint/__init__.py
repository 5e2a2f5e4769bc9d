"""Sharded safetensors checkpoints (format v1) and their export to a standard HF folder."""

from .format import CheckpointError, read_manifest
from .sharded import latest_checkpoint

__all__ = ["CheckpointError", "read_manifest", "latest_checkpoint"]
