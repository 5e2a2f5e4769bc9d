"""The order collectives are issued in: the logic that keeps ranks from deadlocking.

Collectives pair up by their position in a group's sequence, so every rank must issue the same
collectives in the same order, whatever its data does. Two places decide an order from events
that differ between ranks, and both live here, free of tensors and process groups:

- `BucketScheduler`: gradient reductions. Buckets become ready as backward produces their
  gradients, in an order (and a set: a parameter may get no gradient on one rank) that depends
  on the loss. Reductions launch in one fixed order instead: a bucket that is ready early waits
  for the ones before it, and the end of backward launches every remaining bucket.
- `GatherSequence`: stage 3's parameter all-gathers. Forward runs the same modules everywhere,
  so its order is fixed. In backward, which unit's output gets its gradient first depends on the
  loss. So backward walks one sequence, the same on every rank: the root, then the units in
  reverse forward order, keeping those whose outputs needed grad. A unit that asks is gathered
  together with every unit before it in the sequence, the next one is prefetched, and at the end
  of backward the units nobody asked for are gathered (and freed) too, so every rank has issued
  the whole sequence.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["BucketScheduler", "GatherSequence"]


class BucketScheduler:
    """Launch one reduction per bucket, in a fixed order, as buckets become ready.

    `launch(i)` starts bucket i's reduction and returns a handle with `is_completed()`;
    `finish(i, handle)` waits for it and applies the result. Finished buckets are retired from
    the front, in launch order, as soon as they complete. With `max_inflight`, a launch that
    leaves more buckets in flight blocks on the oldest one (`blocking=True`), or only retires
    what has completed (`blocking=False`, stage 3: see `StagePlan.poll_reductions`).
    """

    def __init__(
        self,
        order: list[int],
        expected: dict[int, int],
        launch: Callable[[int], object],
        finish: Callable[[int, object], None],
        max_inflight: int | None = None,
        blocking: bool = True,
    ):
        """`order`: bucket indices in launch order. `expected[i]`: how many `mark_ready(i)`
        calls make bucket i ready (its parameters)."""
        self.order, self.expected = order, expected
        self._launch, self._finish, self.max_inflight = launch, finish, max_inflight
        self.blocking = blocking
        self.inflight: deque = deque()
        self.reset()

    def reset(self) -> None:
        """Start a new pass (nothing may be in flight)."""
        self.remaining = dict(self.expected)
        self._next = 0

    def mark_ready(self, index: int) -> None:
        """One more parameter of bucket `index` has its gradient."""
        self.remaining[index] -= 1
        while self._next < len(self.order) and self.remaining[self.order[self._next]] <= 0:
            self._launch_next()

    def _launch_next(self) -> None:
        i = self.order[self._next]
        self._next += 1
        self.inflight.append((i, self._launch(i)))
        while self.inflight and self.inflight[0][1].is_completed():
            self._finish(*self.inflight.popleft())
        while (
            self.blocking
            and self.max_inflight is not None
            and len(self.inflight) > self.max_inflight
        ):
            self._finish(*self.inflight.popleft())

    def flush(self) -> None:
        """Launch every bucket not yet launched, wait for all, and start a new pass."""
        while self._next < len(self.order):
            self._launch_next()
        while self.inflight:
            self._finish(*self.inflight.popleft())
        self.reset()


class GatherSequence:
    """Which units stage 3 gathers, in which order: forward, backward and the end of backward.

    The caller owns the units' state (sharded or gathered) and issues the all-gathers; this
    class only says which units to start gathering, in order, at each event:
    - `forward_start(unit)`: the unit's forward begins (the caller gathers it and waits);
      returns the unit to prefetch next, or None;
    - `forward_end(unit, needs_grad)`: its forward ended; `needs_grad`: an output needs grad, so
      the unit will be asked for in backward;
    - `backward_request(unit)`: a gradient reached an output of `unit`; returns the units to
      start gathering now, in sequence order. Afterwards `walked(unit)` says whether this pass
      has already issued the unit's gather; if not (a unit outside the sequence), the caller
      gathers it itself;
    - `finish_backward()`: returns the units of the sequence not yet issued (the caller gathers
      and frees each), and starts a new pass.
    """

    def __init__(self, root: str, *, prefetch: bool):
        self.root, self.prefetch = root, prefetch
        self.forward_order: list[str] = []  # the units after the root, as the first forward ran
        self._recorded = False
        self._recording = False
        self._backward_units: set[str] = set()  # outputs needed grad, since the last backward
        self._seq: list[str] | None = None  # this backward's sequence; None outside backward
        self._cursor = 0

    # ---- forward -------------------------------------------------------------------------------

    def forward_start(self, unit: str) -> str | None:
        if unit == self.root:
            self._recording = not self._recorded
        elif self._recording and unit not in self.forward_order:
            self.forward_order.append(unit)
        if not (self.prefetch and self._recorded):
            return None
        order = self.forward_order
        if unit == self.root:
            nxt = 0
        else:
            nxt = order.index(unit) + 1 if unit in order else len(order)
        return order[nxt] if nxt < len(order) else None

    def forward_end(self, unit: str, needs_grad: bool) -> None:
        if unit == self.root and self._recording:
            self._recording = False
            self._recorded = True
        if needs_grad:
            self._backward_units.add(unit)

    # ---- backward ------------------------------------------------------------------------------

    @property
    def in_backward(self) -> bool:
        """A backward pass has asked for a unit and not finished yet."""
        return self._seq is not None

    def sequence(self) -> list[str]:
        """The backward sequence for the units asked for since the last backward."""
        order = [self.root] + self.forward_order[::-1]
        order += sorted(u for u in self._backward_units if u not in order)
        return [u for u in order if u in self._backward_units]

    def backward_request(self, unit: str) -> list[str]:
        if self._seq is None:
            self._seq, self._cursor = self.sequence(), 0
        issue: list[str] = []
        if unit in self._seq[self._cursor :]:
            while True:
                issue.append(self._seq[self._cursor])
                self._cursor += 1
                if issue[-1] == unit:
                    break
            if self.prefetch and self._cursor < len(self._seq):
                issue.append(self._seq[self._cursor])
                self._cursor += 1
        return issue

    def walked(self, unit: str) -> bool:
        """Whether this backward pass has already issued `unit`'s gather."""
        return self._seq is not None and unit in self._seq[: self._cursor]

    def finish_backward(self) -> list[str]:
        if self._seq is None and self._backward_units:
            # No output of this rank's units got a gradient, but other ranks' may have.
            self._seq, self._cursor = self.sequence(), 0
        rest = [] if self._seq is None else self._seq[self._cursor :]
        self._seq, self._cursor, self._backward_units = None, 0, set()
        return rest
