"""Sharded checkpoint format, version 1 (DESIGN.md §5): names, the manifest, verification.

    <dir>/zero/manifest.json                              written last, by rank 0
    <dir>/zero/params-rank00000-of-00004.safetensors      fp32 master slice of every flat unit
    <dir>/zero/optim-rank00000-of-00004.safetensors       optimizer state slices
    <dir>/zero/rng-rank00000-of-00004.safetensors         RNG states as uint8/int64 tensors
    <dir>/config.json, generation_config.json, ...        what the model needs (save_pretrained)

Whatever the stage, rank r of N writes the slice [r*S, (r+1)*S) of every flat unit of the saved
layout, so each rank writes 1/N of the model and files never repeat one another. The manifest
holds the layout, so a loader at another world size or stage maps parameters by name
(`partition.plan_reads`) and reads only its byte ranges.

Nothing here is a pickle: tensors are safetensors, everything else JSON. Every file handed to us
is checked before use: manifest schema and version, file names (no paths), sizes and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..partition import FlatUnit, Layout, ParamSpec

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "shard_file",
    "sha256_file",
    "layout_to_json",
    "layout_from_json",
    "read_manifest",
    "verify_file",
    "ZERO_DIR",
    "MANIFEST",
    "swap_into_place",
]

FORMAT_VERSION = 1
ZERO_DIR = "zero"
MANIFEST = "manifest.json"
KINDS = ("params", "optim", "rng")
_FILE_RE = re.compile(r"^(params|optim|rng)-rank(\d{5})-of-(\d{5})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, foreign or unsupported."""


def shard_file(kind: str, rank: int, world_size: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world_size:05d}.safetensors"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def layout_to_json(layout: Layout, dtypes: dict[str, str]) -> dict:
    return {
        "world_size": layout.world_size,
        "flat_units": [
            {
                "index": f.index,
                "units": list(f.units),
                "group": f.group,
                "numel": f.numel,
                "padded_numel": f.padded_numel,
                "params": [
                    {
                        "name": p.name,
                        "shape": list(p.shape),
                        "dtype": dtypes.get(p.name, "float32"),
                        "offset": p.offset,
                        "aliases": list(p.aliases),
                    }
                    for p in f.params
                ],
            }
            for f in layout.flat_units
        ],
    }


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {what}")


def layout_from_json(data: Any, *, where: str) -> tuple[Layout, dict[str, str]]:
    """Rebuild and check a layout; returns it with the parameters' original dtypes."""
    _expect(isinstance(data, dict), where, "layout must be an object")
    ws = data.get("world_size")
    _expect(
        type(ws) is int and ws >= 1, where, f"layout world_size must be a positive int, got {ws!r}"
    )
    units = data.get("flat_units")
    _expect(isinstance(units, list), where, "layout flat_units must be a list")
    flats, dtypes = [], {}
    for i, u in enumerate(units):
        _expect(isinstance(u, dict) and u.get("index") == i, where, f"flat unit {i} is malformed")
        params, offset = [], 0
        for p in u.get("params", []):
            _expect(
                isinstance(p, dict) and isinstance(p.get("name"), str),
                where,
                f"flat unit {i}: bad param entry",
            )
            shape = p.get("shape")
            _expect(
                isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape),
                where,
                f"parameter {p['name']!r}: bad shape {shape!r}",
            )
            _expect(
                p.get("offset") == offset,
                where,
                f"parameter {p['name']!r}: offset {p.get('offset')!r}, expected {offset}",
            )
            spec = ParamSpec(p["name"], tuple(shape), offset, tuple(p.get("aliases", [])))
            params.append(spec)
            dtypes[spec.name] = str(p.get("dtype", "float32"))
            offset += spec.numel
        group = u.get("group")
        _expect(type(group) is int and group >= -1, where, f"flat unit {i}: bad group {group!r}")
        fu = FlatUnit(i, tuple(u.get("units", [])), group, tuple(params), ws)
        _expect(
            u.get("numel") == fu.numel and u.get("padded_numel") == fu.padded_numel,
            where,
            f"flat unit {i}: numel {u.get('numel')!r}/{u.get('padded_numel')!r} "
            "does not match its parameters",
        )
        flats.append(fu)
    return Layout(ws, tuple(flats)), dtypes


REQUIRED = (
    "format_version",
    "stage",
    "world_size",
    "mixed_precision",
    "step",
    "layout",
    "optimizer",
    "files",
)


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """Read and check `<dir>/zero/manifest.json`; the layout comes back as `manifest["_layout"]`.

    Raises:
        CheckpointError: missing, not JSON, unsupported format_version, missing fields, or file
            entries that are not plain shard names (no paths: nothing outside the directory).
    """
    path = Path(ckpt_dir) / ZERO_DIR / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest; this is not a complete hf_zero checkpoint")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    _expect(isinstance(m, dict), str(path), "manifest must be a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    _expect(not missing, str(path), f"missing fields {missing}")
    version = m["format_version"]
    _expect(
        version == FORMAT_VERSION,
        str(path),
        f"format_version {version!r} is not supported "
        f"(this hf_zero reads version {FORMAT_VERSION})",
    )
    ws = m["world_size"]
    _expect(type(ws) is int and 1 <= ws <= 99999, str(path), f"bad world_size {ws!r}")
    files = m["files"]
    _expect(isinstance(files, dict), str(path), "files must be an object")
    for name, entry in files.items():
        match = _FILE_RE.match(name) if isinstance(name, str) else None
        _expect(match is not None, str(path), f"file entry {name!r} is not a shard file name")
        _expect(
            int(match.group(3)) == ws and int(match.group(2)) < ws,
            str(path),
            f"file entry {name!r} does not belong to a {ws}-rank checkpoint",
        )
        _expect(
            isinstance(entry, dict)
            and type(entry.get("size")) is int
            and isinstance(entry.get("sha256"), str),
            str(path),
            f"file entry {name!r} needs size and sha256",
        )
    for kind in ("params", "optim"):
        for r in range(ws):
            _expect(
                shard_file(kind, r, ws) in files,
                str(path),
                f"no entry for {shard_file(kind, r, ws)}",
            )
    m["_layout"], m["_dtypes"] = layout_from_json(m["layout"], where=str(path))
    _expect(m["_layout"].world_size == ws, str(path), "layout world_size differs from world_size")
    return m


def verify_file(ckpt_dir: str | os.PathLike, manifest: dict, name: str) -> Path:
    """Check one shard file's size and sha256 against the manifest; return its path."""
    path = Path(ckpt_dir) / ZERO_DIR / name
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{path}: not listed in the manifest")
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(
            f"checkpoint was saved by {manifest['world_size']} ranks but file {name} is missing "
            f"(expected at {path})"
        )
    size = path.stat().st_size
    if size != entry["size"]:
        raise CheckpointError(
            f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{path}: sha256 {digest[:12]}... does not match the manifest's "
            f"{entry['sha256'][:12]}... (corrupted)"
        )
    return path


def swap_into_place(tmp: Path, dest: Path, token: str) -> None:
    """Move the finished directory `tmp` to `dest`, replacing what was there: the old one is
    renamed aside first and deleted only once the new one is in place."""
    old = None
    if dest.exists():
        old = dest.parent / f"{dest.name}.old-{token}"
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
