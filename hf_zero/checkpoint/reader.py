"""A checkpoint opened once: what a load, an export or inspect reads is what it verified.

A save replaces a checkpoint by swapping a whole new folder in and deleting the old one, so a
reader that opened files by path at different moments could mix two saves (one save's manifest
and weights with the next one's optimizer state) or meet files deleted under it. The reader
holds on to the versions it opened instead:

  1. `CheckpointReader(ckpt)` opens `<ckpt>/zero` (a directory fd, never through a symlink) and
     reads the manifest from it (`format.read_zero_manifest`: if a save deleted that folder
     before its manifest was read, the new one is opened); every later name is resolved in that
     same folder, whatever has been renamed since.
  2. `verify(name)` opens a shard file from that folder once (not through a symlink, a regular
     file), checks its size and sha256 against the manifest from the open file, and keeps it
     open; `safetensors(name)` parses the very file that was hashed (`/proc/self/fd/N`, or an
     inode check where /proc is not available). Shard files are never rewritten in place, so
     the bytes read are the bytes verified.
  3. When a file is missing or does not match, `changed()` tells a concurrent save (zero/ was
     swapped, the manifest rewritten, the file changed after the load began) from a damaged
     checkpoint: the first is "the checkpoint changed while loading", the second names the file
     as missing, truncated or corrupted.

`digest` (the manifest's sha256) lets the ranks of one load check that they all read the same
manifest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..partition import Layout
from .errors import CheckpointError, show
from .format import (
    _PROC_FD,
    FORMAT_VERSION,
    MANIFEST,
    ZERO_DIR,
    Manifest,
    dir_replaced,
    open_at,
    read_zero_manifest,
    shard_file,
    stat_at,
)
from .layout_json import layout_slice

__all__ = ["CheckpointReader", "check_shard_metadata"]

_CHUNK = 1 << 22


class CheckpointReader:
    """`<ckpt>/zero` and its manifest, opened now; shard files opened and verified on demand.
    Close it (or use it as a context manager) when done: it holds file descriptors."""

    def __init__(self, ckpt: str | os.PathLike):
        self.ckpt = Path(ckpt)
        self.zero = self.ckpt / ZERO_DIR
        self.started_ns = time.time_ns()
        self._fds: dict[str, int] = {}
        self._verified: set[str] = set()
        self._handles: dict[str, tuple] = {}
        self._dir, raw, self._manifest_stat = read_zero_manifest(self.ckpt)
        try:
            self.manifest = Manifest.parse(raw, where=str(self.zero / MANIFEST))
        except BaseException:
            os.close(self._dir)
            raise
        self.digest = hashlib.sha256(raw).hexdigest()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._dir >= 0:
            os.close(self._dir)
            self._dir = -1

    def path(self, name: str) -> Path:
        return self.zero / name

    # ---- opening and verifying --------------------------------------------------------------

    def _open(self, name: str) -> int:
        if name in self._fds:
            return self._fds[name]
        path = self.path(name)
        try:
            st = stat_at(self._dir, name)
            if stat.S_ISLNK(st.st_mode):  # checked first: opening would touch its target
                raise CheckpointError(
                    f"{path} is a symlink (to {os.readlink(path)}); a checkpoint's files must "
                    "be its own: replace the link with the file itself"
                )
            fd = open_at(
                self._dir, name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            )
        except FileNotFoundError:
            raise self._changed_or(name, self._missing(name)) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CheckpointError(
                    f"{path} is a symlink; a checkpoint's files must be its own"
                ) from None
            raise CheckpointError(f"{path}: cannot open ({e})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointError(f"{path}: not a regular file; not a file hf_zero wrote")
        self._fds[name] = fd
        return fd

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint was saved by {self.manifest.world_size} ranks but file {name} is "
            f"missing (expected at {self.path(name)})"
        )

    def verify(self, name: str) -> int:
        """Open shard file `name` and check its size and sha256 against the manifest, from the
        open file; returns its fd (owned by the reader).

        Raises:
            CheckpointError: not listed, missing, a symlink, not a regular file, truncated or
                corrupted, or the checkpoint changed while loading.
        """
        entry = self.manifest.files.get(name)
        path = self.path(name)
        if entry is None:
            raise CheckpointError(f"{path}: not listed in the manifest")
        fd = self._open(name)
        if name in self._verified:
            return fd
        size = os.fstat(fd).st_size
        if size != entry.size:
            raise self._changed_or(
                name,
                CheckpointError(
                    f"{path}: {size} bytes, the manifest says {entry.size} (truncated or replaced)"
                ),
            )
        h, pos = hashlib.sha256(), 0
        while block := os.pread(fd, _CHUNK, pos):
            h.update(block)
            pos += len(block)
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise self._changed_or(
                name,
                CheckpointError(
                    f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                    f"{entry.sha256[:12]}... (corrupted)"
                ),
            )
        self._verified.add(name)
        return fd

    def source(self, name: str) -> str:
        """A path that opens the very file `verify(name)` hashed (for safetensors)."""
        fd = self.verify(name)
        return f"/proc/self/fd/{fd}" if _PROC_FD else str(self.path(name))

    def safetensors(self, name: str):
        """`safe_open` of the verified shard file `name` (the same file, not the same path).

        Raises:
            CheckpointError: everything `verify` raises; a file safetensors refuses.
        """
        fd = self.verify(name)
        path = self.path(name)
        try:
            f = safe_open(self.source(name), "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
        if not _PROC_FD:  # the path was opened again: it must still be the file verified
            try:
                same = os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd))
            except OSError:
                same = False
            if not same:
                raise self._changed_error(f"{name} was replaced after it was verified")
        return f

    def shard(self, kind: str, rank: int):
        """The verified, opened `kind` file of saving rank `rank`, its metadata checked against
        the manifest's layout (`check_shard_metadata`); returns (safe_open handle, its keys).
        Each file is opened once per reader."""
        name = shard_file(kind, rank, self.manifest.world_size)
        if name not in self._handles:
            f = self.safetensors(name)
            check_shard_metadata(self.path(name), f.metadata(), self.manifest.layout, rank)
            self._handles[name] = (f, set(f.keys()))
        return self._handles[name]

    # ---- telling a concurrent save from damage -------------------------------------------------

    def changed(self, name: str | None = None) -> str | None:
        """How the checkpoint changed since the manifest was read, or None: zero/ was swapped
        or removed, the manifest replaced, or file `name` (if opened) changed after the load
        began."""
        if not os.path.lexists(self.zero):
            return f"{self.zero} was removed"
        if dir_replaced(self.zero, self._dir):
            return f"{self.zero} was replaced by another save's"
        try:
            m = stat_at(self._dir, MANIFEST)
        except OSError:
            return "its manifest was removed"
        was = self._manifest_stat
        if (m.st_ino, m.st_size, m.st_mtime_ns) != (was.st_ino, was.st_size, was.st_mtime_ns):
            return "its manifest was replaced"
        if name is not None and name in self._fds:
            if os.fstat(self._fds[name]).st_ctime_ns > self.started_ns:
                return f"{name} was replaced or modified after the load began"
        return None

    def _changed_error(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"{self.ckpt}: the checkpoint changed while loading ({why}); a save to this path "
            "was probably running: load again once it has finished"
        )

    def _changed_or(self, name: str, error: CheckpointError) -> CheckpointError:
        why = self.changed(name)
        return error if why is None else self._changed_error(why)


def check_shard_metadata(path: Path, metadata: dict | None, layout: Layout, rank: int) -> None:
    """A shard file's own metadata must be what the saving rank wrote for the manifest's layout:
    format "pt" and, under "hf_zero", this format version, rank `rank` of the layout's world size
    and that rank's `layout_slice`.

    Raises:
        CheckpointError: the metadata is missing, malformed, or describes another rank, world
            size or layout (the manifest was edited, or the file belongs to another save).
    """
    meta = metadata or {}
    if meta.get("format") != "pt":
        raise CheckpointError(
            f'{path}: metadata format is {show(meta.get("format"))}, expected "pt"'
        )
    try:
        info = json.loads(meta.get("hf_zero", ""))
    except (ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: no hf_zero metadata; not a file hf_zero wrote")
    ws = layout.world_size
    got = (info.get("format_version"), info.get("rank"), info.get("world_size"))
    if not (all(type(v) is int for v in got) and got == (FORMAT_VERSION, rank, ws)):
        raise CheckpointError(
            f"{path}: written as format_version/rank/world_size {show(got)}, the manifest says "
            f"{(FORMAT_VERSION, rank, ws)}"
        )
    if info.get("layout_slice") != layout_slice(layout, rank):
        raise CheckpointError(
            f"{path}: the slice of the layout it holds differs from the manifest's layout (the "
            "manifest was edited, or the file belongs to another save)"
        )
