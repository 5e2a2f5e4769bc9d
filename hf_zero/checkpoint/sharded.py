"""Sharded save and load: every rank writes and reads only its own slices.

Save (atomic), phases:
  1. rank 0 checks that the path may be replaced (nothing, an empty folder, or an hf_zero
     checkpoint: `destination.check_checkpoint_destination`) and picks a temporary name
     `<dir>.tmp-<token>`; every rank learns both, and a refused path is refused on every rank
     before anything is written;
  2. every rank writes its params / optim / rng files there and hashes them; a PEFT model's
     frozen flat units are left out, the manifest records their digests instead (`frozen`);
  3. all ranks exchange their outcome (control traffic): if any rank failed, every rank raises
     and the temporary directory is removed; the previous checkpoint is untouched;
  4. rank 0 writes the model's config files, then the manifest (last), then swaps the
     directory in (`destination.swap_into_place`: the previous version is deleted, or a
     warning names what is left of it); all ranks learn the outcome.
A crash at any point before the final rename leaves `<dir>` as it was; a directory without a
manifest is never taken for a checkpoint.

Load, on any world size and stage, phases:
  1. Read and check, changing nothing: every rank opens the checkpoint once
     (`reader.CheckpointReader`: what it reads is what it verified), reads the manifest, checks
     that it describes this model and optimizer (`compat`), and opens and verifies every file
     it will read: size, sha256, header, its own metadata against the manifest's layout, and
     every tensor's dtype and shape, the optimizer state it lists, buffers, hyperparameters,
     loss scaler and RNG states. For each of its flat units it plans exactly the element
     ranges it owns in the source ranks' files (`partition.plan_reads`). Frozen parameters the
     checkpoint references instead of holding (`frozen`) must have the recorded digests in
     this model, whose values they keep.
  2. Agree: one small collective tells every rank whether any rank's check failed and which
     manifest each read. If one failed, every rank raises (the failing rank its own error, the
     others a CheckpointError naming it); if the ranks read different manifests (a save
     replaced the checkpoint between them), every rank raises "the checkpoint changed while
     loading". Either way every engine is exactly as it was.
  3. Copy into the engine from the files opened in phase 1 (safetensors `get_slice`): masters,
     optimizer state, hyperparameters, buffers, counters, RNG states; `weights_only` copies
     the masters and buffers only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import comm
from ..partition import plan_reads
from . import compat
from .destination import check_checkpoint_destination, swap_into_place
from .errors import CheckpointError
from .format import (
    FORMAT_VERSION,
    MANIFEST,
    ZERO_DIR,
    FileEntry,
    Manifest,
    flat_key,
    shard_file,
)
from .frozen import FrozenBase, check_frozen, frozen_digests, references_frozen, source_of
from .layout_json import layout_slice
from .reader import CheckpointReader
from .rng import read_rng, rng_state
from .state import Counters, RankState

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_rank_files(state: RankState, zero_dir: Path, skip_frozen: bool) -> dict[str, FileEntry]:
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
        if skip_frozen and not fu.trainable:
            continue  # referenced by digest in the manifest (`frozen`)
        params[flat_key(fu.index)] = state.saved_slice(fu, master).detach()
        for key, value in opt.state.get(master, {}).items():
            name = f"{flat_key(fu.index)}.{key}"
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
        out[name] = FileEntry(path.stat().st_size, _sha256(path))
    return out


def save_checkpoint(state: RankState, path: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write a sharded checkpoint of `state` to `path` (collective; atomic).

    Args:
        state: this rank's view of the engine.
        path: the checkpoint folder. It may not exist yet, be an empty folder, or be an hf_zero
            checkpoint, which is replaced; anything else is refused.
        tokenizer: saved next to the model's config files, as save_pretrained does.

    Returns:
        `path`.

    Raises:
        CheckpointError: the path may not be replaced (on every rank, before anything is
            written), or the save failed on some rank (the previous checkpoint is left as it
            was; the message names every failing rank's error).
    """
    path = Path(path)
    proposal = (uuid.uuid4().hex[:12], None)
    if state.rank == 0:
        try:
            check_checkpoint_destination(path)
        except CheckpointError as e:
            proposal = (proposal[0], str(e))
        except Exception as e:  # cannot even look: refused on every rank, not a hang
            proposal = (proposal[0], f"cannot save a checkpoint to {path}: {type(e).__name__}: {e}")
    token, refusal = comm.all_gather_object(proposal, group=state.group, label="save_checkpoint")[0]
    if refusal is not None:
        raise CheckpointError(refusal)
    frozen = None
    if references_frozen(state):  # the same on every rank: the model and layout are
        frozen = FrozenBase(source_of(state), frozen_digests(state))
    tmp = path.parent / f"{path.name}.tmp-{token}"
    error, files = None, {}
    try:
        (tmp / ZERO_DIR).mkdir(parents=True, exist_ok=True)
        files = _write_rank_files(state, tmp / ZERO_DIR, skip_frozen=frozen is not None)
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
            manifest = json.dumps(Manifest.from_state(state, all_files, frozen).to_json(), indent=1)
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


# dtypes a 0-dim optimizer state tensor (AdamW's step, ...) may have.
_SCALAR_STATE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


class _Shards:
    """The source files of one load, through the reader: each opened and verified once."""

    def __init__(self, reader: CheckpointReader):
        self.reader, self.ws = reader, reader.manifest.world_size

    def path(self, kind: str, rank: int) -> Path:
        return self.reader.path(shard_file(kind, rank, self.ws))

    def get(self, kind: str, rank: int):
        return self.reader.shard(kind, rank)[0]

    def keys(self, kind: str, rank: int) -> set[str]:
        return self.reader.shard(kind, rank)[1]

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


@torch.no_grad()
def load_checkpoint(
    state: RankState,
    path: str | os.PathLike,
    *,
    weights_only: bool = False,
    restore_rng: bool = True,
) -> Manifest:
    """Load `path` into `state` (collective), resharding when world size or stage differ.

    Args:
        state: this rank's view of the engine.
        path: a checkpoint saved by `save_checkpoint` at any world size and stage.
        weights_only: load the weights (parameters and buffers) only: the optimizer state,
            hyperparameters, step counters, loss scale and RNG states stay this engine's (fresh
            in a new engine), and the optimizer files are not read. The optimizer may then
            differ from the saved one (param groups, trainable parameters, class).
        restore_rng: restore every rank's RNG states (torch, CUDA, python, numpy) when the world
            size is the saved one. Pass False when the host framework restores its own
            (Accelerate, the Trainer).

    Returns:
        The checkpoint's manifest.

    Raises:
        CheckpointError: the checkpoint failed a check on this rank or on another one, does not
            fit this engine (`compat`), or changed while loading (a save replaced it); the
            engine is left exactly as it was.
    """
    ckpt = Path(path)
    reader, error, checked = None, None, None
    mine = frozen_digests(state)  # collective, before any rank can fail on its files
    try:
        try:
            reader = CheckpointReader(ckpt)
            checked = _check_for_load(state, reader, weights_only, restore_rng, mine)
        except Exception as e:  # reported to every rank below, then raised
            error = e
        reports = comm.all_gather_object(
            (
                None if error is None else f"{type(error).__name__}: {error}",
                None if reader is None else (reader.digest, reader.manifest.step),
            ),
            group=state.group,
            label="load_checkpoint",
        )
        if error is not None:
            raise error
        failed = [(r, msg) for r, (msg, _) in enumerate(reports) if msg is not None]
        if failed:
            detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
            raise CheckpointError(
                f"loading checkpoint {ckpt} failed on another rank, this rank's engine is left "
                f"as it was: {detail}"
            )
        if len({seen for _, seen in reports}) > 1:
            by_rank = ", ".join(f"rank {r}: step {seen[1]}" for r, (_, seen) in enumerate(reports))
            raise CheckpointError(
                f"{ckpt}: the checkpoint changed while loading (the ranks read different "
                f"manifests: {by_rank}); a save to this path was probably running: load again "
                "once it has finished. Every engine is left as it was"
            )
        _apply_loaded(state, checked)
    finally:
        checked = None  # the slice handles read from the reader's files
        if reader is not None:
            reader.close()
    comm.barrier(group=state.group, label="load_checkpoint")
    return reader.manifest


@dataclass
class _Checked:
    """What phase 1 of a load found and checked: everything phase 3 copies into the state."""

    manifest: Manifest
    weights_only: bool
    loss_scaler: dict  # what the engine takes (compat.check_loss_scaler)
    masters_from: dict  # flat index -> [(read, slice handle)]
    states_from: dict  # flat index -> {state key: 0-dim tensor | [(read, slice handle)]}
    buffers: list  # [(model buffer, saved value)]
    restore_rng: Callable[[], None] | None
    kept: set  # flat indices whose masters keep (part of) their values: a referenced base


def _check_for_load(
    state: RankState,
    reader: CheckpointReader,
    weights_only: bool,
    restore_rng: bool,
    frozen_mine: dict[str, str],
) -> _Checked:
    """Phase 1 of `load_checkpoint`: read and check, changing nothing."""
    manifest = reader.manifest
    where = str(reader.ckpt)
    compat.check_same_model(state, manifest, where)
    if not weights_only:
        compat.check_optimizer(state, manifest, where)
    src = manifest.layout
    files = _Shards(reader)
    state_keys = manifest.optimizer.state_keys
    # Source flat units the checkpoint references (a frozen base) instead of holding.
    referenced = set()
    if manifest.frozen_base is not None:
        referenced = {fu.index for fu in src.flat_units if not fu.trainable}
        names = [p.name for i in sorted(referenced) for p in src.flat_units[i].params]
        check_frozen(manifest.frozen_base, frozen_mine, names, where)
    plans, kept = {}, set()
    for fu in state.layout.flat_units:
        reads = plan_reads(src, fu, *state.owned[fu.index])
        plans[fu.index] = [rd for rd in reads if rd.src_flat not in referenced]
        if len(plans[fu.index]) < len(reads):
            kept.add(fu.index)
    ranks = sorted({0} | {rd.src_rank for reads in plans.values() for rd in reads})
    for r in ranks:  # every file this rank reads is opened and verified before any is read
        files.get("params", r)
        if not weights_only:
            files.get("optim", r)
            files.check_state_keys(r, state_keys)
    rng_name = shard_file("rng", state.rank, manifest.world_size)
    # Per-rank streams only mean the same at the same world size.
    rng_wanted = (
        restore_rng
        and not weights_only
        and manifest.world_size == state.world_size
        and rng_name in manifest.files
    )
    if rng_wanted:
        files.get("rng", state.rank)

    def flat(kind: str, rd, key: str):
        return files.flat(kind, rd.src_rank, key, src.flat_units[rd.src_flat].shard_numel)

    # Per flat unit, (read, slice handle) pairs for the masters and each state key; a 0-dim
    # state tensor is read whole.
    masters_from, states_from = {}, {}
    for fu in state.layout.flat_units:
        reads = plans[fu.index]
        masters_from[fu.index] = [(rd, flat("params", rd, flat_key(rd.src_flat))) for rd in reads]
        if weights_only or not fu.trainable:
            continue
        keys = state_keys.get(flat_key(reads[0].src_flat), []) if reads else []
        flat_state = {}
        for key in keys:
            first, probe = reads[0].src_rank, f"{flat_key(reads[0].src_flat)}.{key}"
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
                (rd, flat("optim", rd, f"{flat_key(rd.src_flat)}.{key}")) for rd in reads
            ]
        states_from[fu.index] = flat_state
    loss_scaler = dict(state.counters.loss_scaler)
    if not weights_only:
        compat.check_param_groups(state.optimizer, manifest.optimizer.param_groups, where)
        loss_scaler = compat.check_loss_scaler(state, manifest, where)
    buffers = []  # small and saved once, by rank 0
    params0 = files.get("params", 0)
    # Buffers, and the frozen parameters the engine keeps whole (outside the layout): what the
    # save wrote as `buffer:` tensors.
    in_layout = {
        n for fu in state.layout.flat_units for p in fu.params for n in (p.name, *p.aliases)
    }
    for name, buf in state.module.state_dict(keep_vars=True).items():
        if name in in_layout:
            continue
        key = f"buffer:{name}"
        if key in files.keys("params", 0):
            value = params0.get_tensor(key)
            if value.dtype != buf.dtype or value.shape != buf.shape:
                raise CheckpointError(
                    f"{files.path('params', 0)}: buffer {name!r} is {value.dtype} "
                    f"{list(value.shape)}, the model's is {buf.dtype} {list(buf.shape)}"
                )
            buffers.append((buf, value))
    rng = read_rng(files.get("rng", state.rank), reader.path(rng_name)) if rng_wanted else None
    return _Checked(
        manifest, weights_only, loss_scaler, masters_from, states_from, buffers, rng, kept
    )


def _apply_loaded(state: RankState, checked: _Checked) -> None:
    """Phase 3 of `load_checkpoint`: nothing here can fail on the checkpoint's account."""
    opt, manifest = state.optimizer, checked.manifest
    for fu in state.layout.flat_units:
        master = state.masters[fu.index]
        if fu.index not in checked.kept:
            master.zero_()
        for rd, sl in checked.masters_from[fu.index]:
            master[rd.dst_start : rd.dst_start + rd.length].copy_(
                sl[rd.src_start : rd.src_start + rd.length]
            )
        if checked.weights_only or not fu.trainable:
            continue
        flat_state = {}
        for key, source in checked.states_from[fu.index].items():
            if isinstance(source, torch.Tensor):
                # A copy each: safetensors hands out views of one mapped file, and two flat
                # units reading the same saved step would share it (and count each step twice).
                flat_state[key] = source.to(master.device, copy=True)
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
    if not checked.weights_only:
        for g, saved in zip(opt.param_groups, manifest.optimizer.param_groups):
            for k, v in saved.items():
                if compat.restored(g, k):
                    g[k] = tuple(v) if isinstance(g[k], tuple) else v
    for buf, value in checked.buffers:
        buf.copy_(value)
    counters = (
        state.counters
        if checked.weights_only
        else Counters(manifest.step, manifest.skipped_steps, checked.loss_scaler)
    )
    state.restore(counters)
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
            step = Manifest.read(d).step
        except CheckpointError:
            continue
        if best_key is None or (step, d.name) > best_key:
            best, best_key = d, (step, d.name)
    return best
