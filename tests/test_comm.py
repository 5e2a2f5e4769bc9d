"""Tier 2: the collectives of `hf_zero.comm`, on real gloo ranks and at world size 1.

gloo runs reduce-scatter as point-to-point sends of each rank's slice to its owner, and
all-gather as one broadcast per rank's slice (comm.py's note). Both are checked for exact
results, with the input separate from the output and in place (the output being the input's
own slice, or the other way round), for the bytes they count, and for the implementation they
record; so are several reduce-scatters in flight at once with the caller's scratch. Values are
small integers, so every sum is exact in fp32 and any wrong element shows.

Also tier 1: the gradient store's buffer pool (`grads._BufferPool`), with no process group;
and the process group's own helpers (`default_world`, `init_process_group`,
`destroy_process_group`), which scripts and integrations use instead of torch.distributed.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from hf_zero import comm
from hf_zero.grads import _BufferPool
from scripts.harness.dist import run_distributed

SHARD = 5  # elements per rank: odd, so no slice is aligned by accident


def _values(rank: int, numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32) * (rank + 1) + 100 * rank


def _collectives_worker(rank: int, world_size: int) -> dict:
    group = comm.resolve_group(None)
    stats = comm.CommStats()
    n = SHARD * world_size
    out = {}

    # reduce-scatter, separate output
    full = _values(rank, n)
    shard = torch.empty(SHARD)
    comm.reduce_scatter(shard, full, group=group, stats=stats, async_op=True).wait()
    out["rs_separate"] = shard.clone()
    # reduce-scatter in place: the output is the input's own slice
    full = _values(rank, n)
    own = full[rank * SHARD : (rank + 1) * SHARD]
    comm.reduce_scatter(own, full, group=group, stats=stats)
    out["rs_in_place"] = own.clone()

    # all-gather, separate input
    gathered = torch.full((n,), -1.0)
    comm.all_gather(gathered, _values(rank, SHARD), group=group, stats=stats, async_op=True).wait()
    out["ag_separate"] = gathered.clone()
    # all-gather in place: the input is the output's own slice, the rest holds junk
    gathered = torch.full((n,), float("nan"))
    gathered[rank * SHARD : (rank + 1) * SHARD] = _values(rank, SHARD)
    comm.all_gather(gathered, gathered[rank * SHARD : (rank + 1) * SHARD], group=group, stats=stats)
    out["ag_in_place"] = gathered.clone()

    # several reduce-scatters in flight at once (distinct tags), with the caller's scratch, waited
    # for in the reverse order of launch
    extra, launched = comm.CommStats(), []
    for tag, in_place in enumerate([True, False, True]):
        full = _values(rank, n) * (tag + 1)
        dst = full[rank * SHARD : (rank + 1) * SHARD] if in_place else torch.empty(SHARD)
        need = comm.reduce_scatter_scratch_numel(group, SHARD, in_place=in_place)
        scratch = torch.full((need,), float("nan")) if need else None
        launched.append(
            (
                dst,
                comm.reduce_scatter(
                    dst, full, group=group, stats=extra, async_op=True, tag=tag, scratch=scratch
                ),
            )
        )
    for _, pending in reversed(launched):
        pending.wait()
    out["rs_many"] = [dst.clone() for dst, _ in launched]

    # polled: the caller only asks is_completed(), so that must turn True without a wait()
    polled_stats, full, dst = comm.CommStats(), _values(rank, n), torch.empty(SHARD)
    pending = comm.reduce_scatter(
        dst, full, group=group, stats=polled_stats, async_op=True, polled=True
    )
    deadline = time.monotonic() + 60
    while not pending.is_completed() and time.monotonic() < deadline:
        time.sleep(0.001)
    out["rs_polled_completed"] = pending.is_completed()
    pending.wait()
    out["rs_polled"], out["rs_polled_path"] = dst.clone(), polled_stats.paths["reduce_scatter"]

    errors = {}
    if comm.reduce_scatter_scratch_numel(group, SHARD, in_place=True):
        try:
            comm.reduce_scatter(
                torch.empty(SHARD),
                _values(rank, n),
                group=group,
                stats=comm.CommStats(),
                scratch=torch.empty(1),
            )
        except ValueError as e:
            errors["rs_scratch"] = str(e)
    base = torch.zeros(n + 1)
    buf, shifted = base[:n], base[1 : SHARD + 1]  # shifted overlaps buf but is no rank's slice
    for name, call in {
        "rs_overlap": lambda: comm.reduce_scatter(
            shifted, buf, group=group, stats=comm.CommStats()
        ),
        "ag_overlap": lambda: comm.all_gather(buf, shifted, group=group, stats=comm.CommStats()),
        "rs_size": lambda: comm.reduce_scatter(
            torch.zeros(SHARD + 1), buf, group=group, stats=comm.CommStats()
        ),
    }.items():
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    out["bytes"] = dict(stats.bytes)
    out["calls"] = dict(stats.calls)
    out["paths"] = dict(stats.paths)
    return out


@pytest.mark.parametrize("world_size", [None, 1, 2, 3, 4])
def test_reduce_scatter_and_all_gather_are_exact(world_size):
    """world_size None: no process group at all (the local path), in this process."""
    if world_size is None:
        assert not torch.distributed.is_initialized()
        results, world_size, local = [_collectives_worker(0, 1)], 1, True
    else:
        results, local = run_distributed(_collectives_worker, world_size, timeout=120), False
    n = SHARD * world_size
    total = sum(_values(r, n) for r in range(world_size))
    concat = torch.cat([_values(r, SHARD) for r in range(world_size)])
    for rank, r in enumerate(results):
        want = total[rank * SHARD : (rank + 1) * SHARD]
        assert torch.equal(r["rs_separate"], want), (rank, r["rs_separate"], want)
        assert torch.equal(r["rs_in_place"], want), (rank, r["rs_in_place"], want)
        for k, got in enumerate(r["rs_many"]):
            assert torch.equal(got, want * (k + 1)), (rank, k, got, want)
        assert r["rs_polled_completed"] and torch.equal(r["rs_polled"], want), r["rs_polled"]
        # gloo's point-to-point path too (half an all-reduce's bytes), waited on by a thread
        assert r["rs_polled_path"] == ("local" if local else "send/recv of each rank's slice")
        assert torch.equal(r["ag_separate"], concat), (rank, r["ag_separate"])
        assert torch.equal(r["ag_in_place"], concat), (rank, r["ag_in_place"])
        # The ZeRO paper's accounting: the full buffer of each collective, 4 bytes an element.
        assert r["bytes"] == {"reduce_scatter": 2 * 4 * n, "all_gather": 2 * 4 * n}, r["bytes"]
        assert r["calls"] == {"reduce_scatter": 2, "all_gather": 2}, r["calls"]
        if local:
            assert r["paths"] == {"reduce_scatter": "local", "all_gather": "local"}
        else:
            assert r["paths"] == {
                "reduce_scatter": "send/recv of each rank's slice",
                "all_gather": "broadcast of each rank's slice",
            }
        scratch_error = {}
        if world_size > 1 and not local:  # a separate output receives one slice itself
            scratch_error["rs_scratch"] = (
                f"reduce_scatter scratch must be {(world_size - 2) * SHARD} elements of "
                "torch.float32, separate from input; got 1 of torch.float32"
            )
        assert r["errors"] == {
            **scratch_error,
            "rs_overlap": "reduce_scatter output must be separate from input or its own slice",
            "ag_overlap": "all_gather input must be separate from output or its own slice",
            "rs_size": f"reduce_scatter input has {n} elements, expected {world_size} x "
            f"{SHARD + 1}",
        }, r["errors"]


def test_buffer_pool_reuses_only_a_buffer_of_the_same_size_and_kind():
    pool = _BufferPool(keep=1)
    a = pool.take(8, torch.float32, torch.device("cpu"))
    pool.give(a)
    assert pool.take(8, torch.float32, torch.device("cpu")) is a
    pool.give(a)
    other = pool.take(9, torch.float32, torch.device("cpu"))
    assert other is not a and other.numel() == 9
    assert pool.take(8, torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16
    assert pool.take(8, torch.float32, torch.device("cpu")) is a  # still kept


def test_buffer_pool_keeps_at_most_keep_and_nothing_after_clear():
    pool = _BufferPool(keep=1)
    a, b = (pool.take(4, torch.float32, torch.device("cpu")) for _ in range(2))
    pool.give(a)
    pool.give(b)  # a is dropped: one free buffer is kept
    assert pool.take(4, torch.float32, torch.device("cpu")) is b
    assert pool.take(4, torch.float32, torch.device("cpu")) is not a
    pool.give(b)
    pool.clear()
    assert pool.take(4, torch.float32, torch.device("cpu")) is not b


# ---- the process group: default_world, init_process_group, destroy_process_group ----------------


def test_default_world_without_a_process_group():
    assert comm.default_world() == comm.WorldInfo(False, 0, 1, None)
    comm.destroy_process_group()  # a no-op when there is none
    assert not comm.default_world().initialized


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "mpi"}, "backend must be one of gloo, nccl or None, got 'mpi'"),
        (
            {"timeout_s": float("inf")},
            "timeout_s must be a number of seconds from 1 to 604800 (7 days) or None, got inf",
        ),
        (
            {"timeout_s": 1e-9},
            "timeout_s must be a number of seconds from 1 to 604800 (7 days) or None, got 1e-09",
        ),
    ],
)
def test_init_process_group_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        comm.init_process_group(**kwargs)
    assert not comm.default_world().initialized


def test_init_process_group_without_a_launcher_names_the_missing_variables(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "init_process_group needs the launcher's environment variables; RANK, WORLD_SIZE, "
            "MASTER_PORT are not set. Start the script with torchrun or accelerate launch, or, "
            "for one process, do not call it: the engine runs as world size 1 without a process "
            "group"
        )
        + "$",
    ):
        comm.init_process_group()
    assert not comm.default_world().initialized


def _init_worker(rank, world_size, port):
    import os

    out = {"given": comm.default_world()}
    comm.destroy_process_group()
    out["destroyed"] = comm.default_world()
    os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous: the first one's port is gone
    out["joined"] = comm.init_process_group(timeout_s=60)
    out["again"] = comm.init_process_group()  # already initialised: the world as it is
    try:
        comm.init_process_group("nccl")
    except ValueError as e:
        out["other_backend"] = str(e)
    # The new world works: one engine-style collective over it.
    group = comm.resolve_group(None)
    t = torch.tensor([float(rank + 1)])
    comm.all_reduce(t, group=group, stats=comm.CommStats())
    out["sum"] = t.item()
    return out


def test_init_process_group_joins_the_launchers_world_from_the_environment():
    from scripts.harness.dist import find_free_port

    results = run_distributed(_init_worker, 2, find_free_port(), timeout=120)
    for rank, out in enumerate(results):
        assert out["given"] == comm.WorldInfo(True, rank, 2, "gloo")
        assert out["destroyed"] == comm.WorldInfo(False, 0, 1, None)
        assert out["joined"] == out["again"] == comm.WorldInfo(True, rank, 2, "gloo")
        assert out["other_backend"] == (
            f"torch.distributed is already initialised with backend 'gloo' (rank {rank} of 2), "
            "not 'nccl'; call destroy_process_group() first, or pass backend=None to join it as "
            "it is"
        )
        assert out["sum"] == 3.0


def test_waited_works_complete_and_raise_on_the_callers_thread():
    """waiter.Waited: completion seen without a wait(); a failure re-raised by wait()."""
    import threading

    from hf_zero.waiter import Waited

    class Work:
        def __init__(self, gate, error=None):
            self.gate, self.error, self.waited_on = gate, error, None

        def wait(self):
            self.gate.wait(timeout=60)
            self.waited_on = threading.current_thread().name
            if self.error is not None:
                raise self.error

    gate = threading.Event()
    ok = Waited([Work(gate), Work(gate)])
    bad = Waited([Work(gate, RuntimeError("peer gone"))])
    assert not ok.is_completed() and not bad.is_completed()
    gate.set()
    deadline = time.monotonic() + 60
    while not (ok.is_completed() and bad.is_completed()) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert ok.is_completed() and bad.is_completed()
    ok.wait()
    assert {w.waited_on for w in ok.works} == {"hf_zero-waiter"}
    with pytest.raises(RuntimeError, match="peer gone"):
        bad.wait()


# ---- reduce_scatter_pieces: the same sum, sent straight from the pieces ------------------------


def _pieces_worker(rank: int, world_size: int) -> dict:
    group = comm.resolve_group(None)
    n = 7  # elements per rank
    g = torch.Generator().manual_seed(rank)
    full = torch.randn(n * world_size, generator=g)
    # Cuts that fall inside slices, on slice boundaries, and a piece spanning several slices;
    # an empty piece too.
    cuts = sorted({0, 3, n, n + 1, 2 * n - 1, n * world_size} | {n * world_size // 2})
    cuts = [c for c in cuts if c <= n * world_size]
    pieces = [full[a:b].clone() for a, b in zip(cuts, cuts[1:])] + [torch.empty(0)]
    out = {}
    stats_packed, stats_pieces = comm.CommStats(), comm.CommStats()
    expected = torch.empty(n)
    comm.reduce_scatter(expected, full.clone(), group=group, stats=stats_packed)
    got = torch.full((n,), float("nan"))
    pending = comm.reduce_scatter_pieces(
        got, pieces, group=group, stats=stats_pieces, async_op=True, tag=3
    )
    pending.wait()
    out["expected"], out["got"] = expected, got
    out["bytes"] = (dict(stats_packed.bytes), dict(stats_pieces.bytes))
    out["paths"] = (dict(stats_packed.paths), dict(stats_pieces.paths))
    out["pieces_unchanged"] = torch.equal(torch.cat(pieces), full)
    errors = {}
    for name, call in {
        "total": lambda: comm.reduce_scatter_pieces(
            torch.empty(n), [full[:-1]], group=group, stats=comm.CommStats()
        ),
        "dtype": lambda: comm.reduce_scatter_pieces(
            torch.empty(n), [full.double()], group=group, stats=comm.CommStats()
        ),
    }.items():
        try:
            call()
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_reduce_scatter_pieces_equals_reduce_scatter_bit_for_bit(world_size):
    for r in run_distributed(_pieces_worker, world_size, timeout=120):
        assert torch.equal(r["got"], r["expected"]), (r["got"], r["expected"])
        assert r["pieces_unchanged"]
        assert r["bytes"][0] == r["bytes"][1] and r["paths"][0] == r["paths"][1]
        assert r["errors"] == {
            "total": f"reduce_scatter_pieces pieces have {7 * world_size - 1} elements, "
            f"expected {world_size} x 7",
            "dtype": "reduce_scatter_pieces pieces must be torch.float32 on cpu like output",
        }, r["errors"]
