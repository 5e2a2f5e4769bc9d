"""Sharded save and load: every rank writes and reads only its own slices.

Save (atomic), phases:
  1. rank 0 picks a temporary directory name `<dir>.tmp-<token>` and every rank learns it;
  2. every rank writes its params / optim / rng files there and hashes them;
  3. all ranks exchange their outcome (control traffic): if any rank failed, every rank raises
     and the temporary directory is removed; the previous checkpoint is untouched;
  4. rank 0 writes the model's config files, then the manifest (last), then swaps the
     directory in with renames; all ranks learn the outcome.
A crash at any point before the final rename leaves `<dir>` as it was; a directory without a
manifest is never taken for a checkpoint.

Load, on any world size and stage: every rank reads the manifest, checks that it describes this
model, and for each of its flat units reads exactly the element ranges it owns from the source
ranks' files (`partition.plan_reads`, safetensors `get_slice`). Every file it opens is checked
first against the manifest's size and sha256, then its header and its own metadata against the
manifest's layout, and every tensor's dtype and shape against what the layout says, all before
the engine changes: a checkpoint that fails any check leaves the engine as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import comm
from ..optimizer import IMPLEMENTATION_KEYS
from ..partition import plan_reads
from .format import (
    FORMAT_VERSION,
    MANIFEST,
    ZERO_DIR,
    CheckpointError,
    _show,
    check_shard_metadata,
    layout_slice,
    layout_to_json,
    open_shard,
    read_manifest,
    sha256_file,
    shard_file,
    swap_into_place,
    verify_file,
)
from .rng import read_rng, rng_state
from .state import Counters, RankState

__all__ = ["save_checkpoint", "load_checkpoint", "export_keys", "latest_checkpoint"]


def _flat_key(index: int) -> str:
    return f"flat{index:05d}"


def export_keys(module: torch.nn.Module) -> tuple[list[str], bool]:
    """The tensor names `save_pretrained` writes for this model: its state dict without the
    tied copies the model class re-ties on load (GPT-2: no lm_head.weight). Also whether
    save_pretrained converts weights on the way out (transformers 5 does for fused layouts such
    as Mixtral's experts), which the export cannot reproduce yet."""
    meta = {
        k: torch.empty(v.shape, device="meta") for k, v in module.state_dict(keep_vars=True).items()
    }
    try:
        from transformers import PreTrainedModel
        from transformers.modeling_utils import (
            remove_tied_weights_from_state_dict,
            revert_weight_conversion,
        )
    except ImportError:  # pragma: no cover - transformers is a dependency
        return list(meta), False
    if not isinstance(module, PreTrainedModel):
        return list(meta), False
    kept = remove_tied_weights_from_state_dict(meta, module)
    converted = revert_weight_conversion(module, dict(kept))
    return list(kept), set(converted) != set(kept)


def _write_rank_files(state: RankState, zero_dir: Path) -> dict[str, dict]:
    rank, ws = state.rank, state.world_size
    header = {
        "format": "pt",
        "hf_zero": json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "rank": rank,
                "world_size": ws,
                "layout_slice": layout_slice(state.layout, rank),
            }
        ),
    }
    params, optim, state_meta = {}, {}, {}
    opt = state.optimizer
    for fu in state.layout.flat_units:
        master = state.masters[fu.index]
        params[_flat_key(fu.index)] = state.saved_slice(fu, master).detach()
        for key, value in opt.state.get(master, {}).items():
            name = f"{_flat_key(fu.index)}.{key}"
            if isinstance(value, torch.Tensor) and value.shape == master.shape:
                optim[name] = state.saved_slice(fu, value).detach()
            elif isinstance(value, torch.Tensor):
                optim[name] = value.detach().clone()
            else:
                state_meta[name] = value
    if rank == 0:
        param_names = {
            n for fu in state.layout.flat_units for p in fu.params for n in (p.name, *p.aliases)
        }
        for name, buf in state.module.state_dict().items():
            if name not in param_names:
                params[f"buffer:{name}"] = buf.detach().cpu().contiguous()
    rng, rng_meta = rng_state()
    files = {
        shard_file("params", rank, ws): (params, header),
        shard_file("optim", rank, ws): (optim, {**header, "state": json.dumps(state_meta)}),
        shard_file("rng", rank, ws): (rng, {**header, **rng_meta}),
    }
    out = {}
    for name, (tensors, meta) in files.items():
        path = zero_dir / name
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        except Exception as e:  # disk full, file too large, I/O error: name the file
            raise OSError(f"writing {path} failed: {type(e).__name__}: {e}") from e
        out[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return out


def _manifest(state: RankState, files: dict[str, dict]) -> dict:
    opt = state.optimizer
    groups = []
    for g in opt.param_groups:
        groups.append(
            {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in g.items()
                if k != "params" and _jsonable(v)
            }
        )
    state_keys = {}
    for fu in state.layout.flat_units:
        st = opt.state.get(state.masters[fu.index], {})
        if st:
            state_keys[_flat_key(fu.index)] = sorted(st)
    keys, converts = export_keys(state.module)
    return {
        "format_version": FORMAT_VERSION,
        "stage": state.stage,
        "world_size": state.world_size,
        "mixed_precision": state.mixed_precision,
        "step": state.counters.step,
        "skipped_steps": state.counters.skipped_steps,
        "config": dict(state.config),
        "model_class": type(state.module).__name__,
        "layout": layout_to_json(state.layout, state.param_dtypes),
        "optimizer": {
            "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
            "param_groups": groups,
            "state_keys": state_keys,
        },
        "loss_scaler": dict(state.counters.loss_scaler),
        "hf_export": {
            "keys": keys,
            "dtypes": {k: _export_dtype(state, k) for k in keys},
            "weight_conversion": converts,
        },
        "files": files,
    }


def _export_dtype(state: RankState, key: str) -> str:
    """The dtype an HF export writes for state-dict key `key`: the model's own."""
    if key in state.param_dtypes:
        return state.param_dtypes[key]
    for fu in state.layout.flat_units:
        for p in fu.params:
            if key in p.aliases:
                return state.param_dtypes[p.name]
    return str(state.module.state_dict()[key].dtype).removeprefix("torch.")


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def save_checkpoint(state: RankState, path: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write a sharded checkpoint to `path` (collective; atomic). Returns the path."""
    path = Path(path)
    token = comm.all_gather_object(
        uuid.uuid4().hex[:12], group=state.group, label="save_checkpoint"
    )[0]
    tmp = path.parent / f"{path.name}.tmp-{token}"
    error, files = None, {}
    try:
        (tmp / ZERO_DIR).mkdir(parents=True, exist_ok=True)
        files = _write_rank_files(state, tmp / ZERO_DIR)
    except Exception as e:  # reported to every rank below, then raised
        error = f"{type(e).__name__}: {e}"
    reports = comm.all_gather_object((error, files), group=state.group, label="save_checkpoint")
    failed = [(r, err) for r, (err, _) in enumerate(reports) if err]
    if not failed and state.rank == 0:
        try:
            all_files = {k: v for _, f in reports for k, v in f.items()}
            config = getattr(state.module, "config", None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(tmp)
            gen = getattr(state.module, "generation_config", None)
            if gen is not None and hasattr(gen, "save_pretrained"):
                gen.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            manifest = json.dumps(_manifest(state, all_files), indent=1)
            part = tmp / ZERO_DIR / (MANIFEST + ".part")
            part.write_text(manifest)
            os.replace(part, tmp / ZERO_DIR / MANIFEST)
            swap_into_place(tmp, path, token)
        except Exception as e:
            failed.append((0, f"{type(e).__name__}: {e}"))
    failed = comm.all_gather_object(failed, group=state.group, label="save_checkpoint")[0]
    if failed:
        if state.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        detail = "; ".join(f"rank {r}: {err}" for r, err in failed)
        raise CheckpointError(
            f"saving checkpoint {path} failed, previous checkpoint left as it was: {detail}"
        )
    return path


def _check_same_model(state: RankState, manifest: dict, where: str) -> None:
    src = manifest["_layout"]
    have = {p.name: tuple(p.shape) for fu in src.flat_units for p in fu.params}
    want = {p.name: tuple(p.shape) for fu in state.layout.flat_units for p in fu.params}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{where} holds another model: parameters missing from it {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, parameters this model does not have {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}"
        )
    for name, shape in want.items():
        if have[name] != shape:
            raise CheckpointError(
                f"{where} holds another model: {name!r} has shape {have[name]} there, {shape} here"
            )
    want_cls = f"{type(state.optimizer).__module__}.{type(state.optimizer).__qualname__}"
    if manifest["optimizer"].get("class") != want_cls:
        raise CheckpointError(
            f"{where} was saved with optimizer {manifest['optimizer'].get('class')}, "
            f"this engine uses {want_cls}"
        )
    saved_groups = manifest["optimizer"].get("param_groups", [])
    if len(saved_groups) != len(state.optimizer.param_groups):
        raise CheckpointError(
            f"{where} has {len(saved_groups)} optimizer param groups, "
            f"this optimizer has {len(state.optimizer.param_groups)}"
        )


class _Files:
    """Source files opened on demand. Each is checked against the manifest before its first use:
    size and sha256, then its safetensors header (by safetensors), then its own metadata (rank,
    world size, slice of the layout)."""

    def __init__(self, ckpt: Path, manifest: dict):
        self.ckpt, self.manifest, self._open, self._keys = ckpt, manifest, {}, {}

    def path(self, kind: str, rank: int) -> Path:
        return self.ckpt / ZERO_DIR / shard_file(kind, rank, self.manifest["world_size"])

    def get(self, kind: str, rank: int):
        name = shard_file(kind, rank, self.manifest["world_size"])
        if name not in self._open:
            path = verify_file(self.ckpt, self.manifest, name)
            f = open_shard(path)
            check_shard_metadata(path, f.metadata(), self.manifest["_layout"], rank)
            self._open[name], self._keys[name] = f, set(f.keys())
        return self._open[name]

    def keys(self, kind: str, rank: int) -> set[str]:
        self.get(kind, rank)
        return self._keys[shard_file(kind, rank, self.manifest["world_size"])]

    def flat(self, kind: str, rank: int, key: str, numel: int):
        """The slice handle of tensor `key`, checked to be F32 [numel]: one rank's slice of a
        flat unit (or of optimizer state shaped like it)."""
        f = self.get(kind, rank)
        if key not in self.keys(kind, rank):
            raise CheckpointError(f"{self.path(kind, rank)}: tensor {key!r} is missing")
        sl = f.get_slice(key)
        if sl.get_dtype() != "F32" or sl.get_shape() != [numel]:
            raise CheckpointError(
                f"{self.path(kind, rank)}: tensor {key!r} is {sl.get_dtype()} {sl.get_shape()}, "
                f"the layout says F32 [{numel}]"
            )
        return sl

    def check_state_keys(self, rank: int, state_keys: dict[str, list[str]]) -> None:
        """Every tensor of an optim file must be state the manifest lists: a manifest that
        leaves some out would otherwise load without it."""
        for key in sorted(self.keys("optim", rank)):
            flat, _, name = key.partition(".")
            if name not in state_keys.get(flat, []):
                raise CheckpointError(
                    f"{self.path('optim', rank)}: holds optimizer state {key!r} that the "
                    "manifest's state_keys do not list"
                )


# dtypes a 0-dim optimizer state tensor (AdamW's step, ...) may have.
_SCALAR_STATE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


def _fits(current: Any, saved: Any) -> bool:
    """Whether a hyperparameter saved in the manifest can replace this optimizer's value."""
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, int | float | torch.Tensor):
        return isinstance(saved, int | float) and not isinstance(saved, bool)
    if isinstance(current, tuple | list):
        return (
            isinstance(saved, list)
            and len(saved) == len(current)
            and all(_fits(c, s) for c, s in zip(current, saved))
        )
    if isinstance(current, str):
        return isinstance(saved, str)
    if isinstance(current, dict):
        return isinstance(saved, dict)
    return current is None and not isinstance(saved, list | dict)  # foreach, fused: None or a flag


def _restored(g: dict, key: str) -> bool:
    """Whether a saved hyperparameter `key` replaces this param group's on load: the ones the
    group has, except its params and the kernel choice, which stays the loading engine's."""
    return key in g and key != "params" and key not in IMPLEMENTATION_KEYS


def _check_param_groups(opt: torch.optim.Optimizer, saved_groups: list, where: str) -> None:
    for i, (g, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        for k, v in saved.items():
            if _restored(g, k) and not _fits(g[k], v):
                raise CheckpointError(
                    f"{where}: optimizer param group {i} has {k}={_show(v)}, which cannot "
                    f"replace this optimizer's {k}={_show(g[k])}"
                )


def _check_loss_scaler(state: RankState, manifest: dict, where: str) -> dict:
    """The manifest as the engine should see it: a dynamic loss scaler's saved state checked,
    or, when the checkpoint was saved without one, the engine's own state kept."""
    if not state.dynamic_loss_scale:
        return manifest
    saved = manifest.get("loss_scaler") or {}
    if not saved:
        return {**manifest, "loss_scaler": dict(state.counters.loss_scaler)}
    scale, good = saved.get("scale"), saved.get("good_steps")
    if not (
        isinstance(scale, int | float)
        and not isinstance(scale, bool)
        and math.isfinite(scale)
        and scale > 0
        and type(good) is int
        and good >= 0
    ):
        raise CheckpointError(f"{where}: bad loss_scaler state {_show(saved)}")
    return manifest


@torch.no_grad()
def load_checkpoint(state: RankState, path: str | os.PathLike) -> dict:
    """Load `path` into `engine` (collective), resharding when world size or stage differ.
    Returns the manifest.

    Phases:
      1. Read and check: the manifest, every file this rank will read (size, sha256, header,
         metadata), every tensor's dtype and shape, the optimizer state it lists, buffers,
         hyperparameters, loss scaler and RNG states.
      2. Agree: one small collective tells every rank whether any rank's check failed. If one
         did, every rank raises (the failing rank its own error, the others a CheckpointError
         naming it) and every engine is exactly as it was.
      3. Copy into the engine: masters, optimizer state, hyperparameters, buffers, counters,
         RNG states.

    Raises:
        CheckpointError: the checkpoint failed a check on this rank or on another one.
    """
    ckpt = Path(path)
    error, checked = None, None
    try:
        checked = _check_for_load(state, ckpt)
    except Exception as e:  # reported to every rank below, then raised
        error = e
    reports = comm.all_gather_object(
        None if error is None else f"{type(error).__name__}: {error}",
        group=state.group,
        label="load_checkpoint",
    )
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise CheckpointError(
            f"loading checkpoint {ckpt} failed on another rank, this rank's engine is left as "
            f"it was: {detail}"
        )
    _apply_loaded(state, checked)
    comm.barrier(group=state.group, label="load_checkpoint")
    return checked.manifest


@dataclass
class _Checked:
    """What phase 1 of a load found and checked: everything phase 3 copies into the state."""

    manifest: dict
    seen_by_engine: dict  # the manifest as the engine takes it (see _check_loss_scaler)
    masters_from: dict  # flat index -> [(read, slice handle)]
    states_from: dict  # flat index -> {state key: 0-dim tensor | [(read, slice handle)]}
    buffers: list  # [(model buffer, saved value)]
    restore_rng: Callable[[], None] | None
    files: _Files  # the open files the slice handles read from


def _check_for_load(state: RankState, ckpt: Path) -> _Checked:
    """Phase 1 of `load_checkpoint`: read and check, changing nothing."""
    manifest = read_manifest(ckpt)
    where = str(ckpt)
    _check_same_model(state, manifest, where)
    src = manifest["_layout"]
    files = _Files(ckpt, manifest)
    state_keys = manifest["optimizer"].get("state_keys", {})
    opt = state.optimizer
    plans = {
        fu.index: plan_reads(src, fu, *state.owned[fu.index]) for fu in state.layout.flat_units
    }
    ranks = sorted({0} | {rd.src_rank for reads in plans.values() for rd in reads})
    for r in ranks:
        files.get("params", r)
        files.get("optim", r)
        files.check_state_keys(r, state_keys)

    def flat(kind: str, rd, key: str):
        return files.flat(kind, rd.src_rank, key, src.flat_units[rd.src_flat].shard_numel)

    # Phase 1: per flat unit, (read, slice handle) pairs for the masters and each state key; a
    # 0-dim state tensor is read whole.
    masters_from, states_from = {}, {}
    for fu in state.layout.flat_units:
        reads = plans[fu.index]
        masters_from[fu.index] = [(rd, flat("params", rd, _flat_key(rd.src_flat))) for rd in reads]
        if not fu.trainable:
            continue
        keys = state_keys.get(_flat_key(reads[0].src_flat), []) if reads else []
        flat_state = {}
        for key in keys:
            first, probe = reads[0].src_rank, f"{_flat_key(reads[0].src_flat)}.{key}"
            if probe in files.keys("optim", first):
                sl = files.get("optim", first).get_slice(probe)
                if sl.get_shape() == []:
                    if sl.get_dtype() not in _SCALAR_STATE_DTYPES:
                        raise CheckpointError(
                            f"{files.path('optim', first)}: tensor {probe!r} is "
                            f"{sl.get_dtype()}, not a number"
                        )
                    flat_state[key] = files.get("optim", first).get_tensor(probe)
                    continue
            flat_state[key] = [
                (rd, flat("optim", rd, f"{_flat_key(rd.src_flat)}.{key}")) for rd in reads
            ]
        states_from[fu.index] = flat_state
    _check_param_groups(opt, manifest["optimizer"].get("param_groups", []), where)
    buffers = []  # small and saved once, by rank 0
    params0 = files.get("params", 0)
    for name, buf in state.module.named_buffers():
        key = f"buffer:{name}"
        if key in files.keys("params", 0):
            value = params0.get_tensor(key)
            if value.dtype != buf.dtype or value.shape != buf.shape:
                raise CheckpointError(
                    f"{files.path('params', 0)}: buffer {name!r} is {value.dtype} "
                    f"{list(value.shape)}, the model's is {buf.dtype} {list(buf.shape)}"
                )
            buffers.append((buf, value))
    seen_by_engine = _check_loss_scaler(state, manifest, where)
    restore_rng = None
    if manifest["world_size"] == state.world_size:  # per-rank streams only mean the same then
        if shard_file("rng", state.rank, manifest["world_size"]) in manifest["files"]:
            rng = files.get("rng", state.rank)
            restore_rng = read_rng(rng, files.path("rng", state.rank))
    return _Checked(
        manifest, seen_by_engine, masters_from, states_from, buffers, restore_rng, files
    )


def _apply_loaded(state: RankState, checked: _Checked) -> None:
    """Phase 3 of `load_checkpoint`: nothing here can fail on the checkpoint's account."""
    opt, manifest = state.optimizer, checked.manifest
    masters_from, states_from = checked.masters_from, checked.states_from
    for fu in state.layout.flat_units:
        master = state.masters[fu.index]
        master.zero_()
        for rd, sl in masters_from[fu.index]:
            master[rd.dst_start : rd.dst_start + rd.length].copy_(
                sl[rd.src_start : rd.src_start + rd.length]
            )
        if not fu.trainable:
            continue
        flat_state = {}
        for key, source in states_from[fu.index].items():
            if isinstance(source, torch.Tensor):
                flat_state[key] = source.to(master.device)
                continue
            value = torch.zeros_like(master)
            for rd, sl in source:
                value[rd.dst_start : rd.dst_start + rd.length].copy_(
                    sl[rd.src_start : rd.src_start + rd.length]
                )
            flat_state[key] = value
        if flat_state:
            opt.state[master] = flat_state
        else:
            opt.state.pop(master, None)
    for g, saved in zip(opt.param_groups, manifest["optimizer"].get("param_groups", [])):
        for k, v in saved.items():
            if _restored(g, k):
                g[k] = tuple(v) if isinstance(g[k], tuple) else v
    for buf, value in checked.buffers:
        buf.copy_(value)
    seen = checked.seen_by_engine
    state.restore(
        Counters(
            step=int(seen["step"]),
            skipped_steps=int(seen.get("skipped_steps", 0)),
            loss_scaler=dict(seen.get("loss_scaler") or {}),
        )
    )
    if checked.restore_rng is not None:
        checked.restore_rng()


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint under `root` with the highest step (ties: newest name), or None.

    A directory counts only if its manifest reads and checks (a save that died before its final
    rename is a `*.tmp-*` directory without one). Files are not hashed here; `load_checkpoint`
    verifies what it reads.
    """
    best, best_key = None, None
    root = Path(root)
    if not root.is_dir():
        return None
    for d in sorted(root.iterdir()):
        if not d.is_dir() or ".tmp-" in d.name or ".old-" in d.name:
            continue
        try:
            step = int(read_manifest(d)["step"])
        except CheckpointError:
            continue
        if best_key is None or (step, d.name) > best_key:
            best, best_key = d, (step, d.name)
    return best
