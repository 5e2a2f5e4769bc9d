"""Sharded checkpoint format, version 1: file names, the manifest, and the checks on both.

    <dir>/zero/manifest.json                              written last, by rank 0
    <dir>/zero/params-rank00000-of-00004.safetensors      fp32 master slice of every flat unit
    <dir>/zero/optim-rank00000-of-00004.safetensors       optimizer state slices
    <dir>/zero/rng-rank00000-of-00004.safetensors         RNG states as uint8/int64 tensors
    <dir>/config.json, generation_config.json, ...        what the model needs (save_pretrained)

Whatever the stage, rank r of N writes the slice [r*S, (r+1)*S) of every flat unit of the saved
layout, so each rank writes 1/N of the model and files never repeat one another. The manifest
holds the layout, so a loader at another world size or stage maps parameters by name
(`partition.plan_reads`) and reads only its byte ranges.

`Manifest` is the manifest as a typed value, with its writer (`Manifest.from_state`,
`Manifest.to_json`) and its reader (`Manifest.parse`, `Manifest.read`) side by side. The reader
checks everything a loader, the export or inspect uses before it builds the value: the size
(at most MAX_JSON_BYTES), the JSON and its strings, the type and range of every field, file
names (plain shard names: nothing outside the directory), and the layout's own consistency
(offsets and sizes follow from the shapes). Whatever is wrong is a CheckpointError naming the
file. Nothing here is a pickle: tensors are safetensors, everything else JSON.

The zero/ folder and the manifest are opened without following symlinks: a checkpoint's files
must be its own (`open_zero_dir`, `read_manifest_at`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import MIXED_PRECISION_CHOICES, STAGES
from ..partition import Layout
from .errors import CheckpointError
from .errors import expect as _expect
from .errors import is_int as _is_int
from .errors import is_str_list as _is_str_list
from .errors import show as _show
from .frozen import FrozenBase
from .layout_json import layout_from_json, layout_slice, layout_to_json
from .naming import export_keys

if TYPE_CHECKING:
    from .state import RankState

__all__ = [
    "FORMAT_VERSION",
    "ZERO_DIR",
    "MANIFEST",
    "MAX_JSON_BYTES",
    "CheckpointError",
    "FileEntry",
    "OptimizerInfo",
    "HFExport",
    "Manifest",
    "shard_file",
    "flat_key",
    "layout_to_json",
    "layout_from_json",
    "layout_slice",
    "parse_json",
    "open_at",
    "stat_at",
    "open_zero_dir",
    "read_manifest_at",
    "read_zero_manifest",
    "dir_replaced",
]

FORMAT_VERSION = 1
ZERO_DIR = "zero"
MANIFEST = "manifest.json"
KINDS = ("params", "optim", "rng")
_FILE_RE = re.compile(r"(params|optim|rng)-rank([0-9]{5})-of-([0-9]{5})\.safetensors")
# The manifest of a model with 100k parameters is a few tens of MB; a larger JSON file is not one
# hf_zero wrote, and parsing it could take many times its size in memory.
MAX_JSON_BYTES = 64 << 20
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Opening a file of the checkpoint by "/proc/self/fd/<dir fd>/<name>" resolves the name in the
# very folder the dir fd holds, as openat does, while still naming a path (audit hooks and
# libraries that take paths see where it is).
_PROC_FD = os.path.isdir("/proc/self/fd")


def shard_file(kind: str, rank: int, world_size: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world_size:05d}.safetensors"


def flat_key(index: int) -> str:
    """The tensor name of flat unit `index` in the params and optim files."""
    return f"flat{index:05d}"


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


def parse_json(raw: bytes, *, where: str, what: str = "file") -> Any:
    """Parse JSON handed to us: at most MAX_JSON_BYTES, valid UTF-8 and valid Unicode, nested no
    deeper than the parser allows.

    Raises:
        CheckpointError: too large, or not such JSON (naming `where`).
    """
    _expect(
        len(raw) <= MAX_JSON_BYTES,
        where,
        f"more than {MAX_JSON_BYTES} bytes; not a {what} hf_zero wrote",
    )
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise CheckpointError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from None
    _check_strings(data, where)
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
    renames = export.get("renames", {})
    _expect(
        isinstance(renames, dict)
        and all(k in seen and isinstance(v, str) and v for k, v in renames.items()),
        where,
        f"hf_export renames must map export keys to state-dict names, got {_show(renames)}",
    )
    description = export.get("conversion")
    _expect(
        description is None or (isinstance(description, str) and conversion),
        where,
        f"hf_export conversion must be a description, with weight_conversion true, got "
        f"{_show(description)}",
    )


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


@dataclass(frozen=True)
class FileEntry:
    """One shard file as the manifest records it."""

    size: int
    sha256: str


@dataclass(frozen=True)
class OptimizerInfo:
    """The optimizer that stepped the checkpoint."""

    cls: str
    """"module.QualName" of its class."""

    param_groups: list[dict]
    """Each group's hyperparameters (JSON values; no "params")."""

    state_keys: dict[str, list[str]]
    """Flat unit tensor name ("flat00000") -> the names of its optimizer state."""


@dataclass(frozen=True)
class HFExport:
    """What an HF export of the checkpoint writes: the tensor names `save_pretrained` writes, in
    its order, and where each comes from."""

    keys: list[str]
    dtypes: dict[str, str]
    """Export key -> the dtype the model holds it in ("float32", ...)."""

    renames: dict[str, str] = field(default_factory=dict)
    """Export key -> the model's state-dict name, where save_pretrained renames (GPT-NeoX
    writes `embed_out.weight` for `lm_head.weight`)."""

    conversion: str | None = None
    """What save_pretrained does to the values beyond renaming (splitting fused experts, ...),
    which an export cannot reproduce; None when it only renames."""

    weight_conversion: bool = False
    """Whether save_pretrained converts values (then `keys` are the model's own names)."""

    def source(self, key: str) -> str:
        """The model's state-dict name of export key `key`."""
        return self.renames.get(key, key)


@dataclass(frozen=True)
class Manifest:
    """`zero/manifest.json` (format version 1) as a checked, typed value."""

    format_version: int
    stage: int
    world_size: int
    mixed_precision: str
    step: int
    skipped_steps: int
    config: dict
    """`ZeroConfig.to_dict()` of the saving engine."""
    model_class: str
    layout: Layout
    dtypes: dict[str, str]
    """Parameter name -> the dtype the model held it in."""
    optimizer: OptimizerInfo
    loss_scaler: dict
    """The dynamic loss scaler's state ({} without one)."""
    hf_export: HFExport | None
    files: dict[str, FileEntry]
    frozen_base: FrozenBase | None = None
    """Set when the params files leave the frozen flat units out (a PEFT model's base)."""

    # ---- writer ------------------------------------------------------------------------------

    @classmethod
    def from_state(
        cls,
        state: RankState,
        files: dict[str, FileEntry],
        frozen_base: FrozenBase | None = None,
    ) -> Manifest:
        """The manifest of a save of `state` whose ranks wrote `files` (and referenced the
        frozen base `frozen_base` instead of writing it)."""
        opt = state.optimizer
        groups = [
            {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in g.items()
                if k != "params" and _jsonable(v)
            }
            for g in opt.param_groups
        ]
        state_keys = {}
        for fu in state.layout.flat_units:
            st = opt.state.get(state.masters[fu.index], {})
            if st:
                state_keys[flat_key(fu.index)] = sorted(st)
        names = export_keys(state.module)
        return cls(
            format_version=FORMAT_VERSION,
            stage=state.stage,
            world_size=state.world_size,
            mixed_precision=state.mixed_precision,
            step=state.counters.step,
            skipped_steps=state.counters.skipped_steps,
            config=dict(state.config),
            model_class=type(state.module).__name__,
            layout=state.layout,
            dtypes=dict(state.param_dtypes),
            optimizer=OptimizerInfo(
                f"{type(opt).__module__}.{type(opt).__qualname__}", groups, state_keys
            ),
            loss_scaler=dict(state.counters.loss_scaler),
            hf_export=HFExport(
                keys=list(names.keys),
                dtypes={k: _export_dtype(state, names.source(k)) for k in names.keys},
                renames=dict(names.renames),
                conversion=names.conversion,
                weight_conversion=names.conversion is not None,
            ),
            files=dict(files),
            frozen_base=frozen_base,
        )

    def to_json(self) -> dict:
        """The JSON document (format version 1) `parse` reads back into an equal Manifest."""
        out = {
            "format_version": self.format_version,
            "stage": self.stage,
            "world_size": self.world_size,
            "mixed_precision": self.mixed_precision,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "config": self.config,
            "model_class": self.model_class,
            "layout": layout_to_json(self.layout, self.dtypes),
            "optimizer": {
                "class": self.optimizer.cls,
                "param_groups": self.optimizer.param_groups,
                "state_keys": self.optimizer.state_keys,
            },
            "loss_scaler": self.loss_scaler,
            "files": {n: {"size": e.size, "sha256": e.sha256} for n, e in self.files.items()},
        }
        if self.hf_export is not None:
            e = self.hf_export
            export: dict[str, Any] = {
                "keys": e.keys,
                "dtypes": e.dtypes,
                "weight_conversion": e.weight_conversion,
            }
            if e.renames:
                export["renames"] = e.renames
            if e.conversion is not None:
                export["conversion"] = e.conversion
            out["hf_export"] = export
        if self.frozen_base is not None:
            out["frozen_base"] = self.frozen_base.to_json()
        return out

    # ---- reader ------------------------------------------------------------------------------

    @classmethod
    def read(cls, ckpt_dir: str | os.PathLike) -> Manifest:
        """Read and check `<ckpt_dir>/zero/manifest.json`.

        Raises:
            CheckpointError: missing, a symlink (as is its zero/ folder), or failing `parse`.
        """
        path = Path(ckpt_dir) / ZERO_DIR / MANIFEST
        raw, _ = read_zero_manifest(ckpt_dir)[1:]
        return cls.parse(raw, where=str(path))

    @classmethod
    def parse(cls, raw: bytes, *, where: str) -> Manifest:
        """Check a manifest's bytes and build the value.

        Raises:
            CheckpointError (naming `where`): too large, not JSON, unsupported format_version,
                missing fields or fields of the wrong type or range, file entries that are not
                plain shard names (no paths: nothing outside the directory), an inconsistent
                layout.
        """
        m = parse_json(raw, where=where, what="manifest")
        _expect(isinstance(m, dict), where, "manifest must be a JSON object")
        missing = [k for k in REQUIRED if k not in m]
        _expect(not missing, where, f"missing fields {missing}")
        version = m["format_version"]
        _expect(
            _is_int(version) and version == FORMAT_VERSION,
            where,
            f"format_version {_show(version)} is not supported "
            f"(this hf_zero reads version {FORMAT_VERSION})",
        )
        ws = m["world_size"]
        _expect(_is_int(ws) and 1 <= ws <= 99999, where, f"bad world_size {_show(ws)}")
        files = m["files"]
        _expect(isinstance(files, dict), where, "files must be an object")
        for name, entry in files.items():  # messages are built only on failure
            match = _FILE_RE.fullmatch(name)
            if match is None:
                raise CheckpointError(f"{where}: file entry {name!r} is not a shard file name")
            if int(match.group(3)) != ws or int(match.group(2)) >= ws:
                raise CheckpointError(
                    f"{where}: file entry {name!r} does not belong to a {ws}-rank checkpoint"
                )
            if not (
                isinstance(entry, dict)
                and _is_int(entry.get("size"))
                and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str)
                and _SHA256_RE.fullmatch(entry["sha256"]) is not None
            ):
                raise CheckpointError(
                    f"{where}: file entry {name!r} needs size (bytes) and sha256 (64 hex "
                    f"digits), got {_show(entry)}"
                )
        for kind in ("params", "optim"):
            for r in range(ws):
                if shard_file(kind, r, ws) not in files:
                    raise CheckpointError(f"{where}: no entry for {shard_file(kind, r, ws)}")
        _check_fields(m, where)
        layout, dtypes = layout_from_json(m["layout"], where=where)
        _expect(layout.world_size == ws, where, "layout world_size differs from world_size")
        opt = m["optimizer"]
        export = m.get("hf_export")
        return cls(
            format_version=version,
            stage=m["stage"],
            world_size=ws,
            mixed_precision=m["mixed_precision"],
            step=m["step"],
            skipped_steps=m.get("skipped_steps", 0),
            config=m.get("config") or {},
            model_class=m.get("model_class", ""),
            layout=layout,
            dtypes=dtypes,
            optimizer=OptimizerInfo(
                opt["class"], opt.get("param_groups", []), opt.get("state_keys", {})
            ),
            loss_scaler=m.get("loss_scaler") or {},
            hf_export=None
            if export is None
            else HFExport(
                keys=export.get("keys", []),
                dtypes=export.get("dtypes", {}),
                renames=export.get("renames", {}),
                conversion=export.get("conversion"),
                weight_conversion=export.get("weight_conversion", False),
            ),
            files={n: FileEntry(e["size"], e["sha256"]) for n, e in files.items()},
            frozen_base=None
            if m.get("frozen_base") is None
            else FrozenBase.parse(m["frozen_base"], where=where),
        )


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _export_dtype(state: RankState, key: str) -> str:
    """The dtype an HF export writes for state-dict key `key`: the model's own."""
    if key in state.param_dtypes:
        return state.param_dtypes[key]
    for fu in state.layout.flat_units:
        for p in fu.params:
            if key in p.aliases:
                return state.param_dtypes[p.name]
    return str(state.module.state_dict()[key].dtype).removeprefix("torch.")


def open_at(dir_fd: int, name: str, flags: int) -> int:
    """`openat(dir_fd, name, flags)`: `name` resolved in the folder `dir_fd` holds, whatever
    has been renamed since it was opened."""
    if _PROC_FD:
        return os.open(f"/proc/self/fd/{dir_fd}/{name}", flags)
    return os.open(name, flags, dir_fd=dir_fd)


def stat_at(dir_fd: int, name: str) -> os.stat_result:
    """lstat of `name` in the folder `dir_fd` holds (a symlink is not followed)."""
    if _PROC_FD:
        return os.stat(f"/proc/self/fd/{dir_fd}/{name}", follow_symlinks=False)
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def _no_manifest(path: Path) -> CheckpointError:
    return CheckpointError(f"{path}: no manifest; this is not a complete hf_zero checkpoint")


def _symlink(link: Path) -> CheckpointError:
    return CheckpointError(
        f"{link} is a symlink; a checkpoint's zero/ folder and manifest must be its own"
    )


def open_zero_dir(ckpt_dir: str | os.PathLike) -> int:
    """Open `<ckpt_dir>/zero` (not through a symlink); returns its fd, to be closed by the caller.

    Raises:
        CheckpointError: zero/ is a symlink, or there is no such folder (no manifest).
    """
    zero = Path(ckpt_dir) / ZERO_DIR
    if zero.is_symlink():  # checked first: opening would touch what it points to
        raise _symlink(zero)
    if not zero.is_dir():  # nor is anything opened in a folder that is no checkpoint
        raise _no_manifest(zero / MANIFEST)
    try:
        return os.open(zero, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _symlink(zero) from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise _no_manifest(zero / MANIFEST) from None
        raise CheckpointError(f"{zero}: cannot open the checkpoint's folder ({e})") from None


def read_manifest_at(dir_fd: int, path: Path) -> tuple[bytes, os.stat_result]:
    """The manifest's bytes (at most MAX_JSON_BYTES + 1) and fstat, read from the zero/ folder
    `dir_fd` holds, without following a symlink.

    Raises:
        CheckpointError: no manifest, a symlink, not a regular file, unreadable.
    """
    try:
        st = stat_at(dir_fd, MANIFEST)
    except FileNotFoundError:
        raise _no_manifest(path) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the manifest ({e})") from None
    if stat.S_ISLNK(st.st_mode):  # checked first: opening would touch what it points to
        raise _symlink(path)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file; no manifest hf_zero wrote")
    try:
        fd = open_at(dir_fd, MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _symlink(path) from None
        if e.errno == errno.ENOENT:
            raise _no_manifest(path) from None
        raise CheckpointError(f"{path}: cannot read the manifest ({e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file; no manifest hf_zero wrote")
        chunks, left = [], MAX_JSON_BYTES + 1
        while left > 0 and (block := os.read(fd, min(left, 1 << 22))):
            chunks.append(block)
            left -= len(block)
        return b"".join(chunks), st
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the manifest ({e})") from None
    finally:
        os.close(fd)


def dir_replaced(path: Path, dir_fd: int) -> bool:
    """Whether `path` no longer names the folder `dir_fd` holds (a save swapped another in)."""
    try:
        return not os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(dir_fd))
    except OSError:
        return True


_ATTEMPTS = 3


def read_zero_manifest(ckpt_dir: str | os.PathLike) -> tuple[int, bytes, os.stat_result]:
    """Open `<ckpt_dir>/zero` and read its manifest: (the folder's fd, to be closed by the
    caller, the manifest's bytes, its fstat). A save that replaces the checkpoint between the
    two (the folder opened is then deleted under the reader) is met by opening the new one, up
    to a few times.

    Raises:
        CheckpointError: as `open_zero_dir` and `read_manifest_at`; or the checkpoint kept
            changing (the message says so).
    """
    zero = Path(ckpt_dir) / ZERO_DIR
    for _ in range(_ATTEMPTS):
        fd = open_zero_dir(ckpt_dir)
        try:
            raw, st = read_manifest_at(fd, zero / MANIFEST)
            return fd, raw, st
        except CheckpointError:
            replaced = dir_replaced(zero, fd)
            os.close(fd)
            if not replaced:
                raise
    raise CheckpointError(
        f"{Path(ckpt_dir)}: the checkpoint changed while loading ({zero} was replaced "
        f"{_ATTEMPTS} times while its manifest was read); a save to this path was probably "
        "running: load again once it has finished"
    )
