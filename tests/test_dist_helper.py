"""scripts/harness/dist.py: the one multi-process gloo helper every tier-2+ test goes through."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

from scripts.harness.dist import run_distributed

# Workers must be module-level functions: spawn pickles them by qualified name.


def _describe_rank(rank: int, world_size: int, tag: str) -> dict:
    return {
        "rank": rank,
        "world_size": world_size,
        "tag": tag,
        "dist_rank": dist.get_rank(),
        "dist_world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "env": {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
        "custom_env": os.environ.get("HF_ZERO_TEST_VAR"),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
        "tensor": torch.full((2, 3), float(rank)),
    }


def _raise_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom")
    # Rank 0 waits for rank 1 in a collective that never completes: it must be killed or fail.
    dist.barrier()
    return rank


def _exit_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    dist.barrier()
    return rank


def _sigkill_self(rank: int, world_size: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return rank


def _sum_ranks(rank: int, world_size: int) -> torch.Tensor:
    t = torch.arange(4, dtype=torch.float32) + 10 * (rank + 1)
    dist.all_reduce(t)
    return t


def _sleep(rank: int, world_size: int, seconds: float) -> int:
    time.sleep(seconds)
    return rank


@pytest.mark.parametrize("world_size", [1, 3])
def test_results_in_rank_order_with_env(world_size):
    out = run_distributed(
        _describe_rank, world_size, "t", env={"HF_ZERO_TEST_VAR": "set-before-start"}
    )
    assert [o["rank"] for o in out] == list(range(world_size))
    assert len({o["pid"] for o in out} | {os.getpid()}) == world_size + 1  # own processes
    for rank, o in enumerate(out):
        assert (o["dist_rank"], o["dist_world_size"]) == (rank, world_size)
        assert o["world_size"] == world_size
        assert o["backend"] == "gloo"
        assert o["tag"] == "t"
        assert o["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
        }
        assert o["custom_env"] == "set-before-start"
        assert o["threads"] == 1
        torch.testing.assert_close(o["tensor"], torch.full((2, 3), float(rank)))
    assert "HF_ZERO_TEST_VAR" not in os.environ  # the parent's environment is restored


def test_rank_error_surfaces_with_traceback():
    with pytest.raises(AssertionError) as info:
        run_distributed(_raise_on_rank_1, 2, timeout=60)
    msg = str(info.value)
    assert "ValueError: boom" in msg
    assert "rank 1: raised" in msg
    assert "rank 1 traceback" in msg
    assert "Traceback (most recent call last)" in msg
    assert "_raise_on_rank_1" in msg  # the frame that raised, not just the message


def test_rank_dying_without_report_is_named():
    start = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_distributed(_exit_on_rank_1, 2, timeout=60)
    msg = str(info.value)
    assert "rank 1 exited with code 3 without reporting a result" in msg
    # Detected by the death, not by waiting for the 60 s deadline.
    assert time.monotonic() - start < 45


def test_rank_killed_by_signal_is_named():
    with pytest.raises(AssertionError) as info:
        run_distributed(_sigkill_self, 1, timeout=60)
    msg = str(info.value)
    assert "rank 0 was killed by signal SIGKILL (exit code -9) without reporting a result" in msg


def test_all_reduce_sums_across_ranks():
    out = run_distributed(_sum_ranks, 2)
    expected = 2 * torch.arange(4, dtype=torch.float32) + 10 + 20
    for t in out:
        torch.testing.assert_close(t, expected)


def test_deadline_kills_and_names_ranks():
    with pytest.raises(AssertionError) as info:
        run_distributed(_sleep, 1, 600.0, timeout=5)
    msg = str(info.value)
    assert "timed out after 5s" in msg
    assert "rank 0: no result reported; still running, so it was killed" in msg


def test_non_module_level_fn_is_rejected():
    with pytest.raises(TypeError, match="module-level function"):
        run_distributed(lambda rank, world_size: rank, 1)
