"""Tier 2: a rank that stops calling collectives, or dies, makes the others fail fast and clearly:
within `collective_timeout_s` plus a margin, with a CollectiveError that says which collective,
in which phase, failed. Nothing hangs.

The scenarios run in scripts/harness/faults.py, shared with scripts/reliability_report.py; these
tests assert on the records they return."""

from __future__ import annotations

from scripts.harness.faults import dead_rank, stalled_rank

TIMEOUT = 3.0
STALL = 4.5


def test_stalled_rank_fails_the_others_within_the_timeout():
    records = stalled_rank(range(4), world_size=3, timeout_s=TIMEOUT, stall_s=STALL)
    # The first collective the others wait in: a gradient bucket's reduction, or the exchange of
    # the sparse position embedding's row ids that comes with it.
    sparse = "row-id all-gather of sparse embedding 'transformer.wpe.weight' (backward)"
    phases = {
        0: ("gradient all-reduce of bucket", sparse),
        1: ("gradient reduce-scatter of bucket", sparse),
        2: ("gradient reduce-scatter of bucket", sparse),
        3: ("all-gather of unit '<root>' (forward)",),
    }
    assert [r.stage for r in records] == [0, 1, 2, 3]
    for record in records:
        stage = record.stage
        assert not record.problems, (stage, record.problems, record.run_error)
        for o in record.ranks[:2]:  # the ranks that kept going
            assert o.status == "raised" and o.error_type == "CollectiveError", (stage, o)
            message = o.message
            assert any(p in message for p in phases[stage]), (o.rank, stage, message)
            assert (
                "a peer rank disappeared or stopped calling collectives within the 3 s" in message
            )
            assert f"rank {o.rank}:" in message
            assert TIMEOUT - 0.5 <= o.elapsed_s <= TIMEOUT + 5, (o.rank, stage, o.elapsed_s)
        assert record.time_to_failure_s <= TIMEOUT + 5


def test_sigkilled_rank_fails_the_others_fast_at_every_stage():
    for stage in range(4):
        record = dead_rank(stage, world_size=3, timeout_s=TIMEOUT)
        assert not record.problems, (stage, record.problems, record.run_error)
        # Rank 2 wrote the moment and SIGKILLed itself mid-backward; it never reported.
        assert record.ranks[2].status == "died" and record.ranks[2].error_type == "SIGKILL"
        for o in record.ranks[:2]:
            assert o.status == "raised" and o.error_type == "CollectiveError", (stage, o)
            message = o.message
            assert (
                f"rank {o.rank}:" in message
                and "a peer rank disappeared or stopped calling" in message
            )
            assert "(backward)" in message or "(optimizer step)" in message, message
            # From the start of the step, so also bounds the time from the kill.
            assert o.elapsed_s <= TIMEOUT + 5, (stage, o.rank, o.elapsed_s, message)
        assert 0 <= record.time_to_failure_s <= TIMEOUT + 5, record.time_to_failure_s
