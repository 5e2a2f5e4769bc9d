"""Gradient stores: where gradients accumulate and how they are reduced across ranks.

Full local gradients (stages 0 and 1): every rank holds full gradients in flat buffers (one per
trainable flat unit, compute dtype); each `param.grad` is a view into them, so autograd
accumulates micro-steps in place.
  - `AllReducedGrads` (stage 0): when a bucket's gradients are all ready, its all-reduce starts
    from the gradient hook and runs while backward goes on. Under `no_sync()` nothing is sent;
    the next synchronised backward (or the step) reduces the accumulated sum. A backward into
    buffers that already hold a reduced sum (a second synchronised backward before the step)
    first divides them by world_size, so every micro-step is counted once, as with DDP.
  - `StepReducedGrads` (stage 1): nothing is sent under `no_sync()`. In the backward of the
    accumulation boundary each bucket is reduce-scattered once, from the gradient hook, while
    backward goes on; this rank keeps the summed slice it owns.

`ShardedGrads` (stages 2 and 3): every rank holds only its gradient shard. When a bucket's
gradients are all ready, the hook starts an async reduce-scatter of them. At stage 2 it sends
them straight from each `param.grad` (`comm.reduce_scatter_pieces`: no packed copy) and holds
them until the reduction lands. At stage 3 (and with int8) it packs them into a transient flat
buffer (stage 3: the block its unit's parameters just gave back) and frees each `param.grad`.
The first reduction after `zero()` writes the shard itself; a later one lands in a transient
slice (the packed bucket's own, or scratch) that is then added to the shard. Buffers go back to
a pool that serves the later buckets of the same pass. At most `max_inflight` buckets are in
flight, which bounds the transient memory. This runs every micro-step, `no_sync()` included.
A synchronised backward empties the pool at its end, so the step and the next forward hold none
of it; a backward under `no_sync()` keeps it for the next micro-step's, which reduces the same
buckets (`zero()` empties it too). `zero(set_to_none=True)` frees the shards unless they are
kept, so forward holds no gradient memory; the next backward creates them again.

Ordering: every rank must issue the same collectives in the same order, even if a parameter gets
no gradient on some rank: `schedule.BucketScheduler` launches buckets in one fixed order
(reverse layout order, the order backward usually produces them).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

import torch
from torch import nn

from . import comm
from .bufpool import GatherPool
from .partition import FlatUnit, Layout
from .schedule import BucketScheduler
from .sparse import RowsReduction, SparseRows, add_rows_to_shard

__all__ = ["AllReducedGrads", "BackwardTracker", "ShardedGrads", "StepReducedGrads"]


class BackwardTracker:
    """Runs the start- and end-of-backward work once per backward pass.

    Hooks call `enter()`; the first call of a pass runs `starters` (which may refuse the pass by
    raising) and queues `finish` with autograd, which runs `finishers` after autograd is done.
    If no hook ran (no parameter got a gradient on this rank), the engine calls
    `finish_if_missed()` so that the collectives still run and every rank stays in step.
    """

    def __init__(self) -> None:
        self.starters: list[Callable[[], None]] = []
        self.finishers: list[Callable[[], None]] = []
        self._queued = False
        self.passes = 0

    def enter(self) -> None:
        if not self._queued:
            for f in self.starters:
                f()
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)

    def finish(self) -> None:
        self._queued = False
        self.passes += 1
        for f in self.finishers:
            f()

    def finish_if_missed(self, passes_before: int) -> None:
        if self.passes == passes_before:
            self.finish()


class _BufferPool:
    """Transient bucket buffers, reused by size within a backward pass and, under `no_sync()`,
    across the micro-steps of an accumulation window.

    A fresh large CPU tensor is fresh pages, and the first write to each page faults, so
    packing into reused buffers is about twice as fast (README, Performance). Buckets of
    repeated blocks have equal sizes, so a finished bucket's buffer serves a later one: each
    launch takes the buffer the last retired bucket gave back, so one free buffer of a size
    (`keep`) is all a pass needs. The caller decides what is given back and when the pool is
    cleared (`ShardedGrads`: only what a later bucket, or the window's next backward, takes).
    `allocated` counts the buffers created: the pool's misses.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self.allocated = 0

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        for i, t in enumerate(self._free):
            if t.numel() == numel and t.dtype == dtype and t.device == device:
                return self._free.pop(i)
        self.allocated += 1
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, t: torch.Tensor, *, keep: int | None = None) -> None:
        """Keep `t` for a later `take`; at most `keep` (default `self.keep`) idle buffers of its
        size, dtype and device are kept, the oldest beyond that dropped."""
        keep = self.keep if keep is None else keep
        same = [
            i
            for i, f in enumerate(self._free)
            if f.numel() == t.numel() and f.dtype == t.dtype and f.device == t.device
        ]
        if len(same) >= keep:
            self._free.pop(same[0])
        self._free.append(t)

    def idle_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._free)

    def clear(self) -> None:
        self._free.clear()


def _trainable(layout: Layout) -> list[FlatUnit]:
    return [fu for fu in layout.flat_units if fu.trainable]


class _GradStore:
    """Shared wiring: hooks on trainable parameters, a side table param -> flat unit.

    `sparse` (set by the engine): the sparse embedding flat units, whose reduction is replaced
    by the union of touched rows when that is exact and cheaper (`sparse.SparseRows`).
    `quantize` (stages 2-3, set by the engine): block size of the int8 gradient reduce-scatter.
    """

    sparse: SparseRows | None = None
    quantize: int | None = None

    def __init__(self, layout: Layout, params: dict[str, nn.Parameter], tracker: BackwardTracker):
        self.layout, self.params, self.tracker = layout, params, tracker
        self.sync = True
        self.got_grad: set[nn.Parameter] = set()  # params that got a gradient since zero()
        self._flat_of: dict[nn.Parameter, int] = {}
        self._hooks = []
        for fu in _trainable(layout):
            for spec in fu.params:
                p = params[spec.name]
                self._flat_of[p] = fu.index
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _scheduler(self, max_inflight: int | None, blocking: bool) -> BucketScheduler:
        order = [fu.index for fu in reversed(_trainable(self.layout))]
        expected = {fu.index: len(fu.params) for fu in _trainable(self.layout)}
        return BucketScheduler(order, expected, self._launch, self._finish, max_inflight, blocking)

    def before_backward(self) -> None:
        """Called by `engine.backward` before autograd runs."""

    def pooled_bytes(self) -> int:
        """Bytes of idle buffers kept for reuse (not gradients)."""
        return 0

    def _on_grad(self, p: nn.Parameter) -> None:
        raise NotImplementedError

    def _launch(self, index: int):
        raise NotImplementedError

    def _finish(self, index: int, handle) -> None:
        raise NotImplementedError


class _FullGrads(_GradStore):
    """Stages 0-1: full flat gradient buffers on every rank; `param.grad` are views into them."""

    def __init__(
        self,
        layout: Layout,
        params: dict[str, nn.Parameter],
        *,
        dtype: torch.dtype,
        owned: Callable[[FlatUnit], tuple[int, int]],
        group: comm.ProcessGroupInfo,
        stats: comm.CommStats,
        tracker: BackwardTracker,
    ):
        self.group, self.stats, self._owned = group, stats, owned
        self.flats: dict[int, torch.Tensor] = {}
        self._views: dict[nn.Parameter, torch.Tensor] = {}
        for fu in _trainable(layout):
            device = params[fu.params[0].name].device
            flat = torch.zeros(fu.padded_numel, dtype=dtype, device=device)  # 1D, padded
            self.flats[fu.index] = flat
            for spec in fu.params:
                p = params[spec.name]
                view = flat[spec.offset : spec.offset + spec.numel].view(spec.shape)
                self._views[p] = view
                p.grad = view
        self._unreduced = False  # local grads accumulated since the last reduction
        super().__init__(layout, params, tracker)

    def _relink(self, p: nn.Parameter) -> None:
        # `model.zero_grad()` (set_to_none) or a user assignment replaced the view.
        view = self._views[p]
        if p.grad is None:
            view.zero_()
        elif p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
        p.grad = view

    def _on_grad(self, p: nn.Parameter) -> None:
        self.tracker.enter()
        self.got_grad.add(p)
        if p.grad is not self._views[p]:
            self._relink(p)

    def _relink_all(self) -> None:
        for p in self._views:
            if p.grad is not self._views[p]:
                self._relink(p)

    def local(self, fu: FlatUnit) -> torch.Tensor:
        lo, hi = self._owned(fu)
        return self.flats[fu.index][lo:hi]

    def zero(self, set_to_none: bool = True) -> None:
        """Zero the flat buffers in place either way: `param.grad` are views into them, and
        stages 0-1 hold full gradients by design (as DDP's buckets do)."""
        for p, view in self._views.items():
            view.zero_()
            p.grad = view
        if self.sparse is not None:
            self.sparse.clear()  # the buffers hold every row touched since zero()
        self._unreduced = False
        self.got_grad.clear()

    def held_tensors(self) -> list[torch.Tensor]:
        return list(self.flats.values())


class _BoundaryReducedGrads(_FullGrads):
    """Stages 0-1: a synchronised backward reduces each bucket from the gradient hooks as soon
    as it is ready, in one fixed order (`BucketScheduler`), while backward goes on; under
    `no_sync()` nothing is sent and the buffers accumulate locally.

    After a reduction the buffers hold a reduced sum (`_reduced`). A further backward before the
    step (a second synchronised one, or one under no_sync after it) would count that sum again:
    through `engine.backward` the subclass first undoes it (`_unreduce`), so every micro-step is
    counted once, as DDP counts it (only this unusual path pays); a raw `loss.backward()` there
    is refused, since by its first hook gradients have already been added."""

    stage: int
    refusal: str  # why a raw second backward is refused, and what engine.backward does

    def __init__(self, layout: Layout, params: dict[str, nn.Parameter], *, max_inflight, **kw):
        super().__init__(layout, params, **kw)
        self._reduced = False  # the buffers hold a reduction since zero()
        self.scheduler = self._scheduler(max_inflight, True)

    def _unreduce(self) -> None:
        raise NotImplementedError

    def before_backward(self) -> None:
        if self._reduced:
            self._unreduce()
            self._reduced = False
            self._unreduced = True

    def _on_grad(self, p: nn.Parameter) -> None:
        self.tracker.enter()  # the engine's own refusals (no zero_grad after step()) come first
        if self._reduced:
            raise RuntimeError(
                f"hf_zero stage {self.stage}: a second backward before step() went through "
                f"loss.backward(); {self.refusal}), run the micro-steps before the last one "
                "under engine.no_sync(), or call engine.step() in between"
            )
        super()._on_grad(p)
        if self.sync:
            self.scheduler.mark_ready(self._flat_of[p])

    def end_backward(self) -> None:
        self._relink_all()
        if self.sync:
            self.scheduler.flush()
            self._unreduced, self._reduced = False, True
        else:
            self.scheduler.reset()
            self._unreduced = True

    def zero(self, set_to_none: bool = True) -> None:
        super().zero(set_to_none)
        self._reduced = False


class AllReducedGrads(_BoundaryReducedGrads):
    """Stage 0: every bucket is all-reduced from the gradient hooks as soon as it is ready."""

    stage = 0
    refusal = (
        "its gradients would add to the already all-reduced sum of the first and count it "
        "world_size times. Call engine.backward(loss) (which rescales that sum first"
    )

    def __init__(self, layout: Layout, params: dict[str, nn.Parameter], **kw):
        super().__init__(layout, params, max_inflight=None, **kw)

    def _unreduce(self) -> None:
        # Every rank holds the sum: make it this rank's 1/N share, which DDP's average of
        # every reduction also counts once.
        if self.group.world_size > 1:
            for flat in self.flats.values():
                flat.div_(self.group.world_size)

    def _launch(self, index: int) -> comm.Pending:
        if self.sparse is not None and self.sparse.handles(index):
            flat = self.flats[index]
            sparse = self.sparse.launch_full(
                index, flat, dense_bytes=2 * flat.numel() * flat.element_size()
            )
            if sparse is not None:
                return sparse
        return comm.all_reduce(
            self.flats[index],
            group=self.group,
            stats=self.stats,
            async_op=True,
            label=f"gradient all-reduce of bucket {index} (backward)",
        )

    def _finish(self, index: int, launched: comm.Pending) -> None:
        launched.wait()

    def reduce_for_step(self) -> None:
        """At the accumulation boundary: all-reduce what was accumulated under no_sync."""
        if self._unreduced:
            for i, launched in [(i, self._launch(i)) for i in self.flats]:
                self._finish(i, launched)
        self._unreduced, self._reduced = False, False


class _Reduction:
    """One bucket's reduce-scatter in flight, and what its finish needs. `packed`: the packed
    bucket (a pooled buffer), or the gradient pieces it was sent from, held until it lands."""

    __slots__ = ("handle", "out", "packed", "scratch")

    def __init__(self, handle, out, packed, scratch):
        self.handle, self.out, self.packed, self.scratch = handle, out, packed, scratch

    def is_completed(self) -> bool:
        return self.handle.is_completed()


class StepReducedGrads(_BoundaryReducedGrads):
    """Stage 1: each bucket is reduce-scattered once per optimizer step, in the backward of the
    accumulation boundary.

    Under `no_sync()` nothing is sent: the full buffers accumulate locally. In a synchronised
    backward (the last micro-step) each bucket's reduce-scatter starts from the gradient hook
    as soon as the bucket is ready and runs while backward goes on, so it overlaps compute
    (`BucketScheduler`, at most two in flight). A step that follows no synchronised backward
    (every micro-step under `no_sync()`) reduces at the step instead (`reduce_for_step`).

    After a reduction a rank's owned slice holds the sum over ranks and the rest of its buffer
    the local gradients already in that sum. A further backward before the step (through
    `engine.backward`) first zeroes that rest, so the next reduction counts each micro-step
    once, as DDP does; a raw `loss.backward()` there is refused.

    What gloo receives into (`scratch`) is kept across steps, by size (`bufpool.GatherPool`):
    the same buffers serve every step, so the step faults no fresh pages. Two buckets are in
    flight at once, so at most two buffers of a size exist."""

    stage = 1
    refusal = (
        "its gradients would add to buffers already reduce-scattered by the first and count "
        "it twice. Call engine.backward(loss) (which prepares the buffers first"
    )

    def __init__(self, layout: Layout, params: dict[str, nn.Parameter], **kw):
        # max_inflight=1 blocks a launch on the one before it, so at most two are in flight.
        super().__init__(layout, params, max_inflight=1, **kw)
        self._scratch = GatherPool(capacity=2)
        self._units = {fu.index: fu for fu in _trainable(layout)}

    def _unreduce(self) -> None:
        # The owned slice holds the sum over ranks, the rest this rank's gradients already in
        # that sum (the other ranks' owned slices): zero the rest, so the next reduction adds
        # the sum once.
        for fu in self._units.values():
            lo, hi = self._owned(fu)
            flat = self.flats[fu.index]
            flat[:lo].zero_()
            flat[hi:].zero_()

    def _launch(self, index: int) -> _Reduction:
        fu, flat = self._units[index], self.flats[index]
        lo, hi = self._owned(fu)
        if self.sparse is not None and self.sparse.handles(index):
            sparse = self.sparse.launch_full(
                index, flat, dense_bytes=flat.numel() * flat.element_size()
            )
            if sparse is not None:
                return _Reduction(sparse, None, None, None)
        n = comm.reduce_scatter_scratch_numel(self.group, hi - lo, in_place=True)
        buf = self._scratch.take(n, flat.dtype, flat.device) if n else None
        handle = comm.reduce_scatter(
            flat[lo:hi],  # in place: the owned slice receives the sum
            flat,
            group=self.group,
            stats=self.stats,
            async_op=True,
            label=f"gradient reduce-scatter of bucket {index} (backward)",
            tag=index,
            scratch=buf,
        )
        return _Reduction(handle, None, None, buf)

    def _finish(self, index: int, launched: _Reduction) -> None:
        launched.handle.wait()
        if launched.scratch is not None:
            self._scratch.give(launched.scratch)

    def reduce_for_step(self) -> None:
        """At the accumulation boundary: reduce what no synchronised backward reduced."""
        if not self._unreduced:
            return
        inflight: deque = deque()
        for index in self.scheduler.order:
            if len(inflight) == 2:
                self._finish(*inflight.popleft())
            inflight.append((index, self._launch(index)))
        for index, launched in inflight:
            self._finish(index, launched)
        self._unreduced, self._reduced = False, True

    def pooled_bytes(self) -> int:
        """Bytes of the reduce-scatter buffers kept for the next step."""
        return self._scratch.idle_bytes()


class ShardedGrads(_GradStore):
    """Stages 2-3: each rank holds its gradient shard; buckets are reduce-scattered in backward."""

    def __init__(
        self,
        layout: Layout,
        params: dict[str, nn.Parameter],
        *,
        dtype: torch.dtype,
        group: comm.ProcessGroupInfo,
        stats: comm.CommStats,
        tracker: BackwardTracker,
        max_inflight: int,
        poll: bool,
        keep_shards: bool,
        on_unit_grads_done: Callable[[str], None] | None = None,
        buffers=None,
    ):
        """`poll`: backward never blocks on a reduction, it retires those seen complete
        (`StagePlan.poll_reductions`, stage 3). `keep_shards`: see `ZeroConfig.keep_grad_shards`.
        `on_unit_grads_done` (stage 3) is called when every trainable parameter of a unit has
        its gradient. `buffers` (stage 3): a `bufpool.GatherPool` that the bucket buffers are
        taken from and given back to, across passes: the unit's released parameter block
        serves its gradient bucket, then the next gather."""
        self.group, self.stats, self.dtype = group, stats, dtype
        self.max_inflight, self.poll = max_inflight, poll
        self.keep_shards = keep_shards
        # 1D, shard_numel each, compute dtype. The first reduction after `zero()` writes the
        # shard (allocating it if `zero(set_to_none=True)` freed it, as torch frees `.grad`);
        # later micro-steps add to it. `_written` holds the shards written since `zero()`: a
        # kept shard outside it holds a stale gradient that nothing reads.
        self.shards: dict[int, torch.Tensor] = {}
        self._written: set[int] = set()
        self._devices = {fu.index: params[fu.params[0].name].device for fu in _trainable(layout)}
        self._on_unit_grads_done = on_unit_grads_done
        self._unit_expected: dict[str, int] = {}
        self._unit_of: dict[int, str] = {}
        for fu in _trainable(layout):
            if len(fu.units) == 1:
                self._unit_of[fu.index] = fu.units[0]
                self._unit_expected[fu.units[0]] = self._unit_expected.get(fu.units[0], 0) + len(
                    fu.params
                )
        self._unit_remaining = dict(self._unit_expected)
        self._shared_buffers = buffers is not None
        self._buffers = buffers if buffers is not None else _BufferPool(keep=1)
        self._scratch = _BufferPool(keep=1)  # what gloo's reduce-scatter receives into
        # Under no_sync() another backward comes before the step and reduces the same buckets:
        # every buffer the pass created is kept for it, as many of a size as were alive at once
        # (at most max_inflight + 1 where backward blocks; more where it polls, stage 3).
        self._window_keep = len(_trainable(layout))
        # Bucket sizes still to launch this pass: a retired buffer is kept only for one of them.
        self._sizes_per_pass = Counter(fu.padded_numel for fu in _trainable(layout))
        self._sizes_to_come = Counter(self._sizes_per_pass)
        self._pass_open = False  # a backward has put gradients on .grad and not finished
        super().__init__(layout, params, tracker)
        self.scheduler = self._scheduler(max_inflight, not poll)

    def _on_grad(self, p: nn.Parameter) -> None:
        self._pass_open = True
        self.tracker.enter()
        self.got_grad.add(p)
        index = self._flat_of[p]
        unit = self._unit_of.get(index)
        # Release the unit's gathered parameters (stage 3) before its bucket is packed, so the
        # full parameters and the packed gradients never coexist.
        if self._on_unit_grads_done is not None and unit is not None:
            self._unit_remaining[unit] -= 1
            if self._unit_remaining[unit] == 0:
                self._on_unit_grads_done(unit)
        self.scheduler.mark_ready(index)

    def _launch(self, index: int):
        fu = self.layout.flat_units[index]
        if self.sparse is not None and self.sparse.handles(index):
            sparse = self._launch_sparse(fu)
            if sparse is not None:
                return sparse
        # The first reduction after `zero()` lands in the shard itself; later micro-steps reduce
        # into a transient slice and add it to the shard.
        fresh = index not in self._written
        self._written.add(index)
        self._sizes_to_come[fu.padded_numel] -= 1
        if self._shared_buffers or self.poll or self.quantize is not None:
            return self._launch_packed(fu, fresh)
        return self._launch_pieces(fu, fresh)

    def _fresh_shard(self, fu: FlatUnit) -> torch.Tensor:
        """The shard the first reduction after `zero()` writes: kept from an earlier step
        (overwritten, never zeroed), or new."""
        shard = self.shards.get(fu.index)
        if shard is None:
            shard = self.shards[fu.index] = torch.empty(
                fu.shard_numel, dtype=self.dtype, device=self._devices[fu.index]
            )
        return shard

    def _launch_pieces(self, fu: FlatUnit, fresh: bool) -> _Reduction:
        """Stage 2: the bucket is sent straight from the parameters' gradients
        (`comm.reduce_scatter_pieces`), never packed: no copy of the bucket, and no bucket-sized
        buffer whose fresh pages fault. Each `param.grad` is held until the reduction lands."""
        device = self._devices[fu.index]
        pieces, at = [], 0
        for spec in sorted(fu.params, key=lambda spec: spec.offset):
            if spec.offset > at:  # a gap in the layout: zeros
                pieces.append(torch.zeros(spec.offset - at, dtype=self.dtype, device=device))
            p = self.params[spec.name]
            if p.grad is not None:
                pieces.append(p.grad.reshape(-1).to(self.dtype))
                p.grad = None
            else:  # no gradient on this rank: it adds zeros
                pieces.append(torch.zeros(spec.numel, dtype=self.dtype, device=device))
            at = spec.offset + spec.numel
        if fu.padded_numel > at:
            pieces.append(torch.zeros(fu.padded_numel - at, dtype=self.dtype, device=device))
        n = fu.shard_numel
        extra = comm.reduce_scatter_scratch_numel(self.group, n, in_place=False)
        if fresh:
            out = self._fresh_shard(fu)
            scratch = self._scratch.take(extra, self.dtype, device) if extra else None
            received = scratch
        else:  # the sum lands in scratch first, then is added to the shard
            scratch = self._scratch.take(n + extra, self.dtype, device)
            out, received = scratch[:n], (scratch[n:] if extra else None)
        handle = comm.reduce_scatter_pieces(
            out,
            pieces,
            group=self.group,
            stats=self.stats,
            async_op=True,
            label=f"gradient reduce-scatter of bucket {fu.index} (backward)",
            tag=fu.index,
            scratch=received,
        )
        return _Reduction(handle, None if fresh else out, pieces, scratch)

    def _launch_packed(self, fu: FlatUnit, fresh: bool) -> _Reduction:
        """Stage 3 (its bucket packs into the block its unit's parameters gave back) and int8:
        the gradients are packed into one flat buffer, then reduce-scattered (in place where
        the shard already holds this step's gradients: this rank's slice of the bucket receives
        the sum, then is added to the shard)."""
        index = fu.index
        # 1D, transient. Only what no gradient fills is zeroed: the padding, and parameters
        # without a gradient on this rank (a full fill would touch the bucket twice).
        packed = self._buffers.take(fu.padded_numel, self.dtype, self._devices[index])
        packed[fu.numel :].zero_()
        for spec in fu.params:
            p = self.params[spec.name]
            dst = packed[spec.offset : spec.offset + spec.numel]
            if p.grad is not None:
                dst.copy_(p.grad.reshape(-1))
                p.grad = None  # the full gradient is freed as soon as it is packed
            else:
                dst.zero_()
        lo, hi = fu.shard_range(self.group.rank)
        out = self._fresh_shard(fu) if fresh else packed[lo:hi]
        n = comm.reduce_scatter_scratch_numel(
            self.group, out.numel(), in_place=not fresh, quantize=self.quantize
        )
        scratch = self._scratch.take(n, self.dtype, self._devices[index]) if n else None
        handle = comm.reduce_scatter(
            out,
            packed,
            group=self.group,
            stats=self.stats,
            async_op=True,
            label=f"gradient reduce-scatter of bucket {index} (backward)",
            tag=index,
            scratch=scratch,
            polled=self.poll,
            quantize=self.quantize,
        )
        return _Reduction(handle, None if fresh else out, packed, scratch)

    def _launch_sparse(self, fu: FlatUnit) -> RowsReduction | None:
        """The sparse embedding's rows touched on any rank, all-reduced and added to the
        shard's part of them; None when the dense reduction must run."""
        index, p = fu.index, self.params[fu.params[0].name]
        size = torch.empty((), dtype=self.dtype).element_size()
        union = self.sparse.exchange(
            index, p.grad, dense_bytes=fu.padded_numel * size, element_size=size
        )
        self.sparse.clear(index)  # this micro-step's rows are reduced either way
        if union is None:
            return None
        grad, p.grad = p.grad, None  # the full gradient is freed as soon as it is packed
        self._sizes_to_come[fu.padded_numel] -= 1
        lo, hi = fu.shard_range(self.group.rank)
        shard = self.shards.get(index)
        if shard is None:
            shard = self.shards[index] = torch.empty(
                hi - lo, dtype=self.dtype, device=self._devices[index]
            )
        if index not in self._written:
            shard.zero_()
            self._written.add(index)
        _, dim = self.sparse.rows_of(index)
        return self.sparse.reduce_rows(
            index,
            grad,
            union,
            lambda summed: add_rows_to_shard(shard, lo, union, summed, dim),
            dtype=self.dtype,
            device=self._devices[index],
        )

    def _finish(self, index: int, launched: _Reduction | RowsReduction) -> None:
        if isinstance(launched, RowsReduction):
            launched.wait()
            return
        handle, out, packed, scratch = (
            launched.handle,
            launched.out,
            launched.packed,
            launched.scratch,
        )
        handle.wait()
        if out is not None:
            self.shards[index].add_(out)
        self._give_back(self.layout.flat_units[index].padded_numel, packed, scratch)

    def _give_back(self, numel: int, packed, scratch: torch.Tensor | None) -> None:
        """Keep a finished bucket's buffers (`packed` where it was packed, and `scratch`) for a
        bucket of its size (`numel`) still to come this pass (else GPT-2's last block bucket
        would sit through the embedding backward, where memory peaks), or, under no_sync(),
        for the next micro-step's backward: it reduces the same buckets, and would fault the
        same buffers in again."""
        window = not self.sync
        keep = self._window_keep if window else None
        if not (self._shared_buffers or window or self._sizes_to_come[numel] > 0):
            return
        if isinstance(packed, torch.Tensor):
            if self._shared_buffers:
                self._buffers.give(packed)
            else:
                self._buffers.give(packed, keep=keep)
        if scratch is not None:
            self._scratch.give(scratch, keep=keep)

    def end_backward(self) -> None:
        if self._shared_buffers:
            # Past the end of backward's peak: what the flush gives back is kept for the next
            # forward's gathers (bufpool).
            self._buffers.end_pass()
        self.scheduler.flush()
        self._pass_open = False
        if self.sync:  # the step comes next: no buffer outlives it (no_sync: see _give_back)
            self._drop_buffers()
        self._sizes_to_come = Counter(self._sizes_per_pass)
        self._unit_remaining = dict(self._unit_expected)

    def reduce_for_step(self) -> None:
        """Nothing left to send: every backward already reduced into the shards."""

    def local(self, fu: FlatUnit) -> torch.Tensor:
        if fu.index not in self._written:  # no backward since zero(): a zero gradient
            shard = self.shards.get(fu.index)
            if shard is None:
                device = self._devices[fu.index]
                shard = torch.empty(fu.shard_numel, dtype=self.dtype, device=device)
            self.shards[fu.index] = shard.zero_()
            self._written.add(fu.index)
        return self.shards[fu.index]

    def _drop_buffers(self) -> None:
        if not self._shared_buffers:
            self._buffers.clear()
        self._scratch.clear()

    def pooled_bytes(self) -> int:
        """Bytes of the bucket buffers kept between the micro-steps of an accumulation window
        (stage 3's packed buckets live in the gather pool, which the parameters report)."""
        own = 0 if self._shared_buffers else self._buffers.idle_bytes()
        return own + self._scratch.idle_bytes()

    def zero(self, set_to_none: bool = True) -> None:
        """`set_to_none=True`: the shards are empty until the next backward writes them (and
        freed unless kept). False: they are zeroed in place and stay written. Bucket buffers
        kept by a window whose last backward ran under no_sync() are freed."""
        self._drop_buffers()
        if set_to_none:
            self._written.clear()
            if not self.keep_shards:
                self.shards.clear()
        else:
            for s in self.shards.values():
                s.zero_()
        if self._pass_open:
            # A backward refused or failed after some gradients accumulated left them on .grad
            # (a complete one packs and frees them all).
            for p in self._flat_of:
                p.grad = None
            self._pass_open = False
        self.got_grad.clear()

    def held_tensors(self) -> list[torch.Tensor]:
        return list(self.shards.values())
