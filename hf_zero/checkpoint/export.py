"""The one way from a live engine to a standard HF model folder: save, then consolidate.

A live export (the Trainer's `save_model`, Accelerate's `save_model`, a script's final folder)
and `hf-zero consolidate` of a checkpoint of the same step write the same bytes, because they are
the same code: `export_model` writes a sharded checkpoint (or uses one of this very step) and
hands it to `consolidate`. Collective, phases:

  1. Every rank: refuse, before anything is written, what every rank can tell alike: a model
     whose save_pretrained converts values (`naming.export_keys`), a bad dtype or shard size.
  2. Rank 0 checks the output folder (`destination.check_export_destination`) and, when
     `checkpoint=` names one, that it is a checkpoint of this step and layout; every rank then
     reads its own params file in it and compares it with its master slices, element for
     element. All ranks learn every outcome; a refusal is raised on every rank.
  3. Without `checkpoint=`: every rank saves a temporary checkpoint next to the output
     (`<out>.tmp-<token>-checkpoint`, removed afterwards, whatever happens).
  4. Rank 0 consolidates it into the output (model card last, then the final rename); the
     other ranks wait for its outcome, within the collective timeout. A failure is raised on
     every rank, naming rank 0's error.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from .. import comm
from ..card import CardInfo
from .adapter import export_peft, is_peft_model
from .consolidate import _resolve_dtype, parse_size, write_export
from .destination import check_export_destination
from .errors import CheckpointError
from .format import flat_key, shard_file
from .naming import ExportNames, export_keys
from .reader import CheckpointReader
from .sharded import save_checkpoint
from .state import RankState

__all__ = ["export_model", "export_keys", "ExportNames"]

_LABEL = "export"


def _check_checkpoint(state: RankState, ckpt: Path) -> str | None:
    """Rank 0: whether `ckpt` is a checkpoint of this engine's step and layout (None) or why
    not."""
    try:
        with CheckpointReader(ckpt) as reader:
            m = reader.manifest
    except Exception as e:  # reported to every rank
        return f"{type(e).__name__}: {e}"
    step = state.counters.step
    if m.step != step:
        return (
            f"checkpoint {ckpt} is of step {m.step}, this engine is at step {step}: pass a "
            "checkpoint saved at this step, or checkpoint=None to write a temporary one"
        )
    if m.world_size != state.world_size or m.layout != state.layout:
        return (
            f"checkpoint {ckpt} was saved with another layout (world size {m.world_size}, "
            f"stage {m.stage}; this engine: world size {state.world_size}, stage "
            f"{state.stage}): pass a checkpoint this engine saved, or checkpoint=None"
        )
    return None


@torch.no_grad()
def _same_weights(state: RankState, ckpt: Path) -> str | None:
    """Every rank: whether its params file in `ckpt` holds exactly its master slices."""
    name = shard_file("params", state.rank, state.world_size)
    try:
        with CheckpointReader(ckpt) as reader:
            f, keys = reader.shard("params", state.rank)
            for fu in state.layout.flat_units:
                key = flat_key(fu.index)
                mine = state.saved_slice(fu, state.masters[fu.index]).detach().cpu()
                if key not in keys or not torch.equal(f.get_tensor(key), mine):
                    return (
                        f"checkpoint {ckpt}: {name} holds other weights than this engine's at "
                        f"step {state.counters.step} (flat unit {fu.index}): pass the checkpoint "
                        "saved at this step, or checkpoint=None"
                    )
    except Exception as e:  # reported to every rank
        return f"{type(e).__name__}: {e}"
    return None


def _agree(state: RankState, mine: str | None, what: str) -> None:
    """Raise on every rank when any rank's `mine` is an error."""
    reports = comm.all_gather_object(mine, group=state.group, label=_LABEL)
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        raise CheckpointError(f"{what}: {detail}")


def export_model(
    state: RankState,
    output_dir: str | os.PathLike,
    *,
    tokenizer=None,
    dtype: str | torch.dtype | None = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    card: CardInfo | None = None,
    checkpoint: str | os.PathLike | None = None,
    merge_adapters: bool = False,
) -> Path:
    """Export the engine's current weights as the folder `save_pretrained` writes (collective).

    A PEFT model writes its adapter only, as `PeftModel.save_pretrained` does, or with
    `merge_adapters` the adapters merged into the base as a standard HF folder
    (`adapter.export_peft`; `card` and `checkpoint` do not apply).

    Args:
        state: this rank's view of the engine.
        output_dir: the folder to write (as `consolidate`'s `output_dir`).
        tokenizer: saved into the export.
        dtype: as `consolidate`'s; "auto" (default) writes each tensor in the model's own dtype.
        max_shard_size: as `consolidate`'s.
        overwrite: as `consolidate`'s: replaces only an earlier export or an empty folder.
        card: what the model card (README.md) says beyond the training setup.
        checkpoint: an existing checkpoint of this very step, saved by this engine (same world
            size and layout), to consolidate instead of writing a temporary one; it is verified
            (step, layout, and every rank's weights element for element).

    Returns:
        The output folder.

    Raises:
        CheckpointError: the model's save_pretrained converts values (on every rank, before
            anything is written); `checkpoint` is not one of this step and layout; writing the
            temporary checkpoint or consolidating failed (on every rank, naming the error).
        ValueError: bad `dtype` or `max_shard_size`.
    """
    out = Path(output_dir)
    _resolve_dtype(dtype)
    parse_size(max_shard_size)
    if is_peft_model(state.module):
        return export_peft(
            state,
            out,
            merge_adapters=merge_adapters,
            tokenizer=tokenizer,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
        )
    if merge_adapters:
        raise ValueError(
            f"merge_adapters=True needs a PEFT model (peft.PeftModel), got "
            f"{type(state.module).__name__}: it has no adapters to merge"
        )
    names = export_keys(state.module)
    if names.conversion is not None:
        raise CheckpointError(
            f"cannot export {type(state.module).__name__} to {out}: it converts its weights "
            f"when saved: {names.conversion}. The hf_zero export copies tensors and follows "
            "renames only; save the model's full_state_dict() with save_pretrained instead"
        )
    given = Path(checkpoint) if checkpoint is not None else None
    token = uuid.uuid4().hex[:12]
    ckpt = given or out.parent / f"{out.name}.tmp-{token}-checkpoint"
    refusal = None
    if state.rank == 0:
        try:
            check_export_destination(out, ckpt, overwrite=overwrite)
            if given is not None:
                refusal = _check_checkpoint(state, given)
        except Exception as e:  # OSError, ValueError: refused on every rank
            refusal = f"{type(e).__name__}: {e}"
    token, refusal = comm.all_gather_object((token, refusal), group=state.group, label=_LABEL)[0]
    if refusal is not None:
        raise CheckpointError(f"exporting to {out} refused: {refusal}")
    if given is not None:
        _agree(state, _same_weights(state, given), f"exporting to {out} refused")
    else:
        ckpt = out.parent / f"{out.name}.tmp-{token}-checkpoint"
    if given is None:  # raises on every rank if any failed, leaving nothing behind
        save_checkpoint(state, ckpt, tokenizer=tokenizer)
    error = None
    if state.rank == 0:
        try:
            write_export(
                ckpt,
                out,
                dtype=dtype,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                progress=False,
                card=card,
                tokenizer=tokenizer if given is not None else None,
            )
        except Exception as e:  # raised on every rank below
            error = f"{type(e).__name__}: {e}"
        finally:  # before the other ranks return: gone when export returns anywhere
            if given is None:
                shutil.rmtree(ckpt, ignore_errors=True)
    _agree(state, error, f"exporting to {out} failed")
    return out
