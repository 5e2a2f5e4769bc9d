"""Flat layout: where every parameter lives in the flat buffers, and which slice each rank owns.

Pure functions over names, shapes and ints; no tensors, no process group. The engine, the
checkpoint writer and the resharding loader all read the same `Layout`, so a checkpoint saved at
one world size can be mapped onto another by arithmetic alone.

Invariants:
- A flat unit holds the parameters of one or more units of ONE param group (or only frozen
  parameters, group `FROZEN`), back to back in registration order, then zero padding up to a
  multiple of `world_size`.
- Rank r owns the flat slice [r*S, (r+1)*S), S = padded_numel // world_size. Padding is always at
  the end, so it falls in the last ranks' slices, and it is fewer than world_size elements.
- Each parameter (by identity) appears once; tied names are recorded as aliases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

__all__ = [
    "FROZEN",
    "ROOT_UNIT",
    "ParamEntry",
    "ParamSpec",
    "FlatUnit",
    "ShardPiece",
    "Layout",
    "pad_to_multiple",
    "plan_layout",
    "SliceRead",
    "plan_reads",
]

FROZEN = -1
"""Group index of flat units that hold parameters with requires_grad=False."""

ROOT_UNIT = ""
"""Name of the root unit: every parameter not inside a unit module."""


def pad_to_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n (n >= 0, k >= 1)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return -(-n // k) * k


@dataclass(frozen=True)
class ParamEntry:
    """One distinct parameter as the engine found it on the model (input to `plan_layout`)."""

    name: str
    shape: tuple[int, ...]
    unit: str
    group: int
    aliases: tuple[str, ...] = ()
    solo: bool = False
    """Placed in a flat unit of its own (a sparse embedding gradient, reduced as one piece)."""


@dataclass(frozen=True)
class ParamSpec:
    """A parameter's place in its flat unit."""

    name: str
    shape: tuple[int, ...]
    offset: int
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class ShardPiece:
    """The part of one parameter that falls in one rank's shard.

    Elements [param_start, param_start + length) of the flattened parameter sit at
    [shard_start, shard_start + length) of the rank's shard.
    """

    param: ParamSpec
    param_start: int
    shard_start: int
    length: int


@dataclass(frozen=True)
class FlatUnit:
    index: int
    units: tuple[str, ...]
    group: int
    params: tuple[ParamSpec, ...]
    world_size: int

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def padded_numel(self) -> int:
        return pad_to_multiple(self.numel, self.world_size)

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world_size

    @property
    def trainable(self) -> bool:
        return self.group != FROZEN

    def shard_range(self, rank: int) -> tuple[int, int]:
        """[lo, hi) of the flat buffer owned by `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        s = self.shard_numel
        return rank * s, (rank + 1) * s

    def shard_pieces(self, rank: int) -> list[ShardPiece]:
        """The parameter pieces inside `rank`'s shard, in flat order (padding excluded)."""
        return self.pieces_in(*self.shard_range(rank))

    def pieces_in(self, lo: int, hi: int) -> list[ShardPiece]:
        """The parameter pieces inside the flat range [lo, hi); shard_start is relative to lo."""
        pieces = []
        for p in self.params:
            start, end = max(lo, p.offset), min(hi, p.offset + p.numel)
            if start < end:
                pieces.append(ShardPiece(p, start - p.offset, start - lo, end - start))
        return pieces


@dataclass(frozen=True)
class Layout:
    world_size: int
    flat_units: tuple[FlatUnit, ...]

    @property
    def numel(self) -> int:
        """Distinct parameter elements (Ψ), padding excluded."""
        return sum(f.numel for f in self.flat_units)

    @property
    def padded_numel(self) -> int:
        return sum(f.padded_numel for f in self.flat_units)

    def trainable_numel(self) -> int:
        return sum(f.numel for f in self.flat_units if f.trainable)

    def units(self) -> list[str]:
        """Unit names in first-appearance order."""
        seen: dict[str, None] = {}
        for f in self.flat_units:
            for u in f.units:
                seen.setdefault(u)
        return list(seen)

    def find(self, name: str) -> tuple[FlatUnit, ParamSpec]:
        """The flat unit and spec of a parameter, by its name or one of its aliases."""
        for f in self.flat_units:
            for p in f.params:
                if p.name == name or name in p.aliases:
                    return f, p
        raise KeyError(f"no parameter named {name!r} in the layout")


def plan_layout(
    entries: Sequence[ParamEntry], *, world_size: int, bucket_size: int | None = None
) -> Layout:
    """Place parameters into flat units.

    Args:
        entries: distinct parameters in model registration order.
        world_size: number of ranks the flat buffers are sharded over (padding multiple).
        bucket_size: None gives one flat unit per (unit, group) (stage 3). An int packs
            consecutive units of the same group into one flat unit until adding the next unit
            would exceed `bucket_size` elements (stages 0-2); a unit is never split, except
            that a `solo` entry always gets a flat unit of its own, right after its unit's.

    Returns:
        Layout whose flat units are ordered by their first unit, then by group (frozen last).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if bucket_size is not None and bucket_size < 1:
        raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size}")
    names: set[str] = set()
    unit_order: dict[str, int] = {}
    by_unit_group: dict[tuple[str, int], list[ParamEntry]] = {}
    for e in entries:
        for n in (e.name, *e.aliases):
            if n in names:
                raise ValueError(f"parameter name {n!r} appears twice in the layout")
            names.add(n)
        unit_order.setdefault(e.unit, len(unit_order))
        by_unit_group.setdefault((e.unit, e.group), []).append(e)

    def group_key(g: int) -> int:
        return g if g != FROZEN else 1 << 30

    keys = sorted(by_unit_group, key=lambda k: (unit_order[k[0]], group_key(k[1])))
    # Each entry of `chunks` becomes a flat unit: (units, group, params).
    chunks: list[tuple[list[str], int, list[ParamEntry]]] = []
    open_chunk: dict[int, tuple[list[str], int, list[ParamEntry]]] = {}
    for u, g in keys:
        ps = [p for p in by_unit_group[(u, g)] if not p.solo]
        n = sum(prod(p.shape) for p in ps)
        cur = open_chunk.get(g)
        if not ps:
            pass
        elif bucket_size is None:
            chunks.append(([u], g, ps))
        elif cur is not None and sum(prod(p.shape) for p in cur[2]) + n <= bucket_size:
            cur[0].append(u)
            cur[2].extend(ps)
        else:
            cur = ([u], g, list(ps))
            open_chunk[g] = cur
            chunks.append(cur)
        chunks.extend(([u], g, [p]) for p in by_unit_group[(u, g)] if p.solo)
    flat_units = []
    for i, (units, g, ps) in enumerate(chunks):
        offset, specs = 0, []
        for p in ps:
            specs.append(ParamSpec(p.name, tuple(p.shape), offset, tuple(p.aliases)))
            offset += prod(p.shape)
        flat_units.append(FlatUnit(i, tuple(units), g, tuple(specs), world_size))
    return Layout(world_size, tuple(flat_units))


@dataclass(frozen=True)
class SliceRead:
    """Copy `length` elements of source rank `src_rank`'s shard of source flat unit `src_flat`,
    from `src_start`, to `dst_start` of the destination buffer."""

    src_rank: int
    src_flat: int
    src_start: int
    dst_start: int
    length: int


def plan_reads(src: Layout, dst: FlatUnit, lo: int, hi: int) -> list[SliceRead]:
    """Where the elements [lo, hi) of destination flat unit `dst` live in a checkpoint saved with
    layout `src` (any world size, any stage). Parameters are matched by name; padding is left
    out (the destination keeps zeros there).

    Raises:
        KeyError: a parameter of `dst` is not in `src`.
        ValueError: a parameter's shape differs.
    """
    where = {}
    for f in src.flat_units:
        for p in f.params:
            where[p.name] = (f, p)
    reads = []
    for piece in dst.pieces_in(lo, hi):
        if piece.param.name not in where:
            raise KeyError(f"parameter {piece.param.name!r} is not in the checkpoint")
        f, p = where[piece.param.name]
        if tuple(p.shape) != tuple(piece.param.shape):
            raise ValueError(
                f"parameter {p.name!r} has shape {tuple(p.shape)} in the checkpoint but "
                f"{tuple(piece.param.shape)} in the model"
            )
        element = p.offset + piece.param_start  # in the source flat unit
        remaining, dst_start = piece.length, piece.shard_start
        while remaining:
            rank, start = divmod(element, f.shard_numel)
            n = min(remaining, f.shard_numel - start)
            reads.append(SliceRead(rank, f.index, start, dst_start, n))
            element, dst_start, remaining = element + n, dst_start + n, remaining - n
    return reads
