"""What a sharded checkpoint holds, and whether its files are intact (`hf-zero inspect`).

Opens the checkpoint once (`reader.CheckpointReader`), reads the manifest and hashes every file
it lists; loads no tensor. The result is a plain dict so the command line (or a script) can
print it as it likes.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError
from .format import ZERO_DIR
from .reader import CheckpointReader

__all__ = ["inspect_checkpoint"]


def inspect_checkpoint(checkpoint_dir: str | os.PathLike, *, verify: bool = True) -> dict:
    """Summarise a checkpoint.

    Args:
        checkpoint_dir: a sharded checkpoint (format v1).
        verify: check every listed file's size and sha256 against the manifest.

    Returns:
        A dict: format_version, stage, world_size, mixed_precision, step, skipped_steps,
        model_class, optimizer ({"class", "param_groups"}), num_parameters (distinct),
        trainable_parameters, flat_units, export_keys (number of tensors an HF export writes),
        files (list of {"name", "size", "ok", "error"}; ok is None when not verified),
        extra_files (files in zero/ the manifest does not list), ok (every verified file is
        intact).

    Raises:
        CheckpointError: no readable manifest.
    """
    ckpt = Path(checkpoint_dir)
    with CheckpointReader(ckpt) as reader:
        m = reader.manifest
        files = []
        for name in sorted(m.files):
            path = ckpt / ZERO_DIR / name
            entry = {"name": name, "size": m.files[name].size, "ok": None, "error": None}
            if verify:
                try:
                    reader.verify(name)
                    entry["ok"] = True
                except CheckpointError as e:
                    entry["ok"], entry["error"] = False, str(e)
            if path.is_file() and not path.is_symlink():
                entry["size"] = path.stat().st_size
            files.append(entry)
    listed = set(m.files) | {"manifest.json"}
    # A name that is not UTF-8 comes back from the OS with surrogates, which cannot be printed.
    extra = sorted(
        os.fsencode(p.name).decode("utf-8", "backslashreplace")
        for p in (ckpt / ZERO_DIR).iterdir()
        if p.name not in listed
    )
    return {
        "path": str(ckpt),
        "format_version": m.format_version,
        "stage": m.stage,
        "world_size": m.world_size,
        "mixed_precision": m.mixed_precision,
        "step": m.step,
        "skipped_steps": m.skipped_steps,
        "model_class": m.model_class,
        "optimizer": {"class": m.optimizer.cls, "param_groups": m.optimizer.param_groups},
        "num_parameters": m.layout.numel,
        "trainable_parameters": m.layout.trainable_numel(),
        "flat_units": len(m.layout.flat_units),
        "export_keys": len(m.hf_export.keys) if m.hf_export is not None else 0,
        "frozen_base": None if m.frozen_base is None else m.frozen_base.to_json(),
        "files": files,
        "extra_files": extra,
        "ok": all(f["ok"] is not False for f in files),
    }
