"""The sharded optimizer: fp32 master slices and the user's optimizer rebuilt over them.

Each rank owns, per flat unit, the slice [lo, hi) of the flat buffer it updates (the whole buffer
at stage 0, its 1/N shard at stages 1-3). The master is fp32: in fp32 training it IS the
parameter slice (a view, no second copy); in bf16/fp16 it is a separate fp32 copy.

The user's optimizer object is kept (so an LR scheduler built on it keeps working) and rebuilt in
place: each param group keeps its hyperparameters and gets, as params, the masters of the flat
units of that group; its state starts empty. Because a master is a flat 1D slice of many
parameters, only elementwise optimizers are correct on it; any other class is refused.

One optimizer step, given the reduced gradient slices (sums over ranks, loss-scaled):
  1. master.grad = slice * 1 / (world_size * loss_scale), in fp32;
  2. global L2 norm: local sum of squares, all-reduced when the slices are shards (each element
     is owned by exactly one rank; padding holds zeros), so each parameter counts once;
  3. non-finite norm with a dynamic loss scaler: every rank skips (the norm is the same on all);
  4. clip by max_norm / (norm + 1e-6), as torch.nn.utils.clip_grad_norm_;
  5. optimizer.step() on the masters; copy masters into the compute slices when they differ.

Kernel choice: a master is one long 1D tensor, where torch's default CPU implementation (a
for-loop of whole-tensor ops, each one a pass over memory with fresh temporaries) is at its
slowest, and torch's fused kernel (one pass, no temporaries) several times faster (README,
Performance). So for the classes that have a fused kernel
(FUSED_CLASSES) on the masters' device, a param group that left both `fused` and `foreach` at
their default None is stepped with `fused=True`: the same update, to fp32 rounding. A group
that set either explicitly keeps its choice, and so does one with `differentiable=True`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from . import comm
from .partition import FlatUnit, Layout, ParamSpec

__all__ = ["ELEMENTWISE_OPTIMIZERS", "check_optimizer", "ShardedOptimizer"]

ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
)


# Elements per partial norm of a flat gradient (see ShardedOptimizer._local_square_sum): 2^16
# keeps the fp32 error of each part near 1e-7 at the speed of one whole-tensor norm.
NORM_CHUNK = 1 << 16

# Elementwise optimizers with a fused kernel that hf_zero picks by default (see the module note).
FUSED_CLASSES: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.Adagrad,
)
# Param-group keys that choose an implementation, not the update: a checkpoint's values for
# them are not applied on load (the engine that loads keeps its own).
IMPLEMENTATION_KEYS = ("foreach", "fused")


def choose_fused(optimizer: torch.optim.Optimizer, device: torch.device) -> list[bool]:
    """Set `fused=True` on the param groups that leave the kernel to torch (both `fused` and
    `foreach` None) when the class has a fused kernel on `device`. Returns, per group, whether
    it is now fused."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = type(optimizer) in FUSED_CLASSES and (
        device.type in _get_fused_kernels_supported_devices()
    )
    out = []
    for g in optimizer.param_groups:
        if (
            supported
            and "fused" in g
            and g["fused"] is None
            and g.get("foreach") is None
            and not g.get("differentiable", False)
        ):
            g["fused"] = True
        out.append(bool(g.get("fused")))
    return out


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers that cannot run on flat 1D shards, or that already carry state.

    Raises:
        TypeError: not a torch.optim.Optimizer, or not an elementwise optimizer.
        ValueError: the optimizer already has state.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if type(optimizer) not in ELEMENTWISE_OPTIMIZERS:
        names = ", ".join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)
        raise TypeError(
            f"{type(optimizer).__module__}.{type(optimizer).__name__} is not a supported "
            "optimizer: hf_zero steps flat 1D shards that mix many parameters, so the update must "
            f"be elementwise (no per-matrix factoring or shape-dependent math). Supported: {names}"
        )
    # Adagrad fills its state in __init__ (step 0, initial sums); only a taken step counts.
    if any(len(s) and float(s.get("step", 1)) > 0 for s in optimizer.state.values()):
        raise ValueError(
            "the optimizer already has state (it has stepped or loaded a state dict); pass a fresh "
            "optimizer to initialize and restore state with engine.load_checkpoint"
        )


class ShardedOptimizer:
    """fp32 masters for this rank's slices, and the user's optimizer stepping them."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        layout: Layout,
        *,
        owned: Callable[[FlatUnit], tuple[int, int]],
        sharded: bool,
        group: comm.ProcessGroupInfo,
        stats: comm.CommStats,
    ):
        self.optimizer, self.layout, self._owned = optimizer, layout, owned
        self.sharded, self.group, self.stats = sharded, group, stats
        self.masters: dict[int, torch.Tensor] = {}  # flat index -> fp32 1D slice [lo, hi)

    def adopt(self, fu: FlatUnit, full32: torch.Tensor, local: torch.Tensor) -> None:
        """Create the master of `fu` from its fp32 values; alias `local` when it is fp32."""
        if local.dtype == torch.float32:
            self.masters[fu.index] = local
        else:
            lo, hi = self._owned(fu)
            self.masters[fu.index] = full32[lo:hi].clone()

    def rebuild(self) -> None:
        """Point the user's param groups at the masters; drop any per-parameter state."""
        for gi, g in enumerate(self.optimizer.param_groups):
            g["params"] = [
                self.masters[fu.index] for fu in self.layout.flat_units if fu.group == gi
            ]
        self.optimizer.state = defaultdict(dict)
        if self.masters:
            choose_fused(self.optimizer, next(iter(self.masters.values())).device)

    def trainable(self) -> list[FlatUnit]:
        return [fu for fu in self.layout.flat_units if fu.trainable]

    def set_grads(self, local_grads: dict[int, torch.Tensor], inv_scale: float) -> None:
        """Phase 1: master.grad = reduced slice / (world_size * loss_scale), fp32."""
        for index, g in local_grads.items():
            if g.dtype == torch.float32:
                self.masters[index].grad = g.mul_(inv_scale)
            else:
                self.masters[index].grad = g.float().mul_(inv_scale)

    def grad_norm(self, got_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 2: the global L2 norm of the master grads (0-dim fp32, the same on all ranks),
        and which trainable parameters got a gradient on any rank (bool, `trainable_specs`
        order) from this rank's flags (`got_grad`, 0/1). One small all-reduce carries both."""
        sq = self._local_square_sum().float()  # each rank's part is exact to fp32 here
        packed = torch.cat(
            [(sq if self.sharded else torch.zeros_like(sq)).view(1), got_grad.to(sq)]
        )
        comm.all_reduce_scalar(
            packed,
            group=self.group,
            stats=self.stats,
            op="sum",
            label="grad-norm all-reduce (optimizer step)",
        )
        total_sq = packed[0] if self.sharded else sq
        return total_sq.sqrt(), packed[1:] > 0

    def norm(self) -> torch.Tensor:
        """The global L2 norm of the master grads as they are now (0-dim fp32, the same on all
        ranks): after a clip, the clipped norm. One small all-reduce where they are shards."""
        sq = self._local_square_sum().float().view(1)
        if self.sharded:
            comm.all_reduce_scalar(
                sq,
                group=self.group,
                stats=self.stats,
                op="sum",
                label="grad-norm all-reduce of the clipped gradients (optimizer step)",
            )
        return sq[0].sqrt()

    def _local_square_sum(self) -> torch.Tensor:
        """Sum of squares of this rank's master grads, 0-dim fp64. Each flat grad is normed in
        chunks of NORM_CHUNK elements and the chunks' squares are summed in fp64: one fp32 norm
        over a whole flat unit (tens of millions of elements) accumulates a relative error of
        1e-3 or more on CPU, which would make the norm, and every clip, depend on the layout."""
        grads = [m.grad for m in self.masters.values() if m.grad is not None]
        device = next(iter(self.masters.values())).device
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        chunks = [c for g in grads for c in g.split(NORM_CHUNK)]
        return torch.stack(torch._foreach_norm(chunks, 2.0)).double().square().sum()

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        """Phase 4: scale grads so the global norm is at most max_norm."""
        grads = [m.grad for m in self.masters.values() if m.grad is not None]
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef)

    def trainable_specs(self) -> list[tuple[FlatUnit, ParamSpec]]:
        return [(fu, spec) for fu in self.trainable() for spec in fu.params]

    def step(self, untouched: list[tuple[FlatUnit, ParamSpec]]) -> None:
        """Phase 5: update the masters, leaving the `untouched` parameters (no gradient on any
        rank this step) exactly as they were, weights and optimizer state, as torch does for a
        parameter whose .grad is None. (Their zero gradient would still move them through weight
        decay and momentum.)"""
        saved = []
        for fu, spec in untouched:
            lo, hi = self._owned(fu)
            a, b = max(lo, spec.offset), min(hi, spec.offset + spec.numel)
            if a >= b:
                continue
            master = self.masters[fu.index]
            piece = slice(a - lo, b - lo)
            # State created by this very step starts at its initial value, which a zero
            # gradient leaves there; state that exists already is restored.
            state = self.optimizer.state.get(master, {})
            tensors = [master] + [
                v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == master.shape
            ]
            saved.extend((t, piece, t[piece].clone()) for t in tensors)
        self.optimizer.step()
        for t, piece, value in saved:
            t[piece].copy_(value)

    def clear_grads(self) -> None:
        for m in self.masters.values():
            m.grad = None

    def held_tensors(self) -> list[torch.Tensor]:
        out = list(self.masters.values())
        for state in self.optimizer.state.values():
            out.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return out
