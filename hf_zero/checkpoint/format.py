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
is checked before use, and whatever is wrong with it is a CheckpointError naming the file:
- the manifest: size (at most MAX_JSON_BYTES), JSON, the type and range of every field the
  loaders use, file names (plain shard names: nothing outside the directory), no symlinks;
- each shard file: size and sha256 against the manifest, then its safetensors header (parsed by
  safetensors itself, which refuses a header longer than the file or its own limit without
  reading it), then its own metadata: the rank, world size and slice of the layout it was
  written with must be the manifest's. The manifest carries no checksum, so this is what
  catches a manifest whose layout was edited to stay self-consistent (two parameters' names
  swapped, say) but no longer describes the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import reprlib
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..config import MIXED_PRECISION_CHOICES, STAGES
from ..partition import FlatUnit, Layout, ParamSpec

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "shard_file",
    "sha256_file",
    "layout_to_json",
    "layout_from_json",
    "layout_slice",
    "read_json_file",
    "read_manifest",
    "verify_file",
    "open_shard",
    "check_shard_metadata",
    "ZERO_DIR",
    "MANIFEST",
    "MAX_JSON_BYTES",
    "swap_into_place",
]

FORMAT_VERSION = 1
ZERO_DIR = "zero"
MANIFEST = "manifest.json"
KINDS = ("params", "optim", "rng")
_FILE_RE = re.compile(r"(params|optim|rng)-rank([0-9]{5})-of-([0-9]{5})\.safetensors")
# The manifest of a model with 100k parameters is a few tens of MB; a larger JSON file is not one
# hf_zero wrote, and parsing it could take many times its size in memory.
MAX_JSON_BYTES = 64 << 20
# Bounds on a parameter's shape: no real tensor comes close, and they keep every size computed
# from a manifest a small integer.
MAX_NDIM = 64
MAX_NUMEL = 1 << 48
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_repr = reprlib.Repr()  # bad values in messages: short, and safe on any nesting
_repr.maxstring = _repr.maxother = 80
_repr.maxlist = _repr.maxdict = 8
_repr.maxlevel = 3
_show = _repr.repr


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


def layout_slice(layout: Layout, rank: int) -> list[dict]:
    """What rank `rank`'s files hold of each flat unit: its flat range and the parameter pieces
    in it, as [name, start in the parameter, start in the slice, length]. Every shard file
    carries this in its metadata (key "hf_zero")."""
    return [
        {
            "flat": fu.index,
            "range": list(fu.shard_range(rank)),
            "pieces": [
                [p.param.name, p.param_start, p.shard_start, p.length]
                for p in fu.shard_pieces(rank)
            ],
        }
        for fu in layout.flat_units
    ]


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {what}")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def layout_from_json(data: Any, *, where: str) -> tuple[Layout, dict[str, str]]:
    """Rebuild and check a layout; returns it with the parameters' original dtypes.

    Raises:
        CheckpointError: a field of the wrong type or out of range, a name used twice, offsets
            or sizes that do not follow from the shapes.
    """
    _expect(isinstance(data, dict), where, "layout must be an object")
    ws = data.get("world_size")
    _expect(
        _is_int(ws) and ws >= 1, where, f"layout world_size must be a positive int, got {_show(ws)}"
    )
    units = data.get("flat_units")
    _expect(isinstance(units, list), where, "layout flat_units must be a list")
    flats, dtypes, names = [], {}, set()
    for i, u in enumerate(units):
        _expect(isinstance(u, dict) and u.get("index") == i, where, f"flat unit {i} is malformed")
        entries = u.get("params", [])
        unit_names = u.get("units", [])
        _expect(
            isinstance(entries, list) and _is_str_list(unit_names),
            where,
            f"flat unit {i}: params must be a list and units a list of names",
        )
        params, offset = [], 0
        for p in entries:  # messages are built only on failure: layouts can be long
            if not (isinstance(p, dict) and isinstance(p.get("name"), str)):
                raise CheckpointError(f"{where}: flat unit {i}: bad param entry {_show(p)}")
            name, shape, aliases = p["name"], p.get("shape"), p.get("aliases", [])
            if not (
                isinstance(shape, list)
                and len(shape) <= MAX_NDIM
                and all(_is_int(d) and 0 <= d < 2**40 for d in shape)
                and math.prod(shape) <= MAX_NUMEL
            ):
                raise CheckpointError(f"{where}: parameter {name!r}: bad shape {_show(shape)}")
            if p.get("offset") != offset:
                raise CheckpointError(
                    f"{where}: parameter {name!r}: offset {_show(p.get('offset'))}, "
                    f"expected {offset}"
                )
            if not _is_str_list(aliases):
                raise CheckpointError(f"{where}: parameter {name!r}: bad aliases {_show(aliases)}")
            dtype = p.get("dtype", "float32")
            if not isinstance(dtype, str):
                raise CheckpointError(f"{where}: parameter {name!r}: bad dtype {_show(dtype)}")
            for n in (name, *aliases):
                if n in names:
                    raise CheckpointError(f"{where}: parameter name {n!r} appears twice")
                names.add(n)
            spec = ParamSpec(name, tuple(shape), offset, tuple(aliases))
            params.append(spec)
            dtypes[name] = dtype
            offset += spec.numel
        group = u.get("group")
        _expect(_is_int(group) and group >= -1, where, f"flat unit {i}: bad group {_show(group)}")
        fu = FlatUnit(i, tuple(unit_names), group, tuple(params), ws)
        _expect(
            _is_int(u.get("numel"))
            and u.get("numel") == fu.numel
            and _is_int(u.get("padded_numel"))
            and u.get("padded_numel") == fu.padded_numel,
            where,
            f"flat unit {i}: numel {_show(u.get('numel'))}/{_show(u.get('padded_numel'))} "
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


def _check_strings(data: Any, where: str) -> None:
    """Every string in parsed JSON must be valid Unicode: JSON's \\ud800 escapes decode to lone
    surrogates, which no name hf_zero writes contains and which fail later when printed or
    written out as UTF-8."""
    stack = [data]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError(f"{where}: string {_show(v)} is not valid Unicode") from None


def read_json_file(path: str | os.PathLike, *, what: str = "file") -> Any:
    """Parse a JSON file handed to us: at most MAX_JSON_BYTES, valid UTF-8 and valid Unicode,
    nested no deeper than the parser allows.

    Raises:
        CheckpointError: too large, unreadable, or not such JSON (naming the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e})") from None
    _expect(
        len(raw) <= MAX_JSON_BYTES,
        str(path),
        f"more than {MAX_JSON_BYTES} bytes; not a {what} hf_zero wrote",
    )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    _check_strings(data, str(path))
    return data


def _shallow(v: Any, depth: int = 4) -> bool:
    """JSON nested at most `depth` deep (a hyperparameter: a number, a list of them, ...)."""
    if isinstance(v, list | dict):
        items = v.values() if isinstance(v, dict) else v
        return depth > 0 and all(_shallow(x, depth - 1) for x in items)
    return True


def _check_fields(m: dict, where: str) -> None:
    """The type and range of every manifest field a loader, the export or inspect reads."""
    stage, mp, step = m["stage"], m["mixed_precision"], m["step"]
    _expect(_is_int(stage) and stage in STAGES, where, f"bad stage {_show(stage)}")
    _expect(
        isinstance(mp, str) and mp in MIXED_PRECISION_CHOICES,
        where,
        f"bad mixed_precision {_show(mp)}",
    )
    _expect(_is_int(step) and step >= 0, where, f"bad step {_show(step)}")
    skipped = m.get("skipped_steps", 0)
    _expect(_is_int(skipped) and skipped >= 0, where, f"bad skipped_steps {_show(skipped)}")
    model_class = m.get("model_class", "")
    _expect(
        isinstance(model_class, str),
        where,
        f"model_class must be a string, got {_show(model_class)}",
    )
    for key in ("config", "loss_scaler"):
        value = m.get(key)
        _expect(
            value is None or isinstance(value, dict),
            where,
            f"{key} must be an object, got {_show(value)}",
        )
    opt = m["optimizer"]
    _expect(isinstance(opt, dict), where, f"optimizer must be an object, got {_show(opt)}")
    _expect(
        isinstance(opt.get("class"), str),
        where,
        f"optimizer class must be a string, got {_show(opt.get('class'))}",
    )
    groups = opt.get("param_groups", [])
    _expect(
        isinstance(groups, list)
        and all(isinstance(g, dict) and all(_shallow(v) for v in g.values()) for g in groups),
        where,
        f"optimizer param_groups must be a list of objects of hyperparameters nested at most "
        f"4 deep, got {_show(groups)}",
    )
    state_keys = opt.get("state_keys", {})
    _expect(
        isinstance(state_keys, dict) and all(_is_str_list(v) for v in state_keys.values()),
        where,
        f"optimizer state_keys must map flat units to lists of names, got {_show(state_keys)}",
    )
    export = m.get("hf_export")
    if export is None:
        return
    _expect(isinstance(export, dict), where, f"hf_export must be an object, got {_show(export)}")
    keys, dtypes = export.get("keys", []), export.get("dtypes", {})
    _expect(_is_str_list(keys), where, f"hf_export keys must be a list of names, got {_show(keys)}")
    seen = set()
    for k in keys:
        # "__metadata__" is the safetensors header's own entry, not a tensor name.
        _expect(k and k != "__metadata__", where, f"hf_export key {k!r} is not a tensor name")
        _expect(k not in seen, where, f"hf_export key {k!r} appears twice")
        seen.add(k)
    _expect(
        isinstance(dtypes, dict) and all(isinstance(v, str) for v in dtypes.values()),
        where,
        f"hf_export dtypes must map names to dtype names, got {_show(dtypes)}",
    )
    conversion = export.get("weight_conversion", False)
    _expect(
        isinstance(conversion, bool),
        where,
        f"hf_export weight_conversion must be true or false, got {_show(conversion)}",
    )


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """Read and check `<dir>/zero/manifest.json`; the layout comes back as `manifest["_layout"]`.

    Raises:
        CheckpointError: missing, a symlink (as is its zero/ folder), too large, not JSON,
            unsupported format_version, missing fields or fields of the wrong type or range, or
            file entries that are not plain shard names (no paths: nothing outside the
            directory).
    """
    path = Path(ckpt_dir) / ZERO_DIR / MANIFEST
    if path.is_symlink() or path.parent.is_symlink():
        link = path if path.is_symlink() else path.parent
        raise CheckpointError(
            f"{link} is a symlink; a checkpoint's zero/ folder and manifest must be its own"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest; this is not a complete hf_zero checkpoint")
    m = read_json_file(path, what="manifest")
    _expect(isinstance(m, dict), str(path), "manifest must be a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    _expect(not missing, str(path), f"missing fields {missing}")
    version = m["format_version"]
    _expect(
        _is_int(version) and version == FORMAT_VERSION,
        str(path),
        f"format_version {_show(version)} is not supported "
        f"(this hf_zero reads version {FORMAT_VERSION})",
    )
    ws = m["world_size"]
    _expect(_is_int(ws) and 1 <= ws <= 99999, str(path), f"bad world_size {_show(ws)}")
    files = m["files"]
    _expect(isinstance(files, dict), str(path), "files must be an object")
    for name, entry in files.items():  # messages are built only on failure
        match = _FILE_RE.fullmatch(name)
        if match is None:
            raise CheckpointError(f"{path}: file entry {name!r} is not a shard file name")
        if int(match.group(3)) != ws or int(match.group(2)) >= ws:
            raise CheckpointError(
                f"{path}: file entry {name!r} does not belong to a {ws}-rank checkpoint"
            )
        if not (
            isinstance(entry, dict)
            and _is_int(entry.get("size"))
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256_RE.fullmatch(entry["sha256"]) is not None
        ):
            raise CheckpointError(
                f"{path}: file entry {name!r} needs size (bytes) and sha256 (64 hex digits), "
                f"got {_show(entry)}"
            )
    for kind in ("params", "optim"):
        for r in range(ws):
            if shard_file(kind, r, ws) not in files:
                raise CheckpointError(f"{path}: no entry for {shard_file(kind, r, ws)}")
    _check_fields(m, str(path))
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


def open_shard(path: Path):
    """`safe_open(path, "pt")`; a file safetensors refuses is a CheckpointError naming it."""
    try:
        return safe_open(str(path), "pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


def check_shard_metadata(path: Path, metadata: dict | None, layout: Layout, rank: int) -> None:
    """A shard file's own metadata must be what the saving rank wrote for the manifest's layout:
    format "pt" and, under "hf_zero", this format version, rank `rank` of the layout's world size
    and that rank's `layout_slice`.

    Raises:
        CheckpointError: the metadata is missing, malformed, or describes another rank, world
            size or layout (the manifest was edited, or the file belongs to another save).
    """
    meta = metadata or {}
    _expect(
        meta.get("format") == "pt",
        str(path),
        f'metadata format is {_show(meta.get("format"))}, expected "pt"',
    )
    try:
        info = json.loads(meta.get("hf_zero", ""))
    except (ValueError, RecursionError):
        info = None
    _expect(isinstance(info, dict), str(path), "no hf_zero metadata; not a file hf_zero wrote")
    ws = layout.world_size
    got = (info.get("format_version"), info.get("rank"), info.get("world_size"))
    _expect(
        all(_is_int(v) for v in got) and got == (FORMAT_VERSION, rank, ws),
        str(path),
        f"written as format_version/rank/world_size {_show(got)}, the manifest says "
        f"{(FORMAT_VERSION, rank, ws)}",
    )
    _expect(
        info.get("layout_slice") == layout_slice(layout, rank),
        str(path),
        "the slice of the layout it holds differs from the manifest's layout (the manifest was "
        "edited, or the file belongs to another save)",
    )


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
