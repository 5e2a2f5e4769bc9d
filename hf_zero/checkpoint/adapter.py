"""Exporting a PEFT model: its adapter only, as `PeftModel.save_pretrained` writes it, or the
adapters merged into the base, as a standard HF folder.

A live engine's parameters are flat views (and at stage 3 mostly empty), so the PEFT model is
not saved in place. Collective, phases:
  1. Every rank: all-gather the full state dict from the fp32 masters (frozen base included,
     bit-exact) onto rank 0 (`report.gather_full_state_dict`).
  2. Rank 0 checks the output folder (`destination.check_export_destination`), rebuilds the
     same PEFT model on the meta device, gives it the gathered tensors (in the model's own
     dtypes, or `dtype`), and writes into a temporary folder next to the output:
     - adapter only (default): `PeftModel.save_pretrained`: adapter_config.json and
       adapter_model.safetensors, the keys peft itself writes (`get_peft_model_state_dict`),
       loadable with `PeftModel.from_pretrained(base, folder)`;
     - `merge_adapters=True`: `merge_and_unload()` then the base model's `save_pretrained`: a
       full standard folder that plain `from_pretrained` loads, with no peft installed;
     then the tokenizer, then the folder is moved into place (`destination.swap_into_place`).
  3. Rank 0's outcome is shared: a failure is raised on every rank, naming the error.
Rank 0 holds one full copy of the model in memory for the merged export (the adapter export
keeps only the adapter tensors beyond the gathered state dict).
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from .. import comm
from ..report import gather_full_state_dict
from .destination import check_export_destination, swap_into_place
from .errors import CheckpointError
from .frozen import is_peft_model
from .state import RankState

__all__ = ["export_peft", "is_peft_model"]

_LABEL = "adapter export"


def _rebuild(module: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU copy of the PEFT model `module` holding the tensors of `full` (its state dict)."""
    from peft import get_peft_model

    adapters = list(module.peft_config)
    if len(adapters) != 1:
        raise CheckpointError(
            f"exporting a PEFT model with {len(adapters)} adapters ({', '.join(adapters)}) is "
            "not supported: delete all but one (model.delete_adapter(name)) before training"
        )
    (name,) = adapters
    base = module.get_base_model()
    with torch.device("meta"):
        clone_base = type(base)(copy.deepcopy(base.config))
        clone = get_peft_model(clone_base, copy.deepcopy(module.peft_config[name]), name)
    clone.to_empty(device="cpu")  # non-persistent buffers stay unset: no export writes them
    clone.load_state_dict(full, strict=True, assign=True)
    return clone


def export_peft(
    state: RankState,
    output_dir: str | os.PathLike,
    *,
    merge_adapters: bool = False,
    tokenizer=None,
    dtype: str | torch.dtype | None = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write the adapter of the PEFT model `state.module` (or, `merge_adapters`, the merged
    model) to `output_dir`. Collective. Returns the folder.

    Raises:
        CheckpointError: the output folder is refused, the model has several adapters, or
            writing failed (on every rank, naming rank 0's error).
    """
    from .consolidate import _resolve_dtype

    out = Path(output_dir)
    cast = _resolve_dtype(dtype)
    full = gather_full_state_dict(
        state.layout,
        state.masters,
        state.module,
        group=state.group,
        stats=comm.CommStats(),
        dtype=None,
        keep=state.rank == 0,
    )
    error = None
    if state.rank == 0:
        token = uuid.uuid4().hex[:12]
        tmp = out.parent / f"{out.name}.tmp-{token}"
        try:
            check_export_destination(out, tmp, overwrite=overwrite)
            done: dict[int, torch.Tensor] = {}  # tied names keep sharing one tensor
            for key, t in full.items():
                want = cast if isinstance(cast, torch.dtype) else None
                if want is None and key in state.param_dtypes:
                    want = getattr(torch, state.param_dtypes[key])
                if want is not None and t.is_floating_point():
                    full[key] = done.setdefault(id(t), t.to(want))
            clone = _rebuild(state.module, full)
            if merge_adapters:
                clone.merge_and_unload().save_pretrained(tmp, max_shard_size=max_shard_size)
            else:
                clone.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            swap_into_place(tmp, out, token)
        except Exception as e:  # raised on every rank below
            error = f"{type(e).__name__}: {e}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    errors = comm.all_gather_object(error, group=state.group, label=_LABEL)
    if errors[0] is not None:
        raise CheckpointError(f"exporting the PEFT model to {out} failed: rank 0: {errors[0]}")
    return out
