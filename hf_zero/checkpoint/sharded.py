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
ranks' files (`partition.plan_reads`, safetensors `get_slice`), after checking each file it opens
against the manifest's size and sha256.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import comm
from ..partition import plan_reads
from .format import (
    FORMAT_VERSION,
    MANIFEST,
    ZERO_DIR,
    CheckpointError,
    layout_to_json,
    read_manifest,
    sha256_file,
    shard_file,
    swap_into_place,
    verify_file,
)

if TYPE_CHECKING:
    from ..engine import ZeroEngine

__all__ = ["save_checkpoint", "load_checkpoint", "export_keys", "latest_checkpoint"]


def _flat_key(index: int) -> str:
    return f"flat{index:05d}"


def _saved_slice(engine: ZeroEngine, fu, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's saved part [r*S, (r+1)*S) of a flat-shaped tensor the engine holds over its
    owned range (the whole flat at stage 0, the shard otherwise)."""
    lo, _ = engine.owned(fu)
    s_lo, s_hi = fu.shard_range(engine.rank)
    return tensor[s_lo - lo : s_hi - lo]


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


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    meta = {}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = s
    version, state, gauss = random.getstate()
    tensors["python"] = torch.tensor(state, dtype=torch.int64)
    meta["python"] = json.dumps([version, gauss])
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = json.dumps([kind, int(pos), int(has_gauss), float(cached)])
    except ImportError:  # pragma: no cover
        pass
    return tensors, meta


def _restore_rng(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
        torch.set_rng_state(f.get_tensor("torch_cpu"))
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"torch_cuda{i}" in keys:
                    torch.cuda.set_rng_state(f.get_tensor(f"torch_cuda{i}"), i)
        version, gauss = json.loads(meta["python"])
        random.setstate((version, tuple(f.get_tensor("python").tolist()), gauss))
        if "numpy" in keys:
            import numpy as np

            kind, pos, has_gauss, cached = json.loads(meta["numpy"])
            np.random.set_state(
                (kind, f.get_tensor("numpy").numpy().astype("uint32"), pos, has_gauss, cached)
            )


def _write_rank_files(engine: ZeroEngine, zero_dir: Path) -> dict[str, dict]:
    rank, ws = engine.rank, engine.world_size
    # Each file carries its own slice of the layout: which parameter elements it holds, where.
    layout_slice = [
        {
            "flat": fu.index,
            "range": list(fu.shard_range(rank)),
            "pieces": [
                [p.param.name, p.param_start, p.shard_start, p.length]
                for p in fu.shard_pieces(rank)
            ],
        }
        for fu in engine.layout.flat_units
    ]
    header = {
        "format": "pt",
        "hf_zero": json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "rank": rank,
                "world_size": ws,
                "layout_slice": layout_slice,
            }
        ),
    }
    params, optim, state_meta = {}, {}, {}
    opt = engine.optimizer
    for fu in engine.layout.flat_units:
        master = engine.sharded_optimizer.masters[fu.index]
        params[_flat_key(fu.index)] = _saved_slice(engine, fu, master).detach()
        for key, value in opt.state.get(master, {}).items():
            name = f"{_flat_key(fu.index)}.{key}"
            if isinstance(value, torch.Tensor) and value.shape == master.shape:
                optim[name] = _saved_slice(engine, fu, value).detach()
            elif isinstance(value, torch.Tensor):
                optim[name] = value.detach().clone()
            else:
                state_meta[name] = value
    if rank == 0:
        param_names = {
            n for fu in engine.layout.flat_units for p in fu.params for n in (p.name, *p.aliases)
        }
        for name, buf in engine.module.state_dict().items():
            if name not in param_names:
                params[f"buffer:{name}"] = buf.detach().cpu().contiguous()
    rng, rng_meta = _rng_tensors()
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


def _manifest(engine: ZeroEngine, files: dict[str, dict]) -> dict:
    opt = engine.optimizer
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
    for fu in engine.layout.flat_units:
        st = opt.state.get(engine.sharded_optimizer.masters[fu.index], {})
        if st:
            state_keys[_flat_key(fu.index)] = sorted(st)
    keys, converts = export_keys(engine.module)
    return {
        "format_version": FORMAT_VERSION,
        "stage": engine.stage,
        "world_size": engine.world_size,
        "mixed_precision": engine.config.mixed_precision,
        "step": engine.global_steps,
        "skipped_steps": engine.skipped_steps,
        "config": engine.config.to_dict(),
        "model_class": type(engine.module).__name__,
        "layout": layout_to_json(engine.layout, engine.param_dtypes),
        "optimizer": {
            "class": f"{type(opt).__module__}.{type(opt).__qualname__}",
            "param_groups": groups,
            "state_keys": state_keys,
        },
        "loss_scaler": engine.scaler.state_dict(),
        "hf_export": {
            "keys": keys,
            "dtypes": {k: engine.export_dtype(k) for k in keys},
            "weight_conversion": converts,
        },
        "files": files,
    }


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def save_checkpoint(engine: ZeroEngine, path: str | os.PathLike, *, tokenizer=None) -> Path:
    """Write a sharded checkpoint to `path` (collective; atomic). Returns the path."""
    path = Path(path)
    token = comm.all_gather_object(
        uuid.uuid4().hex[:12], group=engine.group, label="save_checkpoint"
    )[0]
    tmp = path.parent / f"{path.name}.tmp-{token}"
    error, files = None, {}
    try:
        (tmp / ZERO_DIR).mkdir(parents=True, exist_ok=True)
        files = _write_rank_files(engine, tmp / ZERO_DIR)
    except Exception as e:  # reported to every rank below, then raised
        error = f"{type(e).__name__}: {e}"
    reports = comm.all_gather_object((error, files), group=engine.group, label="save_checkpoint")
    failed = [(r, err) for r, (err, _) in enumerate(reports) if err]
    if not failed and engine.rank == 0:
        try:
            all_files = {k: v for _, f in reports for k, v in f.items()}
            config = getattr(engine.module, "config", None)
            if config is not None and hasattr(config, "save_pretrained"):
                config.save_pretrained(tmp)
            gen = getattr(engine.module, "generation_config", None)
            if gen is not None and hasattr(gen, "save_pretrained"):
                gen.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            manifest = json.dumps(_manifest(engine, all_files), indent=1)
            part = tmp / ZERO_DIR / (MANIFEST + ".part")
            part.write_text(manifest)
            os.replace(part, tmp / ZERO_DIR / MANIFEST)
            swap_into_place(tmp, path, token)
        except Exception as e:
            failed.append((0, f"{type(e).__name__}: {e}"))
    failed = comm.all_gather_object(failed, group=engine.group, label="save_checkpoint")[0]
    if failed:
        if engine.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        detail = "; ".join(f"rank {r}: {err}" for r, err in failed)
        raise CheckpointError(
            f"saving checkpoint {path} failed, previous checkpoint left as it was: {detail}"
        )
    return path


def _check_same_model(engine: ZeroEngine, manifest: dict, where: str) -> None:
    src = manifest["_layout"]
    have = {p.name: tuple(p.shape) for fu in src.flat_units for p in fu.params}
    want = {p.name: tuple(p.shape) for fu in engine.layout.flat_units for p in fu.params}
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
    want_cls = f"{type(engine.optimizer).__module__}.{type(engine.optimizer).__qualname__}"
    if manifest["optimizer"].get("class") != want_cls:
        raise CheckpointError(
            f"{where} was saved with optimizer {manifest['optimizer'].get('class')}, "
            f"this engine uses {want_cls}"
        )
    if len(manifest["optimizer"].get("param_groups", [])) != len(engine.optimizer.param_groups):
        raise CheckpointError(
            f"{where} has {len(manifest['optimizer']['param_groups'])} optimizer param groups, "
            f"this optimizer has {len(engine.optimizer.param_groups)}"
        )


class _Files:
    """Source files opened on demand, each checked against the manifest first."""

    def __init__(self, ckpt: Path, manifest: dict):
        self.ckpt, self.manifest, self._open = ckpt, manifest, {}

    def get(self, kind: str, rank: int):
        name = shard_file(kind, rank, self.manifest["world_size"])
        if name not in self._open:
            path = verify_file(self.ckpt, self.manifest, name)
            self._open[name] = safe_open(str(path), "pt")
        return self._open[name]

    def read(self, kind: str, rank: int, key: str, start: int, length: int) -> torch.Tensor:
        f = self.get(kind, rank)
        name = shard_file(kind, rank, self.manifest["world_size"])
        if key not in f.keys():
            raise CheckpointError(f"{self.ckpt / ZERO_DIR / name}: tensor {key!r} is missing")
        sl = f.get_slice(key)
        if start + length > sl.get_shape()[0]:
            raise CheckpointError(
                f"{self.ckpt / ZERO_DIR / name}: tensor {key!r} is shorter than its layout"
            )
        return sl[start : start + length]


@torch.no_grad()
def load_checkpoint(engine: ZeroEngine, path: str | os.PathLike) -> dict:
    """Load `path` into `engine` (collective), resharding when world size or stage differ.
    Returns the manifest."""
    ckpt = Path(path)
    manifest = read_manifest(ckpt)
    where = str(ckpt)
    _check_same_model(engine, manifest, where)
    src = manifest["_layout"]
    files = _Files(ckpt, manifest)
    state_keys = manifest["optimizer"].get("state_keys", {})
    opt = engine.optimizer
    plans = {fu.index: plan_reads(src, fu, *engine.owned(fu)) for fu in engine.layout.flat_units}
    # Check every file this rank will read before changing anything: a bad file leaves the
    # engine as it was.
    ranks = sorted({0} | {rd.src_rank for reads in plans.values() for rd in reads})
    for r in ranks:
        files.get("params", r)
        if state_keys:
            files.get("optim", r)
    for fu in engine.layout.flat_units:
        master = engine.sharded_optimizer.masters[fu.index]
        reads = plans[fu.index]
        master.zero_()
        for rd in reads:
            chunk = files.read(
                "params", rd.src_rank, _flat_key(rd.src_flat), rd.src_start, rd.length
            )
            master[rd.dst_start : rd.dst_start + rd.length].copy_(chunk)
        if not fu.trainable:
            continue
        keys = state_keys.get(_flat_key(reads[0].src_flat), []) if reads else []
        state = {}
        for key in keys:
            first = files.get("optim", reads[0].src_rank)
            probe = f"{_flat_key(reads[0].src_flat)}.{key}"
            if probe in first.keys() and first.get_slice(probe).get_shape() == []:
                state[key] = first.get_tensor(probe).to(master.device)
                continue
            value = torch.zeros_like(master)
            for rd in reads:
                chunk = files.read(
                    "optim", rd.src_rank, f"{_flat_key(rd.src_flat)}.{key}", rd.src_start, rd.length
                )
                value[rd.dst_start : rd.dst_start + rd.length].copy_(chunk)
            state[key] = value
        if state:
            opt.state[master] = state
        else:
            opt.state.pop(master, None)
    for g, saved in zip(opt.param_groups, manifest["optimizer"]["param_groups"]):
        for k, v in saved.items():
            if k in g and k != "params":
                g[k] = tuple(v) if isinstance(g[k], tuple) else v
    params0 = files.get("params", 0)  # buffers are small and saved once, by rank 0
    for name, buf in engine.module.named_buffers():
        key = f"buffer:{name}"
        if key in params0.keys():
            buf.copy_(params0.get_tensor(key))
    engine.load_state_after_checkpoint(manifest)
    if manifest["world_size"] == engine.world_size:  # per-rank streams only mean the same then
        rng = shard_file("rng", engine.rank, manifest["world_size"])
        if rng in manifest["files"]:
            _restore_rng(verify_file(ckpt, manifest, rng))
    comm.barrier(group=engine.group, label="load_checkpoint")
    return manifest


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
