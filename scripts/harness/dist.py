"""The one way tests run code on several gloo ranks: `run_distributed`.

Each rank is a fresh `spawn`ed process (never fork: torch and gloo hold threads and locks that a
fork would copy half-taken). The parent picks a free TCP port itself, because asking torch for
port 0 hangs some launchers on this machine.

Phases, per call:
1. Parent: pick a free port on 127.0.0.1, apply `env` to its own environment while it starts the
   `world_size` workers (so the workers see it from interpreter start, before any import), then
   restore its environment.
2. Worker: `torch.set_num_threads(1)`, set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
   MASTER_PORT, `init_process_group("gloo", ...)`, run `fn(rank, world_size, *args)`, put
   `(rank, "ok", pickled result)` or `(rank, "error", traceback text)` on the result queue,
   flush the queue, `destroy_process_group()`, then `os._exit(0)`. Skipping interpreter teardown
   is deliberate: about 1 in 5 gloo jobs abort at exit otherwise, after the work is done.
3. Parent: collect one report per rank before the deadline. When a rank reports an error, the
   others get a short grace period (they are often blocked in a collective with the failed rank)
   and are then killed. A rank that dies without reporting (os._exit, SIGKILL, segfault) or the
   deadline passing also kills every remaining worker. Any of these raises AssertionError whose
   message has one line per failed rank and each error's full traceback.

Results are pickled with the standard pickler (tensors included: their storage is copied into
the message), not torch's shared-memory reducer, whose file descriptors die with the worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import timedelta
from typing import Any

__all__ = ["find_free_port", "run_distributed"]

# After one rank reports an error, how long the other ranks may take to report before they are
# killed. They are usually blocked in a collective with the failed rank, which never returns.
ERROR_GRACE_S = 3.0
# After a worker is seen dead without a report, how long to keep draining the queue: its report
# may have been flushed just before it exited.
DRAIN_S = 0.5


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    env: Mapping[str, str | None] | None = None,
    may_die: Collection[int] = (),
    backend: str = "gloo",
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` gloo ranks, each in its own process.

    world_size 1 also runs in a subprocess with a real one-rank process group, so single-rank
    tests exercise exactly the multi-rank code path.

    Args:
        fn: a module-level function (the spawn context pickles it by qualified name, so lambdas,
            closures and functions defined inside a test do not work). It runs with the default
            process group initialised and must not destroy it. Outside pytest, the calling
            script needs the usual `if __name__ == "__main__":` guard (spawn re-imports it).
        world_size: number of ranks (>= 1).
        *args: passed to `fn` after (rank, world_size); must be picklable.
        timeout: seconds for the whole run, process start included; also the gloo collective
            timeout inside the workers.
        env: environment variables for the workers, set before their interpreter starts (so
            also before torch or huggingface_hub is imported). A value of None unsets the name.
        may_die: ranks the test kills on purpose; their exit without a report is expected, and
            their result is None.
        backend: "gloo", or "nccl" with one GPU per rank (rank r on cuda:r, set before the
            process group starts).

    Returns:
        `fn`'s return value from every rank, in rank order. Each must be picklable; tensors are.

    Raises:
        AssertionError: a rank raised (the message holds its full traceback), a rank died without
            reporting (the message names it and its exit code), or the deadline passed (the
            message names the ranks that had not reported).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise TypeError(
            f"run_distributed needs a module-level function (spawned workers import it by name), "
            f"got {fn!r}: {e}"
        ) from None
    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = find_free_port()
    procs: list[mp.process.BaseProcess] = []
    killed: set[int] = set()
    try:
        with _patched_environ(env or {}):
            for rank in range(world_size):
                p = ctx.Process(
                    target=_worker,
                    args=(fn, rank, world_size, port, args, timeout, results_q, backend),
                    name=f"hf_zero-test-rank{rank}",
                )
                p.start()
                procs.append(p)
        reports, failure = _collect(results_q, procs, fn, timeout, set(may_die))
    finally:
        for rank, p in enumerate(procs):
            if p.is_alive():
                killed.add(rank)
                p.kill()
        for p in procs:
            p.join(timeout=10)
        results_q.close()
        results_q.join_thread()

    # In arrival order: the first error is usually the cause, later ones its echoes in collectives.
    errors = {r: payload for r, (status, payload) in reports.items() if status == "error"}
    if failure is None and not errors:
        return [
            None if reports[r][0] == "died" else pickle.loads(reports[r][1])
            for r in range(world_size)
        ]

    lines = [f"run_distributed({_fn_name(fn)}, world_size={world_size}) failed"]
    if failure is not None:
        lines[0] += f": {failure}"
    first_error = next(iter(errors), None)
    for rank, p in enumerate(procs):
        if rank in errors:
            first = " first" if rank == first_error and len(errors) > 1 else ""
            lines.append(f"rank {rank}: raised{first} (traceback below)")
        elif rank in reports:
            lines.append(f"rank {rank}: ok")
        elif rank in killed:
            lines.append(f"rank {rank}: no result reported; still running, so it was killed")
        else:
            lines.append(f"rank {rank}: {_describe_exit(p.exitcode)}, no result reported")
    for rank, tb in errors.items():
        lines.append(f"\n----- rank {rank} traceback -----\n{tb.rstrip()}")
    raise AssertionError("\n".join(lines))


def _collect(
    results_q, procs: list, fn: Callable, timeout: float, may_die: set[int]
) -> tuple[dict[int, tuple[str, Any]], str | None]:
    """Read reports until every rank has reported or something went wrong.

    Returns (reports by rank, None) or (reports so far, why collection stopped early).
    """
    world_size = len(procs)
    reports: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    grace_deadline: float | None = None

    def read(wait: float) -> bool:
        try:
            rank, status, payload = results_q.get(timeout=wait)
        except queue_mod.Empty:
            return False
        reports[rank] = (status, payload)
        return True

    while len(reports) < world_size:
        now = time.monotonic()
        if now > deadline:
            return reports, f"timed out after {timeout:g}s"
        if grace_deadline is None and any(s == "error" for s, _ in reports.values()):
            grace_deadline = now + ERROR_GRACE_S
        if grace_deadline is not None and now > grace_deadline:
            return reports, "a rank raised; the others were killed after a grace period"
        if read(0.05):
            continue
        dead = [r for r, p in enumerate(procs) if r not in reports and p.exitcode is not None]
        if dead:
            # A worker flushes its report before exiting, so it may still be in the pipe.
            drain_until = time.monotonic() + DRAIN_S
            while time.monotonic() < drain_until and len(reports) < world_size:
                read(0.05)
            dead = [r for r in dead if r not in reports]
            for r in [r for r in dead if r in may_die]:
                reports[r] = ("died", procs[r].exitcode)  # expected: the test kills it
            dead = [r for r in dead if r not in may_die]
            if dead:
                codes = ", ".join(f"rank {r} {_describe_exit(procs[r].exitcode)}" for r in dead)
                return reports, f"{codes} without reporting a result"
    return reports, None


def _worker(
    fn: Callable,
    rank: int,
    world_size: int,
    port: int,
    args: tuple,
    timeout: float,
    results_q,
    backend: str,
) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=timedelta(seconds=timeout),
        )
        result = fn(rank, world_size, *args)
        report = (rank, "ok", pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BaseException:
        report = (rank, "error", traceback.format_exc())
    results_q.put(report)
    # Flush the queue's feeder thread before os._exit, or the report can be lost.
    results_q.close()
    results_q.join_thread()
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(0)


@contextlib.contextmanager
def _patched_environ(env: Mapping[str, str | None]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            return f"was killed by signal {-exitcode} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def _fn_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
