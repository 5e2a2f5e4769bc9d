"""Collectives: the only module that calls torch.distributed.

Every collective is a free function with an explicit `group=` and `stats=`; it counts what it
moves into `stats` and returns a `Pending` that the caller waits on (sync calls return an
already-finished one). World size 1 runs the same functions: with no process group the
collectives are local copies, and they are still counted, so `comm_stats()` reads the same.

Byte accounting (per rank, the ZeRO paper's convention):
- all_reduce of n elements: 2n (a reduce-scatter plus an all-gather)
- reduce_scatter of an n-element input: n
- all_gather into an n-element output: n
So stages 0-2 move 2Ψ elements per optimizer step and stage 3 moves 3Ψ. Alongside,
`CommStats.sent` counts the payload this rank really hands to torch.distributed to send (the
bytes of the tensors or slices it sends, whatever the convention counts).

Two wire formats beyond plain tensors, chosen by the caller, invisible to what it gets back:
- sparse rows (`all_gather_row_ids`, then `all_reduce(kind="sparse_rows")` of the packed rows):
  an embedding gradient reduced as the union of the rows the ranks touched (`sparse`);
- blockwise int8 (`quantize=` on `all_gather` and `reduce_scatter`, `quantize`): each rank
  packs what it sends once; a reduce-scatter is an all-to-all of the packed slices, dequantized
  and summed in fp32 by the rank that owns them, so the error does not grow hop by hop.

Backend choice: gloo's own reduce-scatter and all-gather are slower than an all-reduce of the
same buffer, and a broadcast of each rank's slice is faster than either (README, Performance).
So on gloo `reduce_scatter` sends each rank the slice it owns (point to point), and `all_gather`
runs one broadcast per rank. On NCCL they are the true collectives. Either way they are counted
as the collective they implement; `CommStats.paths` records which ran.

The process group itself: `default_world()` describes it, `init_process_group()` starts it from
the launcher's environment and `destroy_process_group()` ends it, so that scripts and
integrations never call torch.distributed.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .waiter import Waited

# torch 2.13 names the tensor collectives reduce_scatter_single and all_gather_single and
# deprecates the old names, the only ones torch before 2.13 has. hf_zero needs 2.13 (CI runs it);
# the fallback lets the CUDA tests run on GPU images that ship an older torch.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or getattr(
    dist, "reduce_scatter_tensor", None
)
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(
    dist, "all_gather_into_tensor", None
)

__all__ = [
    "WorldInfo",
    "default_world",
    "init_process_group",
    "destroy_process_group",
    "CommStats",
    "Pending",
    "ProcessGroupInfo",
    "all_gather",
    "all_gather_row_ids",
    "all_reduce",
    "reduce_scatter",
    "reduce_scatter_pieces",
    "reduce_scatter_scratch_numel",
    "all_reduce_scalar",
    "all_gather_object",
    "barrier",
    "resolve_group",
    "new_group_like",
    "CollectiveError",
]


@dataclass(frozen=True)
class WorldInfo:
    """The default process group as this process sees it."""

    initialized: bool
    rank: int
    world_size: int
    backend: str | None
    """"gloo", "nccl", ...; None when torch.distributed is not initialised."""


def default_world() -> WorldInfo:
    """The default process group, or `WorldInfo(False, 0, 1, None)` when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return WorldInfo(False, 0, 1, None)
    return WorldInfo(True, dist.get_rank(), dist.get_world_size(), dist.get_backend())


_BACKENDS = ("gloo", "nccl")
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_process_group(backend: str | None = None, *, timeout_s: float | None = None) -> WorldInfo:
    """Start the default process group from the launcher's environment (env://: RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as torchrun and accelerate launch set them).

    Args:
        backend: "gloo" or "nccl"; default nccl when CUDA is available, else gloo. With nccl,
            this process's GPU is LOCAL_RANK (set as the current device).
        timeout_s: how long the rendezvous and the default group's collectives may wait,
            1 s to 7 days; default torch's.

    Returns:
        The world it joined. Already initialised (by a launcher or a framework): the world as it
        is, unchanged.

    Raises:
        ValueError: an unknown backend, a timeout out of range, the launcher's variables
            missing, or an initialised world of another backend than the one asked for.
    """
    from .config import TIMEOUT_RANGE_S

    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)} or None, got {backend!r}")
    lo, hi = TIMEOUT_RANGE_S
    if timeout_s is not None and not (
        isinstance(timeout_s, int | float)
        and not isinstance(timeout_s, bool)
        and math.isfinite(timeout_s)
        and lo <= timeout_s <= hi
    ):
        raise ValueError(
            f"timeout_s must be a number of seconds from {lo:g} to {hi:g} (7 days) or None, "
            f"got {timeout_s!r}"
        )
    world = default_world()
    if world.initialized:
        if backend is not None and world.backend != backend:
            raise ValueError(
                f"torch.distributed is already initialised with backend {world.backend!r} "
                f"(rank {world.rank} of {world.world_size}), not {backend!r}; call "
                "destroy_process_group() first, or pass backend=None to join it as it is"
            )
        return world
    missing = [k for k in _LAUNCH_ENV if k not in os.environ]
    if missing:
        raise ValueError(
            f"init_process_group needs the launcher's environment variables; "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Start the "
            "script with torchrun or accelerate launch, or, for one process, do not call it: "
            "the engine runs as world size 1 without a process group"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, init_method="env://", **kwargs)
    return default_world()


def destroy_process_group() -> None:
    """End the default process group and every group made from it; nothing when there is none.
    (gloo jobs may still abort at interpreter exit afterwards: scripts end with os._exit.)"""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class CommStats:
    """Bytes and calls per collective kind since the engine started."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    """Payload bytes this rank handed to torch.distributed to send, per collective kind."""
    reductions: dict[str, int] = field(default_factory=dict)
    """Sparse-capable gradient reductions by how they ran: "sparse", "dense" (the touched rows
    would have cost more) and "dense_unproven" (a gradient outside the recorded rows)."""

    def add(self, kind: str, nbytes: int, path: str | None = None) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if path is not None:
            self.paths[kind] = path

    def hand(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + nbytes

    def count_reduction(self, how: str) -> None:
        self.reductions[how] = self.reductions.get(how, 0) + 1

    def wire(self) -> dict:
        """Payload sent per kind plus "total", and the sparse reduction counters."""
        sent = {k: int(v) for k, v in sorted(self.sent.items())}
        sent["total"] = sum(self.sent.values())
        return {"sent_bytes": sent, "reductions": dict(sorted(self.reductions.items()))}

    def snapshot(self) -> dict:
        out = {k: int(v) for k, v in sorted(self.bytes.items())}
        out["total"] = sum(self.bytes.values())
        return out


@dataclass(frozen=True)
class ProcessGroupInfo:
    """The group the engine communicates over. `group is None` with world_size 1 means no
    process group exists and collectives are local."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    backend: str
    timeout_s: float | None = None


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank died or stopped calling collectives (timeout). The
    message says which collective, in which phase of training."""


def resolve_group(group: dist.ProcessGroup | None) -> ProcessGroupInfo:
    """Describe `group` (default: the world), or a local group of one when torch.distributed
    is not initialised."""
    if not dist.is_initialized():
        if group is not None:
            raise ValueError("a process group was passed but torch.distributed is not initialised")
        return ProcessGroupInfo(None, 0, 1, "local")
    group = group if group is not None else dist.group.WORLD
    return ProcessGroupInfo(
        group, dist.get_rank(group), dist.get_world_size(group), dist.get_backend(group)
    )


def new_group_like(info: ProcessGroupInfo, *, timeout_s: float) -> ProcessGroupInfo:
    """A group of the engine's own over the same ranks and backend, with its collective timeout.

    The engine uses two: one for parameters and control, one for gradient reductions only.
    Reductions launch in a fixed order, but WHEN depends on which gradients a rank has, and that
    may differ between ranks (a parameter unused on one rank only). Stage 3's all-gathers run
    during backward too, in forward/backward order; on one shared group the two sequences could
    interleave differently on different ranks and pair up mismatched collectives. One sequence
    per group is the same on every rank.
    """
    if info.group is None:
        return info
    ranks = dist.get_process_group_ranks(info.group)
    group = dist.new_group(
        ranks=ranks,
        backend=info.backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        use_local_synchronization=True,
    )
    return ProcessGroupInfo(
        group, dist.get_rank(group), dist.get_world_size(group), info.backend, timeout_s
    )


def _failed(label: str, group: ProcessGroupInfo, error: Exception) -> CollectiveError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    within = f" within the {group.timeout_s:g} s collective timeout" if group.timeout_s else ""
    return CollectiveError(
        f"rank {group.rank}: {label} failed: a peer rank disappeared or stopped calling "
        f"collectives{within} ({type(error).__name__}: {first})"
    )


def _issue(label: str, group: ProcessGroupInfo, call: Callable[[], object]):
    try:
        return call()
    except RuntimeError as e:
        raise _failed(label, group, e) from e


class Pending:
    """A collective in flight. `wait()` blocks until it is done, then runs its finishing step
    (for example the local slice of gloo's reduce-scatter) exactly once. A failure is raised as
    a CollectiveError naming the collective."""

    __slots__ = ("_work", "_then", "_done", "_label", "_group")

    def __init__(self, work=None, then: Callable[[], None] | None = None, *, label="", group=None):
        self._work, self._then, self._done = work, then, False
        self._label, self._group = label, group

    def is_completed(self) -> bool:
        """True when `wait()` would not block."""
        return self._done or self._work is None or self._work.is_completed()

    def wait(self) -> None:
        if self._done:
            return
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as e:
                raise _failed(self._label, self._group, e) from e
        self._done = True
        if self._then is not None:
            self._then()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _finish(work, label, group, async_op, then=None) -> Pending:
    pending = Pending(work, then, label=label, group=group)
    if not async_op:
        pending.wait()
    return pending


def all_reduce(
    tensor: torch.Tensor,
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    async_op: bool = False,
    label: str = "all-reduce",
    kind: str = "all_reduce",
) -> Pending:
    """Sum `tensor` in place across the group (counted under `kind`)."""
    stats.add(kind, 2 * _nbytes(tensor))
    if group.group is None:
        return Pending()
    stats.hand(kind, _nbytes(tensor))
    work = _issue(label, group, lambda: dist.all_reduce(tensor, group=group.group, async_op=True))
    return _finish(work, label, group, async_op)


def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    async_op: bool = False,
    label: str = "reduce-scatter",
    tag: int = 0,
    scratch: torch.Tensor | None = None,
    polled: bool = False,
    quantize: int | None = None,
) -> Pending:
    """Sum `input` (1D, world_size * output.numel()) across the group; `output` gets this rank's
    slice. `input` is clobbered: its other slices are left as they were or hold the sum.

    `output` is either a separate tensor or exactly this rank's own slice of `input` (in place:
    no copy on gloo; on NCCL the result lands in a separate tensor first and is copied into the
    slice, so NCCL never sees aliased buffers).

    On gloo each rank sends every other rank the slice that rank owns and receives its own slice
    from each of them: a separate `output` receives the first itself, the others land in
    `scratch` (`reduce_scatter_scratch_numel` elements of input's dtype; allocated when None,
    reusable once the reduction is waited on). The sum is formed when it is waited on.
    Reductions in flight at once need distinct `tag`s, the same on every rank. Each rank sends
    (N-1)/N of `input`, half of an all-reduce's traffic.

    `polled=True`: the caller retires the reduction when `is_completed()` says so rather than
    by waiting. gloo's point-to-point works report completion only once waited on, so on gloo
    a background thread waits on them (`waiter.Waited`); the bytes and the scratch are the same.

    `quantize=block_size`: lossy, int8 on the wire (`_reduce_scatter_int8`); no scratch taken,
    pollable on every backend.
    """
    own, in_place = _own_slice(input, output, group, "reduce_scatter", "input", "output")
    if quantize is not None and group.group is not None:
        return _reduce_scatter_int8(
            output,
            input,
            own,
            group=group,
            stats=stats,
            async_op=async_op,
            label=label,
            block_size=quantize,
        )

    def take_slice() -> None:
        if not in_place:
            output.copy_(own)

    if group.group is None:
        stats.add("reduce_scatter", _nbytes(input), "local")
        take_slice()
        return Pending()
    if group.backend == "nccl":
        stats.add("reduce_scatter", _nbytes(input), "reduce_scatter_single")
        stats.hand("reduce_scatter", _nbytes(input))
        dst = torch.empty_like(output) if in_place else output
        work = _issue(
            label,
            group,
            lambda: _reduce_scatter_single(dst, input, group=group.group, async_op=True),
        )
        return _finish(work, label, group, async_op, (lambda: own.copy_(dst)) if in_place else None)
    n, size, rank = output.numel(), group.world_size, group.rank
    # A separate `output` receives the first slice itself; the rest land in `scratch`.
    want = reduce_scatter_scratch_numel(group, n, in_place=in_place)
    if scratch is not None and (
        scratch.numel() != want
        or scratch.dtype != input.dtype
        or scratch.device != input.device
        or _overlaps(scratch, input)
    ):
        raise ValueError(
            f"reduce_scatter scratch must be {want} elements of {input.dtype}, separate from "
            f"input; got {scratch.numel()} of {scratch.dtype}"
        )
    stats.add("reduce_scatter", _nbytes(input), "send/recv of each rank's slice")
    if size == 1:
        take_slice()
        return Pending()
    stats.hand("reduce_scatter", (size - 1) * _nbytes(own))
    if scratch is None:
        scratch = input.new_empty(want)
    targets = ([] if in_place else [output]) + (list(scratch.split(n)) if want else [])
    works, received = [], []
    for k, target in zip(range(1, size), targets):
        to, frm = (rank + k) % size, (rank - k) % size
        works.append(
            _issue(
                label,
                group,
                lambda to=to: dist.isend(
                    input[to * n : (to + 1) * n], group=group.group, group_dst=to, tag=tag
                ),
            )
        )
        works.append(
            _issue(
                label,
                group,
                lambda frm=frm, target=target: dist.irecv(
                    target, group=group.group, group_src=frm, tag=tag
                ),
            )
        )
        received.append(target)

    def add_received() -> None:
        if in_place:
            for chunk in received:
                own.add_(chunk)
        else:
            output.add_(own)
            for chunk in received[1:]:
                output.add_(chunk)

    works = Waited(works) if polled else _Works(works)
    return _finish(works, label, group, async_op, add_received)


def reduce_scatter_pieces(
    output: torch.Tensor,
    pieces: list[torch.Tensor],
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    async_op: bool = False,
    label: str = "reduce-scatter",
    tag: int = 0,
    scratch: torch.Tensor | None = None,
) -> Pending:
    """`reduce_scatter` of the concatenation of `pieces` (1D tensors of one dtype,
    world_size * output.numel() elements in all) into a separate `output`, without packing them.

    On gloo each rank sends every other rank the parts of the pieces that fall in that rank's
    slice, one message per part, and adds the parts that fall in its own slice to what it
    received, straight from the pieces: no copy of the whole input is made, and no buffer of its
    size is allocated (on CPU, fresh pages that fault). Every rank cuts the pieces at the same
    places, so the messages pair up. The sum is formed in the order `reduce_scatter` forms it
    for a separate output, so the result is bitwise the same. `scratch` as for
    `reduce_scatter` (`reduce_scatter_scratch_numel(..., in_place=False)`). The pieces must not
    change until the reduction is waited on. On NCCL, or without a process group, the pieces
    are packed (one copy) and `reduce_scatter` runs.
    """
    n, size, rank = output.numel(), group.world_size, group.rank
    total = sum(p.numel() for p in pieces)
    if total != n * size:
        raise ValueError(
            f"reduce_scatter_pieces pieces have {total} elements, expected {size} x {n}"
        )
    if any(p.dtype != output.dtype or p.device != output.device for p in pieces):
        raise ValueError(
            f"reduce_scatter_pieces pieces must be {output.dtype} on {output.device} like output"
        )
    if group.group is None or group.backend == "nccl" or size == 1:
        packed = torch.cat(pieces)
        return reduce_scatter(
            output, packed, group=group, stats=stats, async_op=async_op, label=label, tag=tag
        )
    want = reduce_scatter_scratch_numel(group, n, in_place=False)
    if scratch is not None and (
        scratch.numel() != want or scratch.dtype != output.dtype or scratch.device != output.device
    ):
        raise ValueError(
            f"reduce_scatter scratch must be {want} elements of {output.dtype}; got "
            f"{scratch.numel()} of {scratch.dtype}"
        )
    nbytes = n * output.element_size()
    stats.add("reduce_scatter", size * nbytes, "send/recv of each rank's slice")
    stats.hand("reduce_scatter", (size - 1) * nbytes)
    if scratch is None and want:
        scratch = output.new_empty(want)
    parts = _parts_by_slice(pieces, n, size)
    targets = [output] + (list(scratch.split(n)) if want else [])
    works = []
    for k, target in zip(range(1, size), targets):
        to, frm = (rank + k) % size, (rank - k) % size
        for j, (_, part) in enumerate(parts[to]):
            works.append(
                _issue(
                    label,
                    group,
                    lambda part=part, to=to, j=j: dist.isend(
                        part, group=group.group, group_dst=to, tag=_part_tag(tag, j)
                    ),
                )
            )
        for j, (offset, part) in enumerate(parts[rank]):  # this rank's slice, as `frm` cut it
            dst = target[offset : offset + part.numel()]
            works.append(
                _issue(
                    label,
                    group,
                    lambda dst=dst, frm=frm, j=j: dist.irecv(
                        dst, group=group.group, group_src=frm, tag=_part_tag(tag, j)
                    ),
                )
            )

    def add_received() -> None:
        for offset, part in parts[rank]:
            output[offset : offset + part.numel()].add_(part)
        for chunk in targets[1:]:
            output.add_(chunk)

    return _finish(_Works(works), label, group, async_op, add_received)


def _part_tag(tag: int, j: int) -> int:
    """The tag of part j of a reduction tagged `tag`: each message of a pair of ranks has its
    own, since gloo does not pair several messages of one tag in order. Above every plain tag
    (a bucket index), below 2**31."""
    if not 0 <= tag < 2**14 or not 0 <= j < 2**16:
        raise ValueError(f"reduce_scatter_pieces: tag {tag} or part {j} out of range")
    return ((tag + 1) << 16) | j


def _parts_by_slice(
    pieces: list[torch.Tensor], n: int, size: int
) -> list[list[tuple[int, torch.Tensor]]]:
    """For each rank's slice [r*n, (r+1)*n) of the pieces' concatenation: the (offset in the
    slice, contiguous 1D view) parts of the pieces that fall in it, in order."""
    parts: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(size)]
    start = 0
    for piece in pieces:
        end = start + piece.numel()
        a = start
        while a < end:
            r = a // n
            b = min(end, (r + 1) * n)
            parts[r].append((a - r * n, piece[a - start : b - start]))
            a = b
        start = end
    return parts


def reduce_scatter_scratch_numel(
    group: ProcessGroupInfo,
    output_numel: int,
    *,
    in_place: bool,
    quantize: int | None = None,
) -> int:
    """How many elements of `scratch` a reduce-scatter into `output_numel` elements takes on
    this group (0: none): on gloo, one slice per other rank, less the one a separate output
    receives."""
    if group.group is None or group.backend == "nccl" or quantize is not None:
        return 0
    return max(0, group.world_size - (1 if in_place else 2)) * output_numel


def all_gather(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    async_op: bool = False,
    label: str = "all-gather",
    quantize: int | None = None,
    kind: str = "all_gather",
) -> Pending:
    """Concatenate every rank's `input` (1D) into `output` (world_size * input.numel()).

    `input` is either a separate tensor or exactly this rank's own slice of `output`
    (in place: no copy of it is made). On gloo, whose own all-gather is slow, each rank
    broadcasts its slice instead, N broadcasts in flight at once. A broadcast is a copy, so the
    result is exact, and each rank sends only its own slice. Counted as an all-gather of
    `output` either way.

    `quantize=block_size`: lossy, int8 on the wire (`_all_gather_int8`). Counted under `kind`.
    """
    own, in_place = _own_slice(output, input, group, "all_gather", "output", "input")
    n = input.numel()
    if quantize is not None and group.group is not None:
        return _all_gather_int8(
            output,
            input,
            own,
            in_place,
            group=group,
            stats=stats,
            async_op=async_op,
            label=label,
            block_size=quantize,
        )
    if group.group is None:
        stats.add(kind, _nbytes(output), "local")
        if not in_place:
            own.copy_(input)
        return Pending()
    if group.backend == "gloo":
        stats.add(kind, _nbytes(output), "broadcast of each rank's slice")
        stats.hand(kind, _nbytes(own))
        if not in_place:
            own.copy_(input)
        works = [
            _issue(
                label,
                group,
                lambda r=r: dist.broadcast(
                    output[r * n : (r + 1) * n], group=group.group, group_src=r, async_op=True
                ),
            )
            for r in range(group.world_size)
        ]
        return _finish(_Works(works), label, group, async_op)
    stats.add(kind, _nbytes(output), "all_gather_single")
    stats.hand(kind, _nbytes(own))
    work = _issue(
        label,
        group,
        lambda: _all_gather_single(
            output, own if in_place else input, group=group.group, async_op=True
        ),
    )
    return _finish(work, label, group, async_op)


class _Works:
    """Several works in flight as one (wait for all, completed when all are)."""

    __slots__ = ("works",)

    def __init__(self, works: list):
        self.works = works

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def wait(self) -> None:
        for w in self.works:
            w.wait()


def _own_slice(
    full: torch.Tensor,
    part: torch.Tensor,
    group: ProcessGroupInfo,
    op: str,
    full_is: str,
    part_is: str,
) -> tuple[torch.Tensor, bool]:
    """This rank's slice of `full` (world_size x part.numel() elements), and whether `part` is
    that very slice (in place). Any other overlap between the two is refused."""
    n = part.numel()
    if full.numel() != n * group.world_size:
        raise ValueError(
            f"{op} {full_is} has {full.numel()} elements, expected {group.world_size} x {n}"
        )
    own = full[group.rank * n : (group.rank + 1) * n]
    in_place = part.data_ptr() == own.data_ptr() and part.numel() == n
    if not in_place and _overlaps(part, full):
        raise ValueError(f"{op} {part_is} must be separate from {full_is} or its own slice")
    return own, in_place


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + _nbytes(b) and b0 < a0 + _nbytes(a)


def all_reduce_scalar(
    value: torch.Tensor,
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    op: str = "sum",
    label: str = "all-reduce",
) -> torch.Tensor:
    """Reduce a small tensor (a norm, flags) across the group; returns it."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    stats.add("all_reduce", 2 * _nbytes(value))
    if group.group is not None:
        stats.hand("all_reduce", _nbytes(value))
        work = _issue(
            label,
            group,
            lambda: dist.all_reduce(value, op=ops[op], group=group.group, async_op=True),
        )
        _finish(work, label, group, False)
    return value


def all_gather_object(obj, *, group: ProcessGroupInfo, label: str = "object all-gather") -> list:
    """Every rank's `obj` (small, picklable), in rank order. Not counted: control traffic."""
    if group.group is None:
        return [obj]
    out = [None] * group.world_size
    _issue(label, group, lambda: dist.all_gather_object(out, obj, group=group.group))
    return out


def barrier(*, group: ProcessGroupInfo, label: str = "barrier") -> None:
    if group.group is not None:
        _issue(label, group, lambda: dist.barrier(group=group.group))


def all_gather_row_ids(
    ids: torch.Tensor,
    proven: bool,
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    label: str = "row-id all-gather",
) -> tuple[torch.Tensor, bool]:
    """The sorted union of every rank's `ids` (1D int64), and whether every rank's `proven`
    holds. Two all-gathers, counted as "sparse_index": each rank's (count, proven) pair, then
    its ids padded to the longest."""
    size = group.world_size
    head = torch.tensor([ids.numel(), int(proven)], dtype=torch.int64, device=ids.device)
    heads = head.new_empty(2 * size)
    all_gather(heads, head, group=group, stats=stats, label=label, kind="sparse_index").wait()
    counts = heads[0::2].tolist()
    longest = max(counts)
    padded = ids.new_zeros(longest)
    padded[: ids.numel()].copy_(ids)
    gathered = ids.new_empty(size * longest)
    if longest:
        all_gather(
            gathered, padded, group=group, stats=stats, label=label, kind="sparse_index"
        ).wait()
    pieces = [gathered[r * longest : r * longest + c] for r, c in enumerate(counts)]
    union = torch.unique(torch.cat(pieces)) if pieces else ids.new_zeros(0)
    return union, bool(heads[1::2].all())


def _reduce_scatter_int8(
    output: torch.Tensor,
    input: torch.Tensor,
    own: torch.Tensor,
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    async_op: bool,
    label: str,
    block_size: int,
) -> Pending:
    """Each rank packs the slice every other rank owns once (int8 + fp32 scales), one
    all-to-all delivers them, and the owner sums its own exact slice and the dequantized
    others in fp32. Counted as a reduce-scatter of the packed input."""
    from . import quantize as q

    size, rank, n = group.world_size, group.rank, own.numel()
    m = q.packed_numel(n, block_size)
    send = torch.zeros(size * m, dtype=torch.uint8, device=input.device)
    for r in range(size):
        if r != rank:
            q.pack(input[r * n : (r + 1) * n], block_size, out=send[r * m : (r + 1) * m])
    recv = torch.empty_like(send)
    stats.add("reduce_scatter", size * m, f"int8 all-to-all (block {block_size})")
    stats.hand("reduce_scatter", (size - 1) * m)
    work = _issue(
        label,
        group,
        lambda: dist.all_to_all_single(recv, send, group=group.group, async_op=True),
    )

    def reduce_received() -> None:
        total = own.to(torch.float32)
        for r in range(size):
            if r != rank:
                total += q.unpack(recv[r * m : (r + 1) * m], n, block_size)
        output.copy_(total)

    return _finish(work, label, group, async_op, reduce_received)


def _all_gather_int8(
    output: torch.Tensor,
    input: torch.Tensor,
    own: torch.Tensor,
    in_place: bool,
    *,
    group: ProcessGroupInfo,
    stats: CommStats,
    async_op: bool,
    label: str,
    block_size: int,
) -> Pending:
    """Each rank packs its slice once; the packed slices are gathered (broadcasts on gloo) and
    every slice, this rank's included, is dequantized into `output`, so every rank computes with
    the same values. An in-place `input` (this rank's slice of `output`) is kept exact.
    Counted as an all-gather of the packed output."""
    from . import quantize as q

    size, rank, n = group.world_size, group.rank, input.numel()
    m = q.packed_numel(n, block_size)
    packed = torch.empty(size * m, dtype=torch.uint8, device=input.device)
    q.pack(input, block_size, out=packed[rank * m : (rank + 1) * m])
    stats.add("all_gather", size * m, f"int8 gather (block {block_size})")
    stats.hand("all_gather", m)
    if group.backend == "gloo":
        works = [
            _issue(
                label,
                group,
                lambda r=r: dist.broadcast(
                    packed[r * m : (r + 1) * m], group=group.group, group_src=r, async_op=True
                ),
            )
            for r in range(size)
        ]
        work = _Works(works)
    else:
        mine = packed[rank * m : (rank + 1) * m].clone()
        work = _issue(
            label,
            group,
            lambda: _all_gather_single(packed, mine, group=group.group, async_op=True),
        )

    def unpack_all() -> None:
        for r in range(size):
            if r == rank and in_place:
                continue
            output[r * n : (r + 1) * n].copy_(q.unpack(packed[r * m : (r + 1) * m], n, block_size))

    return _finish(work, label, group, async_op, unpack_all)
