"""Offline export of a sharded checkpoint to the folder `model.save_pretrained` writes.

No process group, no GPU, no optimizer file: only the manifest and the params-rank files are
read, and of those only the byte ranges each exported tensor needs. Peak memory is a few read
blocks (BLOCK elements each) above the interpreter's own, whatever the model and shard size.

Phases:
  0. Check the output folder (`destination.check_export_destination`): outside the
     checkpoint and not around it, new or empty, or with `overwrite` an earlier export.
  1. Open the checkpoint once (`reader.CheckpointReader`) and check every params-rank file
     against the manifest (size + sha256) from the open file, then its header (by
     safetensors) and, once the plan is made, its metadata (rank, world size, slice of the
     layout). Every later read is of those very files.
  2. Plan: for each key of `hf_export.keys` (the names save_pretrained writes, tied copies
     already removed, renames applied), in order, find its source (the state-dict name it was
     renamed from, if any: a parameter of a flat unit, by name or alias, or a `buffer:` tensor
     of rank 0's params file), its shape and its output dtype; split the keys into output
     shards exactly as huggingface_hub's `split_torch_state_dict_into_shards` does for
     `save_pretrained` (same order, same file names). A model whose save_pretrained converts
     values (not only names) is refused, saying which conversion.
  3. For each output shard: write the safetensors header (`{"format": "pt"}` metadata; offsets
     known from the plan), then stream each tensor's bytes in blocks of at most BLOCK elements,
     read from the ranks' slices of its flat unit (rank r holds elements [r*S, (r+1)*S),
     S = padded_numel // world_size) and cast block by block. A tensor's flat elements are
     contiguous in its flat unit and in the output, so the blocks are written in order and no
     tensor, let alone a shard, is ever assembled in memory.
  4. Write the index (sharded exports only), copy config and tokenizer files, write the model
     card (README.md, `card.write_card`), then move the temporary folder into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..card import CardInfo, write_card
from .destination import (
    COPIED_FILES,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_export_destination,
    swap_into_place,
)
from .errors import CheckpointError
from .format import MANIFEST, MAX_JSON_BYTES, ZERO_DIR, Manifest, parse_json, shard_file
from .reader import CheckpointReader, check_shard_metadata

__all__ = ["consolidate", "parse_size", "plan_shards", "COPIED_FILES"]

# Elements per read: bounds memory (32 MB of fp32) while keeping reads large.
BLOCK = 1 << 23
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# dtype names hf_export may give ("float32", "int64", ...): those the export can write.
_EXPORT_DTYPES = {str(v).removeprefix("torch."): v for v in _ST_DTYPES.values()}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "5GB", "500MB", "10KB" (decimal units, the HF
    convention) or "2GiB" (binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), flags=re.I)
        if m is None:
            raise ValueError(
                f"max_shard_size must be bytes (int) or a size like '5GB', '500MB', '10KB', "
                f"got {size!r}"
            )
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return value


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group (key, bytes) into shards as huggingface_hub's `split_torch_state_dict_into_shards`
    does: keys in order fill the current shard until the next would exceed `max_bytes`; a tensor
    larger than `max_bytes` gets a shard of its own, placed where it was met, while the current
    shard stays open."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, nbytes in sizes:
        if nbytes > max_bytes:
            shards.append([key])
            continue
        if current_bytes + nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


@dataclass(frozen=True)
class _Export:
    """One tensor of the export and where its elements come from."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # in the export
    flat: int | None  # flat unit index; None for a buffer
    offset: int = 0  # in the flat unit
    shard_numel: int = 0  # S of the flat unit
    buffer: str = ""  # the buffer's state-dict name (rank 0's `buffer:{name}`)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _rank_slices(offset: int, numel: int, shard_numel: int) -> list[tuple[int, int, int, int]]:
    """(rank, start in that rank's slice, start in the tensor, length) covering flat elements
    [offset, offset + numel)."""
    out, pos = [], offset
    while pos < offset + numel:
        rank, start = divmod(pos, shard_numel)
        n = min(offset + numel - pos, shard_numel - start)
        out.append((rank, start, pos - offset, n))
        pos += n
    return out


def _resolve_dtype(dtype) -> torch.dtype | str | None:
    if dtype is None or dtype == "auto" or dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype must be 'float32', 'bfloat16', 'float16', 'auto' or None, got {dtype!r}"
        )
    return DTYPES[dtype]


class _Params:
    """The params-rank files, each opened once and checked against the manifest (size +
    sha256) up front.

    A read is a zero-copy view of a memory map opened for one block and closed after it, of the
    very file that was verified: the pages a block touches stay resident only while it is
    written. (A file kept mapped would keep every page read so far resident, and the RSS would
    grow to the checkpoint's size.)
    """

    def __init__(self, reader: CheckpointReader):
        self.world_size = ws = reader.manifest.world_size
        names = [shard_file("params", r, ws) for r in range(ws)]
        # Hashing is most of the time left; hashlib and file reads release the GIL.
        with ThreadPoolExecutor(min(ws, os.cpu_count() or 1, 8)) as pool:
            list(pool.map(reader.verify, names))
        self.paths = [reader.path(n) for n in names]
        self.sources = [reader.source(n) for n in names]
        self.tensors: list[dict[str, tuple[list[int], str]]] = []  # per rank: shape, dtype
        self.metadata: list[dict | None] = []
        for name in names:
            with reader.safetensors(name) as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                self.tensors.append({k: (s.get_shape(), s.get_dtype()) for k, s in slices.items()})
                self.metadata.append(f.metadata())

    def check_metadata(self, manifest: Manifest) -> None:
        """Each file's own metadata must describe the manifest's layout (see
        `reader.check_shard_metadata`)."""
        for rank, path in enumerate(self.paths):
            check_shard_metadata(path, self.metadata[rank], manifest.layout, rank)

    def info(self, rank: int, key: str) -> tuple[list[int], str]:
        """(shape, safetensors dtype name) of tensor `key` in rank `rank`'s file."""
        if key not in self.tensors[rank]:
            raise CheckpointError(f"{self.paths[rank]}: tensor {key!r} is missing")
        return self.tensors[rank][key]

    def check_flat(self, flat: int, shard_numel: int) -> None:
        for r in range(self.world_size):
            shape, dtype = self.info(r, f"flat{flat:05d}")
            if shape != [shard_numel] or dtype != "F32":
                raise CheckpointError(
                    f"{self.paths[r]}: tensor 'flat{flat:05d}' is {dtype} {shape}, the layout "
                    f"says F32 [{shard_numel}]"
                )

    def blocks(self, e: _Export) -> Iterator[torch.Tensor]:
        """The elements of `e` in order, as 1D blocks of at most BLOCK elements, cast. A block
        must not be used after the next one is asked for."""
        if e.flat is None:  # buffers are small
            with safe_open(self.sources[0], "pt") as f:
                yield f.get_tensor(f"buffer:{e.buffer}").reshape(-1).to(e.dtype)
            return
        key = f"flat{e.flat:05d}"
        for rank, start, _, n in _rank_slices(e.offset, e.numel, e.shard_numel):
            for a in range(start, start + n, BLOCK):
                with safe_open(self.sources[rank], "pt") as f:
                    yield f.get_slice(key)[a : min(a + BLOCK, start + n)].to(e.dtype)


def refuse_conversion(manifest: Manifest, where: str) -> None:
    """Raise when the model's save_pretrained converts values, saying which conversion."""
    export = manifest.hf_export
    if export is not None and export.weight_conversion:
        raise CheckpointError(
            f"{where}: {manifest.model_class or 'this model'} converts its weights when saved: "
            f"{export.conversion or 'save_pretrained writes other tensors than the model holds'}"
            ". The hf_zero export copies tensors and follows renames only, so it cannot write "
            "that; load the checkpoint with engine.load_checkpoint and save the model's "
            "full_state_dict() with save_pretrained"
        )


def refuse_referenced_base(manifest: Manifest, where: str) -> None:
    """Raise when the checkpoint references its frozen base instead of holding it (a PEFT
    model's: `frozen`): there is nothing to export it from here."""
    base = manifest.frozen_base
    if base is not None:
        raise CheckpointError(
            f"{where}: this checkpoint of a PEFT model holds the trained adapter only; its "
            f"{len(base.digests)} frozen base parameters are referenced "
            f"({base.source or 'source unknown'}), not stored, so it cannot be consolidated "
            "offline. Load it into the engine that trains the model (engine.load_checkpoint, "
            "or resume the Trainer) and export from there: engine.export(folder) writes the "
            "adapter, engine.export(folder, merge_adapters=True) the merged model"
        )


def _plan(manifest: Manifest, params: _Params, dtype, where: str) -> list[_Export]:
    export = manifest.hf_export
    if export is None:
        raise CheckpointError(f"{where}: the manifest has no hf_export keys")
    refuse_conversion(manifest, where)
    by_name = {}
    for fu in manifest.layout.flat_units:
        for p in fu.params:
            for name in (p.name, *p.aliases):
                by_name[name] = (fu, p)
    plan, checked = [], set()
    for key in export.keys:
        source = export.source(key)
        if dtype == "auto":
            name = export.dtypes.get(key)
            want = _EXPORT_DTYPES.get(name)
            if want is None:
                raise CheckpointError(f"{where}: hf_export gives no dtype for {key!r}: {name!r}")
        else:
            want = dtype
        if source in by_name:
            fu, p = by_name[source]
            if want is not None and not want.is_floating_point:
                raise CheckpointError(
                    f"{where}: hf_export gives parameter {key!r} dtype {want}; parameters export "
                    "as floating point"
                )
            if fu.index not in checked:
                params.check_flat(fu.index, fu.shard_numel)
                checked.add(fu.index)
            plan.append(
                _Export(key, p.shape, want or torch.float32, fu.index, p.offset, fu.shard_numel)
            )
            continue
        if f"buffer:{source}" not in params.tensors[0]:
            renamed = f" (renamed from {source!r})" if source != key else ""
            raise CheckpointError(
                f"{where}: export key {key!r}{renamed} is neither a parameter of the layout nor "
                f"a buffer in {params.paths[0].name}"
            )
        shape, st_dtype = params.info(0, f"buffer:{source}")
        have = _ST_DTYPES.get(st_dtype)
        if have is None:
            raise CheckpointError(f"{params.paths[0]}: buffer {source!r} has dtype {st_dtype}")
        if want is None or not have.is_floating_point:
            want = have  # integer buffers (position ids...) keep their dtype, as save_pretrained
        plan.append(_Export(key, tuple(shape), want, None, buffer=source))
    return plan


def _write_shard(path: Path, exports: list[_Export], params: _Params, bar) -> None:
    """One safetensors file, streamed: header first (the plan gives every offset), then each
    tensor's bytes block by block. Tensors are laid out by decreasing element size, as the
    safetensors writer does, so every tensor is aligned to its element size."""
    order = sorted(exports, key=lambda e: -e.dtype.itemsize)  # stable: key order within a size
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for e in order:
        header[e.key] = {
            "dtype": _ST_NAMES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in order:
            written = 0
            for block in params.blocks(e):
                data = block.contiguous().view(torch.uint8).numpy()
                f.write(data)
                written += data.nbytes
            assert written == e.nbytes, (e.key, written, e.nbytes)
            bar.update()


def _copied_source(ckpt: Path, fname: str) -> Path | None:
    """The checkpoint's file `fname` to copy into the export, or None when there is no such
    regular file. A symlink is followed only within the checkpoint: the export must not carry
    a file from elsewhere on this machine."""
    src = ckpt / fname
    if not src.is_file():
        return None
    if src.is_symlink() and not src.resolve().is_relative_to(ckpt.resolve()):
        raise CheckpointError(
            f"{src} is a symlink to {src.resolve()}, outside the checkpoint; copy the file in "
            "or remove the link"
        )
    return src


def _write_config(src: Path, dst: Path, dtype) -> None:
    """config.json as save_pretrained writes it for a model cast to one dtype: its "dtype" field
    names that dtype (from_pretrained's default dtype="auto" follows it)."""
    with open(src, "rb") as f:
        config = parse_json(f.read(MAX_JSON_BYTES + 1), where=str(src), what="model config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{src}: a model config must be a JSON object")
    name = str(dtype).removeprefix("torch.")
    if not isinstance(dtype, torch.dtype) or config.get("dtype") == name:
        shutil.copyfile(src, dst)
        return
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = config["dtype"]
    dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def consolidate(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "float32",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    card: CardInfo | None = None,
) -> Path:
    """Write the folder `model.save_pretrained` would write for the checkpoint's weights, plus
    a model card.

    Args:
        checkpoint_dir: a sharded checkpoint (format v1) saved by `engine.save_checkpoint`.
        output_dir: the folder to create; written atomically (temporary folder, then rename).
            Not the checkpoint, not inside it and not around it.
        dtype: "float32" (default), "bfloat16" or "float16" casts every floating tensor;
            "auto" writes each tensor in the model's own dtype; None writes the fp32 master
            weights and the buffers as saved. Integer buffers always keep their dtype.
        max_shard_size: largest output shard in bytes, or "5GB", "500MB", "10KB" (decimal, as
            save_pretrained); above it the export is split into `model-0000k-of-0000n` files plus
            `model.safetensors.index.json`. A tensor larger than this gets its own shard.
        overwrite: replace a non-empty `output_dir`, which must hold only files an export
            writes (an earlier export); anything else there is refused, naming it.
        progress: show a progress bar over tensors (stderr).
        card: what the model card (README.md) says beyond the training setup the checkpoint
            records.

    Returns:
        The output folder.

    Raises:
        CheckpointError: no manifest, a params file missing, truncated, corrupted or not matching
            the layout, a model whose save_pretrained converts weights, a config.json that is
            not a JSON object, a copied file that is a symlink to outside the checkpoint (the
            message names the file).
        FileExistsError: `output_dir` is a file; not empty and `overwrite` is False; or holds
            files an export does not write.
        NotADirectoryError: a parent of `output_dir` is a file.
        ValueError: bad `dtype` or `max_shard_size`, or `output_dir` is, holds or is inside the
            checkpoint.
    """
    return write_export(
        checkpoint_dir,
        output_dir,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=progress,
        card=card,
    )


def write_export(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
    progress: bool,
    card: CardInfo | None,
    tokenizer=None,
) -> Path:
    """`consolidate`; `tokenizer`, if given, is saved into the export over the checkpoint's
    tokenizer files (a live export from an existing checkpoint)."""
    if sys.byteorder != "little":  # safetensors stores little-endian; blocks are written raw
        raise RuntimeError("consolidate writes safetensors byte by byte: little-endian hosts only")
    ckpt, out = Path(checkpoint_dir), Path(output_dir)
    want = _resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    with CheckpointReader(ckpt) as reader:  # a checkpoint first, then where its export goes
        check_export_destination(out, ckpt, overwrite=overwrite)
        manifest = reader.manifest
        where = str(ckpt / ZERO_DIR / MANIFEST)
        refuse_conversion(manifest, where)
        refuse_referenced_base(manifest, where)
        params = _Params(reader)
        plan = _plan(manifest, params, want, where)
        params.check_metadata(manifest)
        copied = {f: src for f in COPIED_FILES if (src := _copied_source(ckpt, f)) is not None}
        by_key = {e.key: e for e in plan}
        shards = plan_shards([(e.key, e.nbytes) for e in plan], max_bytes)
        names = shard_names(len(shards))

        tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir(parents=True)
        try:
            from tqdm.auto import tqdm

            with tqdm(
                total=len(plan), unit="tensor", desc="consolidate", disable=not progress
            ) as bar:
                for name, keys in zip(names, shards):
                    _write_shard(tmp / name, [by_key[k] for k in keys], params, bar)
            if len(names) > 1:
                index = {
                    "metadata": {
                        "total_parameters": manifest.layout.numel,
                        "total_size": sum(e.nbytes for e in plan),
                    },
                    "weight_map": {k: n for n, keys in zip(names, shards) for k in keys},
                }
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            for fname, src in copied.items():
                if fname == "config.json":
                    _write_config(src, tmp / fname, want)
                else:
                    shutil.copyfile(src, tmp / fname)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_card(tmp, manifest, card)  # the last file
            swap_into_place(tmp, out, uuid.uuid4().hex[:12])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out
