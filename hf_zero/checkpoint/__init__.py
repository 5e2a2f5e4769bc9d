"""Sharded safetensors checkpoints (format v1) and their export to a standard HF folder."""

from .format import CheckpointError, read_manifest

__all__ = ["CheckpointError", "read_manifest"]
