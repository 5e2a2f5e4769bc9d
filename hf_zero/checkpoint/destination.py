"""What a save or an export may replace, and putting a finished folder in place.

The rule: a save or an export never deletes what it did not write.
- A checkpoint save (`check_checkpoint_destination`) writes to a path that does not exist, to
  an empty folder, or over a folder that is recognisably an hf_zero checkpoint (it has
  zero/manifest.json). Anything else there (a folder of other files, a folder of checkpoints,
  a plain file, a symlink) is refused before anything is written, naming the path and what it
  holds.
- An export (`check_export_destination`) writes outside the checkpoint and never around it;
  without `overwrite` only to a new or empty folder; with `overwrite` also over a folder that
  holds only files an export writes (EXPORT_FILES, `model-0000k-of-0000n.safetensors`).

`swap_into_place` moves the finished temporary folder to its path. An existing folder is
exchanged with it in one step where the OS can (renameat2 RENAME_EXCHANGE on Linux), so the
path always names one complete version, then the previous version is renamed to
`<path>.old-<token>` and deleted. If it cannot be deleted, that is reported (a RuntimeWarning
naming the leftover path), never left silently.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

from .errors import CheckpointError
from .format import MANIFEST, ZERO_DIR

__all__ = [
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "COPIED_FILES",
    "EXPORT_FILES",
    "check_checkpoint_destination",
    "check_export_destination",
    "swap_into_place",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files a model folder carries next to its weights, copied as they are when present.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# What a PEFT model's adapter export writes (`PeftModel.save_pretrained`).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXPORT_FILES = frozenset((WEIGHTS_NAME, INDEX_NAME, "README.md", *COPIED_FILES, *ADAPTER_FILES))
_EXPORT_SHARD_RE = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors")
_SHOWN = 6  # entries named in a refusal


def _listing(names: list[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is recognisably an hf_zero checkpoint: a real folder holding a real
    zero/manifest.json (its content is not read: a damaged checkpoint is still one)."""
    zero = path / ZERO_DIR
    return (
        path.is_dir()
        and not path.is_symlink()
        and zero.is_dir()
        and not zero.is_symlink()
        and (zero / MANIFEST).is_file()
        and not (zero / MANIFEST).is_symlink()
    )


def check_checkpoint_destination(path: str | os.PathLike) -> None:
    """Refuse a checkpoint path whose current content a save must not replace.

    Raises:
        CheckpointError: `path` is a symlink, a file, or a non-empty folder that is not an
            hf_zero checkpoint; the message names it and what it holds.
    """
    path = Path(path)
    rule = (
        "a save replaces only an hf_zero checkpoint (a folder with zero/manifest.json) or an "
        "empty folder, and never deletes what it did not write"
    )
    if path.is_symlink():
        raise CheckpointError(
            f"refusing to save a checkpoint to {path}: it is a symlink (to {os.readlink(path)}); "
            f"{rule}. Save to the folder itself or to a new path"
        )
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(
            f"refusing to save a checkpoint to {path}: it is a file, not a folder; {rule}. "
            "Pick another path, or move the file away"
        )
    if is_checkpoint(path):
        return
    entries = os.listdir(path)
    if not entries:
        return
    held = [f"{n}/" if (path / n).is_dir() and not (path / n).is_symlink() else n for n in entries]
    inner = [n for n in entries if is_checkpoint(path / n)]
    hint = (
        f" ({len(inner)} of them hf_zero checkpoints: it is a folder of checkpoints; save "
        f"each one to its own subfolder, such as {path / 'checkpoint-<step>'})"
        if inner
        else ""
    )
    raise CheckpointError(
        f"refusing to save a checkpoint to {path}: it is a folder that is not an hf_zero "
        f"checkpoint (no {ZERO_DIR}/{MANIFEST}) and holds {len(entries)} entries: "
        f"{_listing(held)}{hint}; {rule}. Pick a new path"
    )


def _is_export_file(folder: Path, name: str) -> bool:
    p = folder / name
    return (
        p.is_file()
        and not p.is_symlink()
        and (name in EXPORT_FILES or _EXPORT_SHARD_RE.fullmatch(name) is not None)
    )


def check_export_destination(
    out: str | os.PathLike, ckpt: str | os.PathLike, *, overwrite: bool
) -> None:
    """Refuse an export folder that overlaps the checkpoint or holds what an export must not
    replace.

    Raises:
        ValueError: `out` is the checkpoint, inside it, or contains it.
        NotADirectoryError: a parent of `out` is a file.
        FileExistsError: `out` is a file; a non-empty folder without `overwrite`; with
            `overwrite`, a folder holding files an export does not write (named).
    """
    out, ckpt = Path(out), Path(ckpt)
    o, c = out.resolve(), ckpt.resolve()
    if o == c or c.is_relative_to(o):
        raise ValueError(
            f"output_dir {out} would replace the checkpoint {ckpt} (it is the checkpoint or "
            "holds it); pick a folder outside the checkpoint"
        )
    if o.is_relative_to(c):
        raise ValueError(
            f"output_dir {out} is inside the checkpoint {ckpt}; writing there would change the "
            "checkpoint: pick a folder outside it"
        )
    for parent in o.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"output_dir {out}: {parent} is a file, not a folder; pick an output "
                    "path under a folder"
                )
            break
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"output_dir {out} exists and is not a folder; pick another path")
    entries = os.listdir(out)
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"output_dir {out} exists and is not empty; pass overwrite=True (--overwrite) to "
            "replace it"
        )
    unknown = [n for n in entries if not _is_export_file(out, n)]
    if unknown:
        raise FileExistsError(
            f"output_dir {out} holds {len(unknown)} entries an export does not write: "
            f"{_listing(unknown)}; overwrite=True replaces only a folder holding an export "
            "(model*.safetensors, its index, config, tokenizer files, README.md) or an empty "
            "one. Move them out or pick another folder"
        )


# ---- putting a folder in place -----------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2 if sys.platform == "linux" else None
except (OSError, AttributeError):  # pragma: no cover - no libc renameat2 (glibc < 2.28)
    _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders at `a` and `b` in one step; False where the OS or filesystem cannot."""
    if _renameat2 is None:
        return False
    sys.audit("os.rename", a, b, None, None)  # what it is, for audit hooks
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b} failed: {os.strerror(err)}")


def _remove_tree(path: Path) -> str | None:
    """Delete `path`; what went wrong if anything of it is left."""
    errors: list[str] = []

    def note(_func, where, exc_info) -> None:
        errors.append(f"{where}: {exc_info[1]}")

    shutil.rmtree(path, onerror=note)
    if errors or os.path.lexists(path):
        return errors[0] if errors else "it is still there"
    return None


def swap_into_place(tmp: Path, dest: Path, token: str) -> str | None:
    """Move the finished folder `tmp` to `dest`, replacing what is there (already checked
    replaceable): exchanged in one step where possible, else `dest` renamed aside first; the
    previous version is deleted once the new one is in place.

    Returns:
        None, or the warning given (RuntimeWarning) when the previous version could not be
        deleted: it names the leftover folder.
    """
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return None
    old = dest.parent / f"{dest.name}.old-{token}"
    if _exchange(tmp, dest):
        os.rename(tmp, old)  # tmp now holds the previous version
    else:
        os.rename(dest, old)
        os.rename(tmp, dest)
    why = _remove_tree(old)
    if why is None:
        return None
    message = (
        f"hf_zero: {dest} was written, but its previous version, moved aside to {old}, could "
        f"not be deleted ({why}); delete that folder by hand"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message
