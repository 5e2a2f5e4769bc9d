"""hf_zero/schedule.py: the order of collectives, which keeps ranks from deadlocking. Tier 1: no
processes. Each case runs the scheduler for several simulated ranks whose events differ (the
order in which gradients arrive, which parameters get none, which units' outputs the loss uses)
and asserts that every rank issues the same collectives in the same order, exhaustively over
small cases.
"""

from __future__ import annotations

import itertools

import pytest

from hf_zero.schedule import BucketScheduler, GatherSequence

# ---- BucketScheduler ---------------------------------------------------------------------------


class FakeHandle:
    """A reduction in flight: completes when the test says so (or never, until waited on)."""

    def __init__(self, index: int, log: list, done: bool):
        self.index, self.log, self.done = index, log, done

    def is_completed(self) -> bool:
        return self.done


class Rank:
    """One simulated rank: a scheduler whose launches and finishes are logged."""

    def __init__(
        self, order, expected, *, max_inflight=None, blocking=True, complete_at_once=False
    ):
        self.log: list[tuple[str, int]] = []
        self.complete_at_once = complete_at_once
        self.finished: list[int] = []
        self.max_seen = 0
        self.scheduler = BucketScheduler(
            order, expected, self._launch, self._finish, max_inflight, blocking
        )

    def _launch(self, i):
        self.log.append(("launch", i))
        handle = FakeHandle(i, self.log, self.complete_at_once)
        return handle

    def _finish(self, i, handle):
        assert handle.index == i
        self.log.append(("finish", i))
        self.finished.append(i)

    def after_mark(self):
        self.max_seen = max(self.max_seen, len(self.scheduler.inflight))


def _launches(rank: Rank) -> list[int]:
    return [i for kind, i in rank.log if kind == "launch"]


def _events(expected: dict[int, int]) -> list[int]:
    """One mark_ready per parameter: bucket i appears expected[i] times."""
    return [i for i, n in expected.items() for _ in range(n)]


CASES = [
    ([2, 1, 0], {0: 1, 1: 1, 2: 1}),
    ([2, 1, 0], {0: 2, 1: 1, 2: 2}),
    ([3, 2, 1, 0], {0: 1, 1: 2, 2: 1, 3: 1}),
]


@pytest.mark.parametrize("order,expected", CASES)
@pytest.mark.parametrize("max_inflight,blocking", [(None, True), (1, True), (2, True), (1, False)])
def test_every_arrival_order_and_missing_set_launches_in_one_order(
    order, expected, max_inflight, blocking
):
    events = _events(expected)
    want = list(order)
    seen_orders = set()
    # Every arrival order of the gradients, and every subset of them missing on this rank (a
    # parameter that gets no gradient here): the launches are always `order`, each bucket once,
    # and every launched bucket is finished exactly once, in launch order.
    for k in range(len(events) + 1):
        for arrived in itertools.combinations(range(len(events)), k):
            for perm in set(itertools.permutations([events[j] for j in arrived])):
                rank = Rank(order, expected, max_inflight=max_inflight, blocking=blocking)
                for i in perm:
                    rank.scheduler.mark_ready(i)
                    rank.after_mark()
                    launched = _launches(rank)
                    # Launches are a prefix of the order, and never run ahead of readiness.
                    assert launched == want[: len(launched)]
                    for b in launched:
                        assert rank.scheduler.remaining[b] <= 0
                rank.scheduler.flush()
                assert _launches(rank) == want, (perm, rank.log)
                assert rank.finished == want
                assert not rank.scheduler.inflight
                seen_orders.add(tuple(_launches(rank)))
    assert seen_orders == {tuple(want)}


def test_blocking_bounds_the_reductions_in_flight():
    order, expected = [4, 3, 2, 1, 0], {i: 1 for i in range(5)}
    for max_inflight in (1, 2, 3):
        rank = Rank(order, expected, max_inflight=max_inflight, blocking=True)
        for i in order:
            rank.scheduler.mark_ready(i)
            rank.after_mark()
        assert rank.max_seen == max_inflight  # never more, and it does fill up
        rank.scheduler.flush()
        assert rank.finished == order


def test_polling_never_finishes_an_incomplete_reduction_before_the_flush():
    # Stage 3: blocking on a reduction here could wait for a peer that waits for our gather.
    order, expected = [2, 1, 0], {i: 1 for i in range(3)}
    rank = Rank(order, expected, max_inflight=1, blocking=False)
    for i in order:
        rank.scheduler.mark_ready(i)
    assert rank.finished == []  # nothing completed, nothing waited on
    assert len(rank.scheduler.inflight) == 3  # the bound is soft when polling
    rank.scheduler.flush()
    assert rank.finished == order


def test_completed_reductions_are_retired_from_the_front_only():
    order, expected = [2, 1, 0], {i: 1 for i in range(3)}
    rank = Rank(order, expected)
    rank.scheduler.mark_ready(2)
    rank.scheduler.mark_ready(1)
    handles = dict(rank.scheduler.inflight)
    handles[1].done = True  # the second completes first: it must wait behind the first
    rank.scheduler.mark_ready(0)
    assert rank.finished == []
    handles[2].done = True
    rank.scheduler.flush()
    assert rank.finished == [2, 1, 0]


def test_a_new_pass_starts_after_the_flush():
    order, expected = [1, 0], {0: 1, 1: 2}
    rank = Rank(order, expected, complete_at_once=True)
    for _ in range(3):
        for i in (1, 0, 1):
            rank.scheduler.mark_ready(i)
        rank.scheduler.flush()
    assert _launches(rank) == [1, 0] * 3
    assert rank.finished == [1, 0] * 3


# ---- GatherSequence ----------------------------------------------------------------------------

ROOT = ""


class SimRank:
    """One simulated stage-3 rank, driving GatherSequence exactly as ShardedParams does, with the
    units' SHARDED/GATHERED state, and logging every all-gather it issues."""

    def __init__(self, prefetch: bool):
        self.seq = GatherSequence(ROOT, prefetch=prefetch)
        self.gathered: set[str] = set()
        self.issued: list[str] = []

    def gather(self, unit):
        if unit not in self.gathered:
            self.gathered.add(unit)
            self.issued.append(unit)

    def release(self, unit):
        self.gathered.discard(unit)

    def forward(self, units: list[str], needs_grad: set[str]):
        """The root's forward wraps the units' forwards, as an HF model's does."""
        for unit in [ROOT, *units]:
            nxt = self.seq.forward_start(unit)
            self.gather(unit)
            if nxt is not None:
                self.gather(nxt)
            if unit != ROOT:
                self.seq.forward_end(unit, unit in needs_grad)
                self.release(unit)
        self.seq.forward_end(ROOT, ROOT in needs_grad)
        self.release(ROOT)
        self.gathered.clear()  # release_all

    def backward(self, requests: list[str], done_early: set[str]):
        """`requests`: the units whose outputs get a gradient, in arrival order (a unit may ask
        more than once). `done_early`: units whose parameters' gradients all arrive right after
        their first request (so they are released before a later request of theirs)."""
        for unit in requests:
            for u in self.seq.backward_request(unit):
                self.gather(u)
            if not (self.seq.walked(unit) and unit not in self.gathered):
                self.gather(unit)
            if unit in done_early:
                self.release(unit)
        for unit in self.seq.finish_backward():
            self.gather(unit)
            self.release(unit)
        self.gathered.clear()


UNITS = ["h.0", "h.1", "h.2"]


def _request_patterns(asked: list[str]):
    """Every order of every subset of `asked`, some units asking twice."""
    for k in range(len(asked) + 1):
        for subset in itertools.combinations(asked, k):
            for perm in itertools.permutations(subset):
                yield list(perm)
                if perm:
                    yield [*perm, perm[0]]


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("units_used", [UNITS, UNITS[:2], [UNITS[0]]])
def test_every_rank_issues_the_same_gathers_whatever_its_loss_uses(prefetch, units_used):
    # Every rank runs the same forward (the same units, the same outputs needing grad); its loss
    # may use any subset of the units' outputs, reached in any order, so the gradients ask for
    # units in any order, or not at all. Over three steps (the first records the forward order)
    # every rank must issue exactly the same all-gathers in the same order.
    needs_grad = {ROOT, *units_used}
    asked = [ROOT, *units_used]
    reference = None
    for requests in _request_patterns(asked):
        for done_early in ({*requests[:1]}, set(requests)):
            rank = SimRank(prefetch)
            for _ in range(3):
                rank.forward(units_used, needs_grad)
                rank.backward(requests, done_early)
            if reference is None:
                reference = rank.issued
            assert rank.issued == reference, (requests, done_early)
    # And the sequence itself: forward in order (prefetching from the second step), backward
    # from the root, then the units in reverse forward order.
    backward = [ROOT, *units_used[::-1]]
    forward = [ROOT, *units_used]
    assert reference == (forward + backward) * 3


def test_the_backward_sequence_skips_units_whose_outputs_needed_no_grad():
    rank = SimRank(prefetch=True)
    rank.forward(UNITS, needs_grad={ROOT, "h.0", "h.2"})  # h.1 ran under no_grad, say
    assert rank.seq.sequence() == [ROOT, "h.2", "h.0"]
    rank.backward(["h.0"], set())
    assert rank.issued[len(UNITS) + 1 :] == [ROOT, "h.2", "h.0"]


def test_a_rank_whose_loss_reaches_no_unit_still_walks_the_whole_sequence():
    ranks = [SimRank(prefetch=True) for _ in range(2)]
    for rank, requests in zip(ranks, [[ROOT, "h.1"], []]):
        rank.forward(UNITS, needs_grad={ROOT, *UNITS})
        rank.backward(requests, set())
    assert ranks[0].issued == ranks[1].issued


def test_prefetch_names_the_next_unit_once_the_order_is_recorded():
    seq = GatherSequence(ROOT, prefetch=True)
    assert [seq.forward_start(u) for u in (ROOT, *UNITS)] == [None] * 4  # recording
    for u in UNITS:
        seq.forward_end(u, True)
    seq.forward_end(ROOT, True)
    assert [seq.forward_start(u) for u in (ROOT, *UNITS)] == ["h.0", "h.1", "h.2", None]
    # Backward: asking for a unit walks to it and prefetches the next one in the sequence.
    assert seq.backward_request("h.1") == [ROOT, "h.2", "h.1", "h.0"]
    assert seq.walked("h.0") and seq.backward_request("h.0") == []
    assert seq.finish_backward() == []
    assert not seq.in_backward
