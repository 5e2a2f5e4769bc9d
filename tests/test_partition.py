"""hf_zero/partition.py: flat layout math. Tier 1: pure functions, checked exhaustively on small
cases with no process group.

The central check, `_check_layout`, builds real flat buffers from every parameter's values,
cuts them into each rank's shard, and puts every parameter back together from `shard_pieces`:
every element must come back exactly once, and only padding may be left over.
"""

from __future__ import annotations

import itertools
import re
from math import prod

import pytest

from hf_zero.partition import (
    FROZEN,
    ROOT_UNIT,
    FlatUnit,
    Layout,
    ParamEntry,
    ParamSpec,
    pad_to_multiple,
    plan_layout,
)

WORLD_SIZES = [1, 2, 3, 4, 5]
BUCKET_SIZES = [None, 1, 7, 20, 64, 10**9]


def _e(name, shape, unit=ROOT_UNIT, group=0, aliases=()):
    return ParamEntry(name, tuple(shape), unit, group, tuple(aliases))


# Small models: (name, entries in registration order). Sizes are chosen to be awkward: primes,
# scalars, zero-size parameters, units smaller than the world size, and units larger than buckets.
CASES = {
    "one_scalar": [_e("s", ())],
    "one_vector": [_e("v", (7,))],
    "zero_size": [_e("empty", (0,)), _e("w", (3, 2)), _e("empty2", (2, 0))],
    "mixed_root": [_e("a", ()), _e("b", (5,)), _e("c", (3, 3)), _e("d", (2, 1, 3)), _e("e", (1,))],
    "gpt_like": [
        _e("wte.weight", (11, 4), aliases=("lm_head.weight",)),
        _e("wpe.weight", (5, 4)),
        _e("h.0.ln.weight", (4,), "h.0"),
        _e("h.0.ln.bias", (4,), "h.0", group=1),
        _e("h.0.attn.weight", (4, 12), "h.0"),
        _e("h.0.attn.bias", (12,), "h.0", group=1),
        _e("h.1.ln.weight", (4,), "h.1"),
        _e("h.1.ln.bias", (4,), "h.1", group=1),
        _e("h.1.attn.weight", (4, 12), "h.1"),
        _e("h.1.attn.bias", (12,), "h.1", group=1),
        _e("ln_f.weight", (4,)),
        _e("ln_f.bias", (4,), group=1),
    ],
    "frozen_mixed": [
        _e("emb", (6, 3), group=FROZEN),
        _e("u0.w", (3, 3), "u0"),
        _e("u0.frozen", (5,), "u0", group=FROZEN),
        _e("u0.b", (3,), "u0", group=1),
        _e("u1.frozen", (2, 2), "u1", group=FROZEN),
        _e("u1.w", (3, 3), "u1"),
        _e("head", (3,)),
    ],
    "interleaved_units": [
        # Registration order visits a unit, leaves it and comes back.
        _e("u0.a", (2,), "u0"),
        _e("root.a", (3,)),
        _e("u0.b", (5,), "u0"),
        _e("u1.a", (1,), "u1", group=2),
        _e("root.b", (), group=2),
        _e("u1.b", (4,), "u1"),
    ],
    "many_small_units": [_e(f"u{i}.w", (i % 3 + 1,), f"u{i}", group=i % 2) for i in range(9)],
    "big_and_small": [
        _e("big", (40,), "u0"),
        _e("small0", (3,), "u1"),
        _e("small1", (2,), "u2"),
        _e("huge", (9, 9), "u3"),
        _e("tiny", (), "u4"),
    ],
}


def _case_ids():
    for name, entries in CASES.items():
        for ws, bucket in itertools.product(WORLD_SIZES, BUCKET_SIZES):
            yield pytest.param(entries, ws, bucket, id=f"{name}-ws{ws}-bucket{bucket}")


def _unit_group_numel(entries) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for e in entries:
        out[(e.unit, e.group)] = out.get((e.unit, e.group), 0) + prod(e.shape)
    return out


def _check_layout(entries, layout: Layout, world_size: int, bucket_size: int | None) -> None:
    """Every invariant in partition.py's module docstring, by construction and reconstruction."""
    assert layout.world_size == world_size
    by_name = {e.name: e for e in entries}
    seen: list[str] = []
    assert [f.index for f in layout.flat_units] == list(range(len(layout.flat_units)))

    for f in layout.flat_units:
        assert f.world_size == world_size
        # Offsets are contiguous from 0, in registration order, with no gaps.
        offset = 0
        for p in f.params:
            e = by_name[p.name]
            assert p.shape == tuple(e.shape)
            assert p.aliases == tuple(e.aliases)
            assert p.numel == prod(e.shape)
            assert p.offset == offset
            assert e.group == f.group, "a flat unit mixes param groups"
            assert e.unit in f.units
            offset += p.numel
            seen.append(p.name)
        assert f.numel == offset
        assert f.trainable == (f.group != FROZEN)

        # Padding: at the end, to a multiple of world_size, fewer than world_size elements.
        assert f.padded_numel % world_size == 0
        assert 0 <= f.padded_numel - f.numel < world_size
        assert f.shard_numel * world_size == f.padded_numel

        # The shards of all ranks tile [0, padded_numel) exactly, in rank order.
        ranges = [f.shard_range(r) for r in range(world_size)]
        assert ranges[0][0] == 0
        assert ranges[-1][1] == f.padded_numel
        for (_, hi), (next_lo, _) in zip(ranges, ranges[1:], strict=False):
            assert hi == next_lo
        assert all(hi - lo == f.shard_numel for lo, hi in ranges)

        # Build the real flat buffer: each element holds (param name, index), padding holds None.
        flat: list[tuple[str, int] | None] = [None] * f.padded_numel
        for p in f.params:
            for i in range(p.numel):
                flat[p.offset + i] = (p.name, i)
        covered = {p.name: [0] * p.numel for p in f.params}
        for r, (lo, hi) in enumerate(ranges):
            shard = flat[lo:hi]
            used = [False] * f.shard_numel
            last_end = 0
            for piece in f.shard_pieces(r):
                assert piece.length > 0
                assert piece.shard_start >= last_end, "pieces out of flat order or overlapping"
                last_end = piece.shard_start + piece.length
                assert last_end <= f.shard_numel
                assert 0 <= piece.param_start
                assert piece.param_start + piece.length <= piece.param.numel
                for k in range(piece.length):
                    # The shard element is exactly the parameter element the piece claims.
                    assert shard[piece.shard_start + k] == (piece.param.name, piece.param_start + k)
                    covered[piece.param.name][piece.param_start + k] += 1
                    used[piece.shard_start + k] = True
            # What no piece covers is padding, and padding only.
            for k, u in enumerate(used):
                assert u == (shard[k] is not None)
        for name, counts in covered.items():
            assert counts == [1] * len(counts), f"{name}: elements not covered exactly once"

    # Each parameter appears exactly once across the layout.
    assert sorted(seen) == sorted(by_name)
    assert layout.numel == sum(prod(e.shape) for e in entries)
    assert layout.padded_numel == sum(f.padded_numel for f in layout.flat_units)
    assert layout.trainable_numel() == sum(prod(e.shape) for e in entries if e.group != FROZEN)

    # Registration order is kept within every (unit, group).
    for f in layout.flat_units:
        for u in f.units:
            in_layout = [p.name for p in f.params if by_name[p.name].unit == u]
            expected = [e.name for e in entries if e.unit == u and e.group == f.group]
            assert in_layout == expected

    # Each (unit, group) lives in exactly one flat unit: a unit is never split.
    owners: dict[tuple[str, int], list[int]] = {}
    for f in layout.flat_units:
        for u in f.units:
            owners.setdefault((u, f.group), []).append(f.index)
    assert set(owners) == {(e.unit, e.group) for e in entries}
    assert all(len(v) == 1 for v in owners.values())

    # Units in order of first appearance in the flat units; with one flat unit per
    # (unit, group) that is registration order. (Bucketing can pull a later unit of group 0
    # ahead of an earlier unit that only has group 1.)
    unit_order = list(dict.fromkeys(e.unit for e in entries))
    assert sorted(layout.units()) == sorted(unit_order)
    assert layout.units() == list(dict.fromkeys(u for f in layout.flat_units for u in f.units))
    if bucket_size is None:
        assert layout.units() == unit_order

    # Flat units ordered by their first unit, then group, frozen last.
    def key(f: FlatUnit):
        return unit_order.index(f.units[0]), (f.group == FROZEN, f.group)

    assert sorted(layout.flat_units, key=key) == list(layout.flat_units)


# ---------------------------------------------------------------------------------------------
# pad_to_multiple


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [(0, 1, 0), (0, 4, 0), (1, 1, 1), (1, 4, 4), (4, 4, 4), (5, 4, 8), (7, 3, 9), (9, 3, 9)],
)
def test_pad_to_multiple(n, k, expected):
    assert pad_to_multiple(n, k) == expected


def test_pad_to_multiple_exhaustive():
    for n in range(50):
        for k in range(1, 9):
            m = pad_to_multiple(n, k)
            assert m % k == 0 and n <= m < n + k


@pytest.mark.parametrize("k", [0, -3])
def test_pad_to_multiple_bad_k(k):
    with pytest.raises(ValueError, match=re.escape(f"k must be >= 1, got {k}")):
        pad_to_multiple(5, k)


# ---------------------------------------------------------------------------------------------
# plan_layout: invariants over every case, world size and bucket size


@pytest.mark.parametrize(("entries", "world_size", "bucket_size"), list(_case_ids()))
def test_layout_invariants(entries, world_size, bucket_size):
    layout = plan_layout(entries, world_size=world_size, bucket_size=bucket_size)
    _check_layout(entries, layout, world_size, bucket_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_scalar_shard_placement(world_size):
    f = plan_layout([_e("s", ())], world_size=world_size).flat_units[0]
    assert (f.numel, f.padded_numel, f.shard_numel) == (1, world_size, 1)
    assert [len(f.shard_pieces(r)) for r in range(world_size)] == [1] + [0] * (world_size - 1)
    piece = f.shard_pieces(0)[0]
    assert (piece.param_start, piece.shard_start, piece.length) == (0, 0, 1)


def test_shard_pieces_worked_example():
    # a: 5 elements at [0, 5), b: 2x2 at [5, 9); 9 elements padded to 12 over 4 ranks, S = 3.
    f = plan_layout([_e("a", (5,)), _e("b", (2, 2))], world_size=4).flat_units[0]
    assert (f.numel, f.padded_numel, f.shard_numel) == (9, 12, 3)
    assert [f.shard_range(r) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]

    def pieces(r):
        return [(p.param.name, p.param_start, p.shard_start, p.length) for p in f.shard_pieces(r)]

    assert pieces(0) == [("a", 0, 0, 3)]
    assert pieces(1) == [("a", 3, 0, 2), ("b", 0, 2, 1)]
    assert pieces(2) == [("b", 1, 0, 3)]
    assert pieces(3) == []  # all padding


@pytest.mark.parametrize("rank", [-1, 4, 5])
def test_shard_range_bad_rank(rank):
    f = plan_layout([_e("a", (5,))], world_size=4).flat_units[0]
    with pytest.raises(ValueError, match=re.escape(f"rank must be in [0, 4), got {rank}")):
        f.shard_range(rank)
    with pytest.raises(ValueError, match=re.escape(f"rank must be in [0, 4), got {rank}")):
        f.shard_pieces(rank)


# ---------------------------------------------------------------------------------------------
# Stage 3 mode (bucket_size=None): one flat per (unit, group)


@pytest.mark.parametrize("name", list(CASES))
def test_stage3_one_flat_per_unit_and_group(name):
    entries = CASES[name]
    layout = plan_layout(entries, world_size=3, bucket_size=None)
    pairs = [(f.units, f.group) for f in layout.flat_units]
    expected = {(e.unit, e.group) for e in entries}
    assert len(pairs) == len(expected)
    assert {(units[0], g) for units, g in pairs} == expected
    assert all(len(units) == 1 for units, _ in pairs)


def test_stage3_gpt_like_order():
    layout = plan_layout(CASES["gpt_like"], world_size=2)
    assert [(f.units, f.group) for f in layout.flat_units] == [
        (("",), 0),
        (("",), 1),
        (("h.0",), 0),
        (("h.0",), 1),
        (("h.1",), 0),
        (("h.1",), 1),
    ]
    root0 = layout.flat_units[0]
    assert [p.name for p in root0.params] == ["wte.weight", "wpe.weight", "ln_f.weight"]
    assert [p.offset for p in root0.params] == [0, 44, 64]


def test_frozen_group_last_within_each_unit():
    layout = plan_layout(CASES["frozen_mixed"], world_size=2)
    assert [(f.units[0], f.group) for f in layout.flat_units] == [
        ("", 0),
        ("", FROZEN),
        ("u0", 0),
        ("u0", 1),
        ("u0", FROZEN),
        ("u1", 0),
        ("u1", FROZEN),
    ]
    assert [f.trainable for f in layout.flat_units] == [True, False, True, True, False, True, False]
    assert layout.trainable_numel() == 9 + 3 + 9 + 3
    assert layout.numel == 18 + 9 + 5 + 3 + 4 + 9 + 3


# ---------------------------------------------------------------------------------------------
# Bucketed mode (stages 0-2): consecutive units of one group packed up to bucket_size


@pytest.mark.parametrize("bucket_size", [b for b in BUCKET_SIZES if b is not None])
@pytest.mark.parametrize("name", list(CASES))
def test_bucket_packing_is_greedy_and_never_splits(name, bucket_size):
    entries = CASES[name]
    sizes = _unit_group_numel(entries)
    layout = plan_layout(entries, world_size=2, bucket_size=bucket_size)
    by_group: dict[int, list[FlatUnit]] = {}
    for f in layout.flat_units:
        by_group.setdefault(f.group, []).append(f)
        # A bucket over the limit holds exactly one unit (a unit is never split).
        assert f.numel <= bucket_size or len(f.units) == 1
        assert f.numel == sum(sizes[(u, f.group)] for u in f.units)
    unit_order = list(dict.fromkeys(e.unit for e in entries))
    for g, flats in by_group.items():
        # Within a group, buckets take the group's units in order, consecutively.
        units = [u for f in flats for u in f.units]
        assert units == [u for u in unit_order if (u, g) in sizes]
        # Greedy: the next bucket's first unit did not fit in the previous bucket.
        for prev, nxt in zip(flats, flats[1:], strict=False):
            assert prev.numel + sizes[(nxt.units[0], g)] > bucket_size


def test_bucket_keeps_groups_separate():
    # Huge bucket: everything of one group merges, but groups never share a flat unit.
    layout = plan_layout(CASES["gpt_like"], world_size=4, bucket_size=10**9)
    assert [(f.units, f.group) for f in layout.flat_units] == [
        (("", "h.0", "h.1"), 0),
        (("", "h.0", "h.1"), 1),
    ]
    assert [p.name for p in layout.flat_units[1].params] == [
        "ln_f.bias",
        "h.0.ln.bias",
        "h.0.attn.bias",
        "h.1.ln.bias",
        "h.1.attn.bias",
    ]


def test_bucket_worked_example():
    # Units of 40, 3, 2, 81, 1 elements with a bucket of 20.
    layout = plan_layout(CASES["big_and_small"], world_size=3, bucket_size=20)
    assert [f.units for f in layout.flat_units] == [("u0",), ("u1", "u2"), ("u3",), ("u4",)]
    assert [f.numel for f in layout.flat_units] == [40, 5, 81, 1]
    assert [f.padded_numel for f in layout.flat_units] == [42, 6, 81, 3]


def test_bucket_exact_fit_merges():
    entries = [_e("a", (3,), "u0"), _e("b", (4,), "u1"), _e("c", (1,), "u2")]
    layout = plan_layout(entries, world_size=1, bucket_size=7)
    assert [f.units for f in layout.flat_units] == [("u0", "u1"), ("u2",)]


def test_bucket_frozen_kept_apart_and_last():
    layout = plan_layout(CASES["frozen_mixed"], world_size=2, bucket_size=10**9)
    assert [(f.units, f.group) for f in layout.flat_units] == [
        (("", "u0", "u1"), 0),
        (("", "u0", "u1"), FROZEN),
        (("u0",), 1),
    ]


# ---------------------------------------------------------------------------------------------
# Names and aliases


def test_find_by_name_and_alias():
    layout = plan_layout(CASES["gpt_like"], world_size=2)
    f, spec = layout.find("wte.weight")
    f2, spec2 = layout.find("lm_head.weight")
    assert (f, spec) == (f2, spec2)
    assert spec.name == "wte.weight" and spec.aliases == ("lm_head.weight",)
    assert spec.shape == (11, 4) and spec.offset == 0
    # A tied weight is stored once.
    assert layout.numel == sum(prod(e.shape) for e in CASES["gpt_like"])
    f, spec = layout.find("h.1.attn.bias")
    assert f.units == ("h.1",) and f.group == 1 and spec.offset == 4


def test_find_every_name_in_every_case():
    for entries in CASES.values():
        layout = plan_layout(entries, world_size=3, bucket_size=20)
        for e in entries:
            for n in (e.name, *e.aliases):
                f, spec = layout.find(n)
                assert spec.name == e.name
                assert spec in f.params


def test_find_missing_name():
    layout = plan_layout(CASES["gpt_like"], world_size=2)
    with pytest.raises(KeyError, match=re.escape("no parameter named 'nope' in the layout")):
        layout.find("nope")


@pytest.mark.parametrize(
    ("entries", "dup"),
    [
        ([_e("a", (2,)), _e("a", (3,), "u0")], "a"),
        ([_e("a", (2,), aliases=("b",)), _e("b", (3,))], "b"),
        ([_e("a", (2,)), _e("c", (3,), aliases=("a",))], "a"),
        ([_e("a", (2,), aliases=("a",))], "a"),
        ([_e("a", (2,), aliases=("x",)), _e("c", (3,), aliases=("x",))], "x"),
    ],
)
def test_duplicate_names_error(entries, dup):
    with pytest.raises(ValueError, match=re.escape(f"parameter name {dup!r} appears twice")):
        plan_layout(entries, world_size=2)


# ---------------------------------------------------------------------------------------------
# Argument errors and edge cases


@pytest.mark.parametrize("world_size", [0, -1])
def test_bad_world_size(world_size):
    with pytest.raises(ValueError, match=re.escape(f"world_size must be >= 1, got {world_size}")):
        plan_layout([_e("a", (2,))], world_size=world_size)


@pytest.mark.parametrize("bucket_size", [0, -4])
def test_bad_bucket_size(bucket_size):
    expected = f"bucket_size must be a positive number of elements, got {bucket_size}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        plan_layout([_e("a", (2,))], world_size=2, bucket_size=bucket_size)


def test_empty_model():
    layout = plan_layout([], world_size=4)
    assert layout.flat_units == ()
    assert (layout.numel, layout.padded_numel, layout.units()) == (0, 0, [])


def test_layout_is_frozen_and_deterministic():
    a = plan_layout(CASES["gpt_like"], world_size=3, bucket_size=64)
    b = plan_layout(list(CASES["gpt_like"]), world_size=3, bucket_size=64)
    assert a == b
    with pytest.raises(AttributeError):
        a.world_size = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        a.flat_units[0].params[0].offset = 1  # type: ignore[misc]


def test_param_spec_numel():
    assert ParamSpec("s", (), 0).numel == 1
    assert ParamSpec("z", (3, 0), 0).numel == 0
    assert ParamSpec("m", (2, 3, 4), 0).numel == 24


def test_list_shape_is_stored_as_tuple():
    layout = plan_layout([ParamEntry("a", [2, 3], ROOT_UNIT, 0)], world_size=2)  # type: ignore[arg-type]
    assert layout.find("a")[1].shape == (2, 3)
