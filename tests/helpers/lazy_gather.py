"""A test double for `overlap_param_gather`: after-step all-gathers that start only when waited on.

On gloo a gather in flight usually lands within milliseconds, so a reader that forgot to wait
would rarely see stale parameters, and a test of it could not fail reliably. Inside
`lazy_after_step_gathers()`, each all-gather labelled as the one after the optimizer step is
started by its first `wait()`, so a parameter nothing waited for is certainly stale. Every rank
waits in the same order (the hooks run in the model's order), so the collectives still match.
"""

from __future__ import annotations

import contextlib

from hf_zero import comm

AFTER_STEP = "after the optimizer step"  # in the label of `ReplicatedParams.publish`'s gathers


class _Lazy:
    def __init__(self, start):
        self._start, self._pending = start, None

    def is_completed(self) -> bool:
        return False

    def wait(self) -> None:
        if self._pending is None:
            self._pending = self._start()
        self._pending.wait()


@contextlib.contextmanager
def lazy_after_step_gathers():
    real = comm.all_gather

    def all_gather(output, input, *, label="all-gather", async_op=False, **kw):
        if AFTER_STEP not in label or not async_op:
            return real(output, input, label=label, async_op=async_op, **kw)
        return _Lazy(lambda: real(output, input, label=label, async_op=True, **kw))

    comm.all_gather = all_gather
    try:
        yield
    finally:
        comm.all_gather = real
