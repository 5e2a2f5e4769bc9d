"""Completion that can be polled, for works that report it only once waited on.

gloo's point-to-point works (`isend` / `irecv`) say `is_completed() == False` until someone calls
`wait()` on them, however long ago the bytes arrived. Stage 3 must never block in backward on a
gradient reduction (`StagePlan.poll_reductions`), so it could only retire such works at the end
of backward, with every bucket's buffers alive until then. `Waited` hands the works to one
background thread that waits on them, in the order they were launched; `is_completed()` turns
true when that thread has seen them all finish. `Work.wait` releases the GIL, so the thread
costs the training thread nothing while it waits.

One thread per process, started on first use and again in a forked child (a fork keeps no
threads). A failure seen by the thread is re-raised by `wait()` on the caller's thread, where
`comm.Pending` names the collective.
"""

from __future__ import annotations

import os
import queue
import threading

__all__ = ["Waited"]

_lock = threading.Lock()
_jobs: queue.SimpleQueue | None = None


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        jobs.get()._wait_all()


def _queue() -> queue.SimpleQueue:
    global _jobs
    with _lock:
        if _jobs is None:
            _jobs = queue.SimpleQueue()
            threading.Thread(
                target=_serve, args=(_jobs,), name="hf_zero-waiter", daemon=True
            ).start()
        return _jobs


def _forget_in_child() -> None:
    global _jobs, _lock
    _jobs, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


class Waited:
    """Works in flight as one, waited on by the waiter thread: `is_completed()` never blocks
    and turns true once all are done; `wait()` blocks until then and raises what failed."""

    __slots__ = ("works", "_done", "_error")

    def __init__(self, works: list):
        self.works = works
        self._done = threading.Event()
        self._error: BaseException | None = None
        _queue().put(self)

    def _wait_all(self) -> None:  # on the waiter thread
        try:
            for w in self.works:
                w.wait()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self._error = e
        finally:
            self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error
