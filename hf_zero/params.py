"""Where the compute parameters live: replicated flat buffers (stages 0-2) or shards (stage 3).

Both stores keep the model's own `nn.Parameter` objects (so tied weights, `named_parameters`,
`num_parameters` and `generate` see what they expect) and point their `.data` at views of one
flat buffer per flat unit, in the compute dtype. The optimizer steps fp32 master shards and
writes the result back through `local()` / `publish()`.

`ReplicatedParams` (stages 0-2): every rank holds every flat buffer in full.
  After the optimizer step (sharded optimizer, stages 1-2), phase 1: each rank's updated slice
  is all-gathered into the full buffer. Deferred (`ZeroConfig.overlap_param_gather`), the
  gathers stay in flight: a forward pre-hook on each unit's module waits for the flat units
  holding that unit's parameters (the model's own for the root unit, whose parameters any
  module may use), and a state-dict pre-hook on every module waits for all of them.

`ShardedParams` (stage 3): each rank holds only its slice of each flat buffer (`shard`). The full
buffer keeps its shape but its storage is resized to 0 bytes while SHARDED; the parameters stay
views into it, so their shapes and counts stay true. Per unit, with hooks on the model's own
modules (so calling `engine.module` directly, `generate` included, works):
  1. forward pre-hook: all-gather the unit (or wait for its prefetch); start the all-gather of
     the next unit in the recorded forward order (prefetch);
  2. forward post-hook: release the unit; if its outputs need grad, hook them so that
  3. pre-backward (the first gradient reaching an output): gather the unit again, walking the
     backward sequence that is the same on every rank (`schedule.GatherSequence`), and prefetch the
     next unit of that sequence;
  4. post-backward: release once every trainable parameter of the unit has its gradient (the
     gradient store calls `on_unit_grads_done`), or at the end of backward.
The root unit (everything outside unit modules) uses the model's own forward hooks.
Gathered buffers come from a `bufpool.GatherPool` (the memory of a released unit goes to the next
gathered unit of its size, across steps), so steady-state training allocates no new pages.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import comm
from .bufpool import GatherPool
from .partition import ROOT_UNIT, FlatUnit, Layout
from .schedule import GatherSequence

__all__ = ["flatten_fp32", "ReplicatedParams", "ShardedParams", "UnitState"]


def flatten_fp32(
    fu: FlatUnit, params: dict[str, nn.Parameter], device: torch.device
) -> torch.Tensor:
    """The flat unit's parameters as one fp32 buffer, 1D, padded to a multiple of world_size."""
    flat = torch.zeros(fu.padded_numel, dtype=torch.float32, device=device)
    for spec in fu.params:
        flat[spec.offset : spec.offset + spec.numel].copy_(params[spec.name].detach().reshape(-1))
    return flat


def _point_params_at(fu: FlatUnit, params: dict[str, nn.Parameter], flat: torch.Tensor) -> None:
    for spec in fu.params:
        params[spec.name].data = flat[spec.offset : spec.offset + spec.numel].view(spec.shape)


class ReplicatedParams:
    """Stages 0-2: full flat parameter buffers on every rank."""

    sharded = False

    def __init__(
        self,
        layout: Layout,
        params: dict[str, nn.Parameter],
        *,
        dtype: torch.dtype,
        owned: Callable[[FlatUnit], tuple[int, int]],
        gather_after_step: bool,
        group: comm.ProcessGroupInfo,
        stats: comm.CommStats,
        unit_modules: dict[str, nn.Module] | None = None,
        defer_gather: bool = False,
    ):
        """`defer_gather` (stages 1-2, `StagePlan.defer_param_gather`): `publish(defer=True)`
        leaves the gathers in flight for the hooks on `unit_modules` to wait on."""
        self.layout, self.params, self.dtype, self.group, self.stats = (
            layout,
            params,
            dtype,
            group,
            stats,
        )
        self._owned = owned
        self.gather_after_step = gather_after_step
        self.flats: list[torch.Tensor] = []
        self._deferred: dict[int, comm.Pending] = {}  # flat index -> its gather in flight
        self._hooks = []
        if defer_gather:
            flats_of: dict[str, list[int]] = {}
            for fu in layout.flat_units:
                for unit in fu.units:
                    flats_of.setdefault(unit, []).append(fu.index)
            for unit, module in unit_modules.items():
                if unit in flats_of:
                    self._hooks.append(
                        module.register_forward_pre_hook(self._make_wait(flats_of[unit]))
                    )
            wait_all = lambda *_: self.wait_published()  # noqa: E731
            for module in unit_modules[ROOT_UNIT].modules():
                self._hooks.append(module.register_state_dict_pre_hook(wait_all))
                self._hooks.append(module.register_load_state_dict_pre_hook(wait_all))

    def adopt(self, fu: FlatUnit, full32: torch.Tensor) -> None:
        """Take over flat unit `fu` from its fp32 values (kept as the buffer itself in fp32)."""
        flat = full32 if self.dtype == torch.float32 else full32.to(self.dtype)
        _point_params_at(fu, self.params, flat)
        self.flats.append(flat)

    def local(self, fu: FlatUnit) -> torch.Tensor:
        """The part of the flat buffer this rank's optimizer updates."""
        lo, hi = self._owned(fu)
        return self.flats[fu.index][lo:hi]

    def publish(self, fus: list[FlatUnit], *, defer: bool = False) -> None:
        """After the optimizer step: all-gather every rank's updated slice into the full buffer
        (`gather_after_step`: the optimizer is sharded; else every rank updated all of it).
        `defer`: return with the gathers in flight (launched in layout order, the root's
        first); the hooks, or `wait_published()`, wait for them."""
        if not self.gather_after_step:
            return
        self.wait_published()
        for fu in fus:
            lo, hi = self._owned(fu)
            flat = self.flats[fu.index]
            self._deferred[fu.index] = comm.all_gather(
                flat,
                flat[lo:hi],
                group=self.group,
                stats=self.stats,
                async_op=True,
                label="all-gather of the updated parameters after the optimizer step",
            )
        if not defer:
            self.wait_published()

    def wait_published(self) -> None:
        """Wait for every gather `publish(defer=True)` left in flight, in launch order."""
        while self._deferred:
            self._deferred.pop(next(iter(self._deferred))).wait()

    def _make_wait(self, indices: list[int]):
        def hook(module, args):
            for i in indices:
                pending = self._deferred.pop(i, None)
                if pending is not None:
                    pending.wait()

        return hook

    def held_tensors(self) -> list[torch.Tensor]:
        return list(self.flats)

    def pooled_bytes(self) -> int:
        return 0


class UnitState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"
    GATHERED = "gathered"


class ShardedParams:
    """Stage 3: each rank holds 1/N of every flat unit; units are gathered around their use."""

    sharded = True
    quantize: int | None = None
    """Block size of the int8 parameter all-gather (set by the engine); None: exact."""

    def __init__(
        self,
        layout: Layout,
        params: dict[str, nn.Parameter],
        *,
        dtype: torch.dtype,
        unit_modules: dict[str, nn.Module],
        group: comm.ProcessGroupInfo,
        stats: comm.CommStats,
        prefetch: bool,
        on_backward_start: Callable[[], None],
    ):
        self.layout, self.params, self.dtype, self.group, self.stats = (
            layout,
            params,
            dtype,
            group,
            stats,
        )
        self.prefetch = prefetch
        self._on_backward_start = on_backward_start
        self.shards: list[torch.Tensor] = []  # 1D, shard_numel each, compute dtype
        self.fulls: list[torch.Tensor] = []  # 1D, padded_numel; storage 0 bytes while SHARDED
        self.unit_flats: dict[str, list[int]] = {u: [] for u in unit_modules}
        self.state = {u: UnitState.SHARDED for u in unit_modules}
        self._pending: dict[str, list[comm.Pending]] = {}
        self._sequence = GatherSequence(ROOT_UNIT, prefetch=prefetch)
        # Units of one size alive at once: the one in use, the prefetched next one, and (in
        # backward) the previous one until its gradients are reduced.
        self.pool = GatherPool(capacity=3 if prefetch else 2)
        self._hooks = []
        for unit, module in unit_modules.items():
            self._hooks.append(module.register_forward_pre_hook(self._make_pre_forward(unit)))
            self._hooks.append(module.register_forward_hook(self._make_post_forward(unit)))

    # ---- setup -------------------------------------------------------------------------------

    def adopt(self, fu: FlatUnit, full32: torch.Tensor) -> None:
        (unit,) = fu.units
        lo, hi = fu.shard_range(self.group.rank)
        self.shards.append(full32[lo:hi].to(self.dtype, copy=True))
        full = torch.empty(fu.padded_numel, dtype=self.dtype, device=full32.device)
        _point_params_at(fu, self.params, full)
        full.untyped_storage().resize_(0)
        self.fulls.append(full)
        self.unit_flats[unit].append(fu.index)

    def local(self, fu: FlatUnit) -> torch.Tensor:
        return self.shards[fu.index]

    def publish(self, fus: list[FlatUnit], *, defer: bool = False) -> None:
        """Nothing to send: the next forward gathers the updated shards."""

    def wait_published(self) -> None:
        """Nothing in flight after a step: see `publish`."""

    def held_tensors(self) -> list[torch.Tensor]:
        return self.shards + [f for f in self.fulls if f.untyped_storage().nbytes() > 0]

    def pooled_bytes(self) -> int:
        """Bytes of idle gather buffers kept for the next gathers (not model states)."""
        return self.pool.idle_bytes()

    # ---- gather / release ----------------------------------------------------------------------

    def gather(self, unit: str, *, async_op: bool = False, phase: str = "forward") -> None:
        """Bring `unit` to GATHERED (or GATHERING, with async_op). `phase` names the gather in
        errors: forward, backward, prefetch."""
        state = self.state[unit]
        if state is UnitState.SHARDED:
            pending = []
            for i in self.unit_flats[unit]:
                full = self.fulls[i]
                self.pool.acquire(full.untyped_storage(), full.numel() * full.element_size())
                pending.append(
                    comm.all_gather(
                        full,
                        self.shards[i],
                        group=self.group,
                        stats=self.stats,
                        async_op=True,
                        label=f"all-gather of unit {unit or '<root>'!r} ({phase})",
                        quantize=self.quantize,
                    )
                )
            self._pending[unit] = pending
            self.state[unit] = UnitState.GATHERING
        if not async_op and self.state[unit] is UnitState.GATHERING:
            for p in self._pending.pop(unit):
                p.wait()
            self.state[unit] = UnitState.GATHERED

    def release(self, unit: str) -> None:
        """Free the unit's full buffers (waits for an in-flight gather first)."""
        if self.state[unit] is UnitState.SHARDED:
            return
        self.gather(unit)  # a gather in flight must land before its buffer is freed
        for i in self.unit_flats[unit]:
            self.pool.release(self.fulls[i].untyped_storage())
        self.state[unit] = UnitState.SHARDED

    def release_all(self) -> None:
        for unit in self.state:
            self.release(unit)

    # ---- hooks ----------------------------------------------------------------------------------
    # The order of the gathers is `schedule.GatherSequence`'s: the same on every rank.

    def _make_pre_forward(self, unit: str):
        def hook(module, args):
            if self._sequence.in_backward:
                # Recomputed inside backward (activation checkpointing around the unit's call):
                # its backward gather already ran, or runs here; its release comes with its
                # gradients, as without checkpointing.
                self.gather(unit, phase="recompute")
                return
            nxt = self._sequence.forward_start(unit)
            self.gather(unit)
            if nxt is not None:
                self.gather(nxt, async_op=True, phase="forward prefetch")

        return hook

    def _make_post_forward(self, unit: str):
        def hook(module, args, output):
            if self._sequence.in_backward:
                return  # a recompute: see the pre-forward hook
            tensors = []
            if torch.is_grad_enabled():
                tensors = [
                    t
                    for t in tree_flatten(output)[0]
                    if isinstance(t, torch.Tensor) and t.requires_grad
                ]
                for t in tensors:
                    t.register_hook(self._make_pre_backward(unit))
            self._sequence.forward_end(unit, needs_grad=bool(tensors))
            self.release(unit)
            if unit == ROOT_UNIT:
                # A prefetch past the last unit used, or a unit skipped this pass, must not
                # stay gathered.
                self.release_all()

        return hook

    def _make_pre_backward(self, unit: str):
        def hook(grad):
            if not self._sequence.in_backward:
                self._on_backward_start()
                self.pool.begin_pass(self._backward_demand())
            for u in self._sequence.backward_request(unit):
                self.gather(u, async_op=True, phase="backward")
            if self._sequence.walked(unit) and self.state[unit] is UnitState.SHARDED:
                return  # walked and already released: its gradients are done this pass
            self.gather(unit, phase="backward")

        return hook

    def _backward_demand(self) -> dict[int, int]:
        """Blocks of each size the coming backward takes from the pool: a gather per flat unit
        of its sequence, and a gradient bucket per trainable one (packed into the block its
        parameters gave back)."""
        demand: dict[int, int] = {}
        for unit in self._sequence.sequence():
            for i in self.unit_flats[unit]:
                nbytes = self.fulls[i].numel() * self.fulls[i].element_size()
                takes = 2 if self.layout.flat_units[i].trainable else 1
                demand[nbytes] = demand.get(nbytes, 0) + takes
        return demand

    def on_unit_grads_done(self, unit: str) -> None:
        """Every trainable parameter of `unit` has its gradient for this backward."""
        if all(self.layout.flat_units[i].trainable for i in self.unit_flats[unit]):
            self.release(unit)

    def end_backward(self) -> None:
        """Gather (and free) the units of the backward sequence this rank was not asked for."""
        for unit in self._sequence.finish_backward():
            self.gather(unit, async_op=True, phase="backward")
            self.release(unit)
        self.release_all()
