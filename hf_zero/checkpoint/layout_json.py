"""The flat layout as JSON: the manifest's "layout", its checked reader, and each rank's slice.

`layout_to_json` writes every flat unit with its parameters (name, shape, dtype, offset,
aliases); `layout_from_json` rebuilds a `partition.Layout` from it after checking every field's
type and range and that offsets and sizes follow from the shapes. `layout_slice` is what one
rank's files hold of each flat unit; every shard file carries it in its metadata, so a manifest
whose layout was edited to stay self-consistent but no longer describes the files is caught.
"""

from __future__ import annotations

import math
from typing import Any

from ..partition import FlatUnit, Layout, ParamSpec
from .errors import CheckpointError
from .errors import expect as _expect
from .errors import is_int as _is_int
from .errors import is_str_list as _is_str_list
from .errors import show as _show

__all__ = ["layout_to_json", "layout_from_json", "layout_slice", "MAX_NDIM", "MAX_NUMEL"]

# Bounds on a parameter's shape: no real tensor comes close, and they keep every size computed
# from a manifest a small integer.
MAX_NDIM = 64
MAX_NUMEL = 1 << 48


def layout_to_json(layout: Layout, dtypes: dict[str, str]) -> dict:
    return {
        "world_size": layout.world_size,
        "flat_units": [
            {
                "index": f.index,
                "units": list(f.units),
                "group": f.group,
                "numel": f.numel,
                "padded_numel": f.padded_numel,
                "params": [
                    {
                        "name": p.name,
                        "shape": list(p.shape),
                        "dtype": dtypes.get(p.name, "float32"),
                        "offset": p.offset,
                        "aliases": list(p.aliases),
                    }
                    for p in f.params
                ],
            }
            for f in layout.flat_units
        ],
    }


def layout_slice(layout: Layout, rank: int) -> list[dict]:
    """What rank `rank`'s files hold of each flat unit: its flat range and the parameter pieces
    in it, as [name, start in the parameter, start in the slice, length]. Every shard file
    carries this in its metadata (key "hf_zero")."""
    return [
        {
            "flat": fu.index,
            "range": list(fu.shard_range(rank)),
            "pieces": [
                [p.param.name, p.param_start, p.shard_start, p.length]
                for p in fu.shard_pieces(rank)
            ],
        }
        for fu in layout.flat_units
    ]


def layout_from_json(data: Any, *, where: str) -> tuple[Layout, dict[str, str]]:
    """Rebuild and check a layout; returns it with the parameters' original dtypes.

    Raises:
        CheckpointError: a field of the wrong type or out of range, a name used twice, offsets
            or sizes that do not follow from the shapes.
    """
    _expect(isinstance(data, dict), where, "layout must be an object")
    ws = data.get("world_size")
    _expect(
        _is_int(ws) and ws >= 1, where, f"layout world_size must be a positive int, got {_show(ws)}"
    )
    units = data.get("flat_units")
    _expect(isinstance(units, list), where, "layout flat_units must be a list")
    flats, dtypes, names = [], {}, set()
    for i, u in enumerate(units):
        _expect(isinstance(u, dict) and u.get("index") == i, where, f"flat unit {i} is malformed")
        entries = u.get("params", [])
        unit_names = u.get("units", [])
        _expect(
            isinstance(entries, list) and _is_str_list(unit_names),
            where,
            f"flat unit {i}: params must be a list and units a list of names",
        )
        params, offset = [], 0
        for p in entries:  # messages are built only on failure: layouts can be long
            if not (isinstance(p, dict) and isinstance(p.get("name"), str)):
                raise CheckpointError(f"{where}: flat unit {i}: bad param entry {_show(p)}")
            name, shape, aliases = p["name"], p.get("shape"), p.get("aliases", [])
            if not (
                isinstance(shape, list)
                and len(shape) <= MAX_NDIM
                and all(_is_int(d) and 0 <= d < 2**40 for d in shape)
                and math.prod(shape) <= MAX_NUMEL
            ):
                raise CheckpointError(f"{where}: parameter {name!r}: bad shape {_show(shape)}")
            if p.get("offset") != offset:
                raise CheckpointError(
                    f"{where}: parameter {name!r}: offset {_show(p.get('offset'))}, "
                    f"expected {offset}"
                )
            if not _is_str_list(aliases):
                raise CheckpointError(f"{where}: parameter {name!r}: bad aliases {_show(aliases)}")
            dtype = p.get("dtype", "float32")
            if not isinstance(dtype, str):
                raise CheckpointError(f"{where}: parameter {name!r}: bad dtype {_show(dtype)}")
            for n in (name, *aliases):
                if n in names:
                    raise CheckpointError(f"{where}: parameter name {n!r} appears twice")
                names.add(n)
            spec = ParamSpec(name, tuple(shape), offset, tuple(aliases))
            params.append(spec)
            dtypes[name] = dtype
            offset += spec.numel
        group = u.get("group")
        _expect(_is_int(group) and group >= -1, where, f"flat unit {i}: bad group {_show(group)}")
        fu = FlatUnit(i, tuple(unit_names), group, tuple(params), ws)
        _expect(
            _is_int(u.get("numel"))
            and u.get("numel") == fu.numel
            and _is_int(u.get("padded_numel"))
            and u.get("padded_numel") == fu.padded_numel,
            where,
            f"flat unit {i}: numel {_show(u.get('numel'))}/{_show(u.get('padded_numel'))} "
            "does not match its parameters",
        )
        flats.append(fu)
    return Layout(ws, tuple(flats)), dtypes
