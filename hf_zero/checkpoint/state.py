"""What a checkpoint reads from and restores into one rank: the seam between engine and files.

The engine builds a `RankState` (`ZeroEngine._checkpoint_state()`); the checkpoint package reads
and writes through it and never imports the engine. It names the rank's place in the layout, the
fp32 master slices it owns, the optimizer stepping them, the model (for its config, buffers and
HF export names), the dtypes an export writes, and the counters a resume restores. After a load
has written the masters, the optimizer state and the buffers, it hands the saved counters to
`restore`, the engine's own callback, which publishes the parameters and sets its counters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..comm import ProcessGroupInfo
from ..partition import FlatUnit, Layout

__all__ = ["Counters", "RankState"]


@dataclass(frozen=True)
class Counters:
    """The training counters a checkpoint carries."""

    step: int
    """Optimizer steps applied."""

    skipped_steps: int = 0
    """Optimizer steps skipped (fp16 overflow; non-finite gradients with
    `nonfinite_grads="skip"`)."""

    loss_scaler: Mapping[str, Any] = field(default_factory=dict)
    """The dynamic loss scaler's state ({} without one)."""


@dataclass(frozen=True)
class RankState:
    """One rank's view of the engine, as a checkpoint sees it."""

    layout: Layout
    rank: int
    world_size: int
    stage: int
    mixed_precision: str
    config: Mapping[str, Any]
    """`ZeroConfig.to_dict()`: recorded in the manifest."""

    owned: Mapping[int, tuple[int, int]]
    """Flat unit index -> [lo, hi), the flat range this rank's master covers (the whole padded
    flat unit at stage 0, the rank's shard otherwise)."""

    masters: Mapping[int, torch.Tensor]
    """Flat unit index -> fp32 1D master over `owned[index]`; the optimizer's parameters."""

    optimizer: torch.optim.Optimizer
    module: nn.Module
    param_dtypes: Mapping[str, str]
    """Parameter name -> the dtype the model had it in ("float32", "bfloat16", ...)."""

    counters: Counters
    dynamic_loss_scale: bool
    """Whether the engine has a dynamic loss scaler (fp16): its state is saved and restored."""

    group: ProcessGroupInfo
    """The group the checkpoint's control collectives run on."""

    restore: Callable[[Counters], None]
    """Called once a load has written the masters, the optimizer state and the buffers."""

    def saved_slice(self, fu: FlatUnit, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's saved part [r*S, (r+1)*S) of a flat-shaped tensor held over `owned`
        (whatever the stage, rank r of N saves the slice it would own at stage 1)."""
        lo, _ = self.owned[fu.index]
        s_lo, s_hi = fu.shard_range(self.rank)
        return tensor[s_lo - lo : s_hi - lo]
