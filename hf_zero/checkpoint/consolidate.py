"""Offline export of a sharded checkpoint to the folder `model.save_pretrained` writes (§6).

No process group, no GPU, no optimizer file: only the manifest and the params-rank files are
read, and of those only the byte ranges each exported tensor needs. Peak memory is about one
output shard plus one tensor, whatever the model size.

Phases:
  1. Read the manifest; check every params-rank file against it (size + sha256).
  2. Plan: for each key of `hf_export.keys` (the names save_pretrained writes, tied copies
     already removed), in order, find its source (a parameter of a flat unit, by name or alias,
     or a `buffer:` tensor of rank 0's params file), its shape and its output dtype; split the
     keys into output shards exactly as huggingface_hub's `split_torch_state_dict_into_shards`
     does for `save_pretrained` (same order, same file names).
  3. For each output shard: assemble each tensor from the ranks' slices of its flat unit (rank r
     holds elements [r*S, (r+1)*S), S = padded_numel // world_size), casting while copying, and
     write the shard with safetensors (`{"format": "pt"}` metadata).
  4. Write the index (sharded exports only), copy config and tokenizer files, then move the
     temporary folder into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .format import ZERO_DIR, CheckpointError, read_manifest, shard_file, verify_file

__all__ = ["consolidate", "parse_size", "plan_shards", "COPIED_FILES"]

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
    flat: int | None  # flat unit index; None for a buffer (rank 0's `buffer:{key}`)
    offset: int = 0  # in the flat unit
    shard_numel: int = 0  # S of the flat unit

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
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(
            f"dtype must be 'float32', 'bfloat16', 'float16', 'auto' or None, got {dtype!r}"
        )
    return DTYPES[dtype]


class _Params:
    """The params-rank files, each checked against the manifest, opened once. Reads go through
    `pread` where safetensors offers it, so no file stays mapped into this process's memory."""

    def __init__(self, ckpt: Path, manifest: dict):
        self.ckpt, self.manifest = ckpt, manifest
        self.world_size = manifest["world_size"]
        self.paths = [
            verify_file(ckpt, manifest, shard_file("params", r, self.world_size))
            for r in range(self.world_size)
        ]
        self._open: dict[int, object] = {}

    def open(self, rank: int):
        if rank not in self._open:
            path = str(self.paths[rank])
            try:
                self._open[rank] = safe_open(path, "pt", backend="pread")
            except TypeError:  # safetensors < 0.8 has no backend choice
                self._open[rank] = safe_open(path, "pt")
        return self._open[rank]

    def slice(self, rank: int, key: str):
        f = self.open(rank)
        if key not in f.keys():
            raise CheckpointError(f"{self.paths[rank]}: tensor {key!r} is missing")
        return f.get_slice(key)

    def check_flat(self, flat: int, shard_numel: int) -> None:
        for r in range(self.world_size):
            shape = self.slice(r, f"flat{flat:05d}").get_shape()
            if shape != [shard_numel]:
                raise CheckpointError(
                    f"{self.paths[r]}: tensor 'flat{flat:05d}' has shape {shape}, the layout says "
                    f"[{shard_numel}]"
                )

    def read(self, e: _Export) -> torch.Tensor:
        """The tensor `e`, assembled and cast, shaped as in the model."""
        if e.flat is None:
            return self.slice(0, f"buffer:{e.key}")[:].to(e.dtype).reshape(e.shape)
        pieces = _rank_slices(e.offset, e.numel, e.shard_numel)
        key = f"flat{e.flat:05d}"
        if len(pieces) == 1:
            rank, start, _, n = pieces[0]
            return self.slice(rank, key)[start : start + n].to(e.dtype).reshape(e.shape)
        out = torch.empty(e.numel, dtype=e.dtype)
        for rank, start, dst, n in pieces:
            out[dst : dst + n].copy_(self.slice(rank, key)[start : start + n])
        return out.reshape(e.shape)


def _plan(manifest: dict, params: _Params, dtype, where: str) -> list[_Export]:
    export = manifest.get("hf_export")
    if not isinstance(export, dict) or not isinstance(export.get("keys"), list):
        raise CheckpointError(f"{where}: the manifest has no hf_export keys")
    saved_dtypes = export.get("dtypes", {})
    by_name = {}
    for fu in manifest["_layout"].flat_units:
        for p in fu.params:
            for name in (p.name, *p.aliases):
                by_name[name] = (fu, p)
    plan, checked = [], set()
    for key in export["keys"]:
        if dtype == "auto":
            name = saved_dtypes.get(key)
            if name not in DTYPES and not isinstance(getattr(torch, str(name), None), torch.dtype):
                raise CheckpointError(f"{where}: hf_export has no usable dtype for {key!r}")
            want = getattr(torch, name)
        else:
            want = dtype
        if key in by_name:
            fu, p = by_name[key]
            if fu.index not in checked:
                params.check_flat(fu.index, fu.shard_numel)
                checked.add(fu.index)
            plan.append(_Export(key, p.shape, want or torch.float32, fu.index, p.offset, fu.shard_numel))
            continue
        f = params.open(0)
        if f"buffer:{key}" not in f.keys():
            raise CheckpointError(
                f"{where}: export key {key!r} is neither a parameter of the layout nor a buffer "
                f"in {params.paths[0].name}"
            )
        sl = f.get_slice(f"buffer:{key}")
        have = _ST_DTYPES.get(sl.get_dtype())
        if have is None:
            raise CheckpointError(f"{params.paths[0]}: buffer {key!r} has dtype {sl.get_dtype()}")
        if want is None or not have.is_floating_point:
            want = have  # integer buffers (position ids...) keep their dtype, as save_pretrained
        plan.append(_Export(key, tuple(sl.get_shape()), want, None))
    return plan


def _prepare_output(out: Path, ckpt: Path, overwrite: bool) -> None:
    if out.resolve() == ckpt.resolve() or ckpt.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"output_dir {out} would replace the checkpoint {ckpt}; pick another")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {out} exists and is not empty; pass overwrite=True (--overwrite) to "
            "replace it"
        )


def _write_config(src: Path, dst: Path, dtype) -> None:
    """config.json as save_pretrained writes it for a model cast to one dtype: its "dtype" field
    names that dtype (from_pretrained's default dtype="auto" follows it)."""
    if not isinstance(dtype, torch.dtype):
        shutil.copyfile(src, dst)
        return
    config = json.loads(src.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
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
) -> Path:
    """Write the folder `model.save_pretrained` would write for the checkpoint's weights.

    Args:
        checkpoint_dir: a sharded checkpoint (format v1) saved by `engine.save_checkpoint`.
        output_dir: the folder to create; written atomically (temporary folder, then rename).
        dtype: "float32" (default), "bfloat16" or "float16" casts every floating tensor;
            "auto" writes each tensor in the model's own dtype; None writes the fp32 master
            weights and the buffers as saved. Integer buffers always keep their dtype.
        max_shard_size: largest output shard in bytes, or "5GB", "500MB", "10KB" (decimal, as
            save_pretrained); above it the export is split into `model-0000k-of-0000n` files plus
            `model.safetensors.index.json`. A tensor larger than this gets its own shard.
        overwrite: replace a non-empty `output_dir`.
        progress: show a progress bar over tensors (stderr).

    Returns:
        The output folder.

    Raises:
        CheckpointError: no manifest, a params file missing, truncated, corrupted or not matching
            the layout (the message names the file).
        FileExistsError: `output_dir` is not empty and `overwrite` is False.
        ValueError: bad `dtype` or `max_shard_size`, or `output_dir` would replace the checkpoint.
    """
    ckpt, out = Path(checkpoint_dir), Path(output_dir)
    want = _resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    _prepare_output(out, ckpt, overwrite)
    manifest = read_manifest(ckpt)
    where = str(ckpt / ZERO_DIR / "manifest.json")
    params = _Params(ckpt, manifest)
    plan = _plan(manifest, params, want, where)
    by_key = {e.key: e for e in plan}
    shards = plan_shards([(e.key, e.nbytes) for e in plan], max_bytes)
    names = shard_names(len(shards))

    tmp = out.parent / f"{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), unit="tensor", desc="consolidate", disable=not progress)
        for name, keys in zip(names, shards):
            tensors = {}
            for key in keys:
                tensors[key] = params.read(by_key[key])
                bar.update()
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
        bar.close()
        if len(names) > 1:
            index = {
                "metadata": {
                    "total_parameters": manifest["_layout"].numel,
                    "total_size": sum(e.nbytes for e in plan),
                },
                "weight_map": {k: n for n, keys in zip(names, shards) for k in keys},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for fname in COPIED_FILES:
            if (ckpt / fname).is_file():
                if fname == "config.json":
                    _write_config(ckpt / fname, tmp / fname, want)
                else:
                    shutil.copyfile(ckpt / fname, tmp / fname)
        old = None
        if out.exists():
            old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
