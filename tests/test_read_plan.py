"""Tier 1: the resharding read planner (`partition.plan_reads`), with no processes.

A checkpoint saved by N ranks at one stage is loaded by M ranks at another: every loading rank
asks, per flat unit of its own layout, where the elements of its owned range live in the saved
ranks' slices. Exhaustively over small world sizes and both layout kinds (stage 3: one flat
unit per unit; stages 0-2: units packed into buckets), with tied names, two param groups and
frozen parameters, and every element tagged with (parameter, index): replaying the reads onto
the saved slices must give each loading rank exactly the elements it owns, each read exactly
once, from the right saved rank and offset, and leave its padding unread.
"""

from __future__ import annotations

import itertools

import pytest

from hf_zero.partition import FROZEN, ParamEntry, plan_layout, plan_reads

# A small model: units with uneven sizes, a tied name, two groups and a frozen parameter.
ENTRIES = [
    ParamEntry("wte", (7, 3), "", 0, aliases=("lm_head",)),
    ParamEntry("wpe", (5,), "", 1),
    ParamEntry("h.0.w", (4, 4), "h.0", 0),
    ParamEntry("h.0.b", (3,), "h.0", 1),
    ParamEntry("h.1.w", (4, 4), "h.1", 0),
    ParamEntry("h.1.b", (3,), "h.1", 1),
    ParamEntry("h.1.frozen", (2, 5), "h.1", FROZEN),
    ParamEntry("ln_f", (1,), "", 1),
]
WORLD_SIZES = range(1, 6)
# None: stage 3 (one flat unit per unit and group); ints: stages 0-2 bucket sizes.
BUCKETS = [None, 1, 20, 10_000]


def _saved_slices(layout) -> dict[tuple[int, int], list]:
    """(rank, flat unit) -> that rank's saved slice, each element tagged (name, index) and
    padding tagged None."""
    out = {}
    for fu in layout.flat_units:
        flat = [None] * fu.padded_numel
        for p in fu.params:
            for i in range(p.numel):
                flat[p.offset + i] = (p.name, i)
        for r in range(layout.world_size):
            lo, hi = fu.shard_range(r)
            out[(r, fu.index)] = flat[lo:hi]
    return out


def _owned(fu, rank: int, stage0: bool) -> tuple[int, int]:
    return (0, fu.padded_numel) if stage0 else fu.shard_range(rank)


def _check(src, dst, stage0: bool) -> None:
    saved = _saved_slices(src)
    for fu in dst.flat_units:
        for rank in range(dst.world_size):
            lo, hi = _owned(fu, rank, stage0)
            got = [None] * (hi - lo)
            reads = 0
            for rd in plan_reads(src, fu, lo, hi):
                assert rd.length > 0
                part = saved[(rd.src_rank, rd.src_flat)][rd.src_start : rd.src_start + rd.length]
                assert len(part) == rd.length, rd  # inside the saved slice
                for j, tag in enumerate(part):
                    assert tag is not None, f"{rd} reads saved padding"
                    assert got[rd.dst_start + j] is None, f"{rd} reads an element twice"
                    got[rd.dst_start + j] = tag
                    reads += 1
            want = [None] * (hi - lo)
            for p in fu.params:
                for i in range(p.numel):
                    if lo <= p.offset + i < hi:
                        want[p.offset + i - lo] = (p.name, i)
            assert got == want, (fu.index, rank, lo, hi)
            assert reads == sum(t is not None for t in want)


@pytest.mark.parametrize(
    "saved_ws,loaded_ws", list(itertools.product(WORLD_SIZES, WORLD_SIZES)), ids=str
)
def test_every_element_is_read_once_from_the_right_place(saved_ws, loaded_ws):
    for src_bucket, dst_bucket in itertools.product(BUCKETS, BUCKETS):
        src = plan_layout(ENTRIES, world_size=saved_ws, bucket_size=src_bucket)
        dst = plan_layout(ENTRIES, world_size=loaded_ws, bucket_size=dst_bucket)
        for stage0 in (False, True) if dst_bucket is not None else (False,):
            _check(src, dst, stage0)


def test_a_shifted_read_is_caught():
    """The checker itself can fail: a plan shifted by one element is not accepted."""
    import hf_zero.partition as partition

    src = plan_layout(ENTRIES, world_size=3, bucket_size=None)
    dst = plan_layout(ENTRIES, world_size=2, bucket_size=20)
    real = partition.plan_reads

    def shifted(*args):
        return [
            partition.SliceRead(r.src_rank, r.src_flat, r.src_start + 1, r.dst_start, r.length)
            if i == 0
            else r
            for i, r in enumerate(real(*args))
        ]

    globals()["plan_reads"] = shifted
    try:
        with pytest.raises(AssertionError):
            _check(src, dst, stage0=False)
    finally:
        globals()["plan_reads"] = real


def test_unknown_or_reshaped_parameters_are_refused():
    src = plan_layout(ENTRIES[:-1], world_size=2)
    dst = plan_layout(ENTRIES, world_size=2)
    fu = dst.flat_units[-1]
    with pytest.raises(KeyError, match="parameter 'ln_f' is not in the checkpoint"):
        for f in dst.flat_units:
            plan_reads(src, f, 0, f.padded_numel)
    reshaped = [ParamEntry("wte", (3, 7), "", 0, ("lm_head",)), *ENTRIES[1:]]
    src = plan_layout(reshaped, world_size=2)
    fu = dst.flat_units[0]
    with pytest.raises(ValueError, match=r"'wte' has shape \(3, 7\) in the checkpoint"):
        plan_reads(src, fu, 0, fu.padded_numel)
