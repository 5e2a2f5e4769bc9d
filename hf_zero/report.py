"""What an engine reports about its state: the full weights gathered from the master shards,
and the model-state bytes a rank holds.

Phases of `gather_full_state_dict` (collective):
  1. per flat unit, all-gather every rank's fp32 master slice into the full flat buffer (a
     master that already covers the whole buffer, stage 0, is used as it is);
  2. cut each parameter out of it (tied names share one tensor), cast if asked;
  3. on the ranks that keep the result, the model's state dict with those tensors in place of
     its parameters, everything else (buffers, parameters kept whole) copied as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import comm
from .partition import Layout

__all__ = ["gather_full_state_dict", "held_bytes"]


@torch.no_grad()
def gather_full_state_dict(
    layout: Layout,
    masters: Mapping[int, torch.Tensor],
    module: nn.Module,
    *,
    group: comm.ProcessGroupInfo,
    stats: comm.CommStats,
    dtype: torch.dtype | None,
    keep: bool,
) -> dict[str, torch.Tensor]:
    """The full state dict of `module` with its flat parameters from `masters` (flat index ->
    fp32 1D slice this rank owns); {} where `keep` is False. Collective."""
    full_of: dict[str, torch.Tensor] = {}
    for fu in layout.flat_units:
        master = masters[fu.index]
        if master.numel() == fu.padded_numel:
            full = master
        else:
            full = torch.empty(fu.padded_numel, dtype=master.dtype, device=master.device)
            comm.all_gather(
                full, master, group=group, stats=stats, label="all-gather for full_state_dict"
            )
        for spec in fu.params:
            t = full[spec.offset : spec.offset + spec.numel].view(spec.shape).clone()
            t = t.to(dtype) if dtype is not None else t
            for name in (spec.name, *spec.aliases):
                full_of[name] = t
    if not keep:
        return {}
    out = {}
    for key, value in module.state_dict(keep_vars=True).items():
        out[key] = full_of[key] if key in full_of else value.detach().clone()
    return out


def held_bytes(
    *,
    params: Iterable[torch.Tensor | None],
    grads: Iterable[torch.Tensor | None],
    optim: Iterable[torch.Tensor | None],
) -> dict[str, int]:
    """Bytes of the storages behind each kind of tensor, each storage counted once (in the
    first kind that holds it), freed (0-byte) storages not at all."""
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    param, grad, opt = count(params), count(grads), count(optim)
    return {
        "param_bytes": param,
        "grad_bytes": grad,
        "optim_bytes": opt,
        "total_bytes": param + grad + opt,
    }
