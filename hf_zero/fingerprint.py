"""What every rank must agree on before training: the config, the model's parameters and the
optimizer. Pure; the engine compares the digests across ranks with one small collective at
`initialize`, and only when they differ exchanges the descriptions to name the first difference
and the ranks involved. Without it, such a job hangs in a mismatched collective or trains
garbage."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .config import ZeroConfig
from .partition import ParamEntry

__all__ = ["describe", "digest", "first_difference", "format_path", "disagreement_message"]


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


def describe(
    config: ZeroConfig,
    entries: list[ParamEntry],
    model: torch.nn.Module,
    optimizer,
    *,
    whole: dict[str, torch.Tensor] | None = None,
) -> dict:
    """A JSON-able description, in the order differences are reported: config, model, optimizer.
    `whole`: the parameters kept out of the layout (name -> parameter), by shape and dtype."""
    return {
        "config": config.to_dict(),
        "model": {
            "class": type(model).__name__,
            "parameters": {
                e.name: {
                    "shape": list(e.shape),
                    "unit": e.unit,
                    "group": e.group,
                    "aliases": list(e.aliases),
                }
                for e in entries
            },
            "whole_parameters": {
                name: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                for name, p in (whole or {}).items()
            },
        },
        "optimizer": {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "param_groups": [
                {
                    **{k: _plain(v) for k, v in g.items() if k != "params"},
                    "num_params": len(g["params"]),
                }
                for g in optimizer.param_groups
            ],
        },
    }


def digest(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def first_difference(a: Any, b: Any, path: tuple = ()) -> tuple[tuple, Any, Any] | None:
    """The first place (in `a`'s order) where two descriptions differ: (key path, a, b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                return (*path, k), a[k], "<absent>"
            d = first_difference(a[k], b[k], (*path, k))
            if d:
                return d
        for k in b:
            if k not in a:
                return (*path, k), "<absent>", b[k]
        return None
    # Lists of plain values (shapes, betas) are compared whole; lists of objects item by item.
    nested = isinstance(a, list) and any(isinstance(x, (dict, list)) for x in a)
    if nested and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, (*path, i))
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def format_path(path: tuple) -> str:
    out = ""
    for k in path:
        if isinstance(k, int):
            out += f"[{k}]"
        elif "." in k:
            out += f"[{k!r}]"
        else:
            out += f".{k}" if out else k
    return out


def _lookup(d: Any, path: tuple) -> Any:
    for k in path:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and k < len(d):
            d = d[k]
        else:
            return "<absent>"
    return d


def disagreement_message(descriptions: list[dict]) -> str:
    """Name the first difference from rank 0 and which ranks hold which value."""
    for d in descriptions:
        diff = first_difference(descriptions[0], d)
        if diff is None:
            continue
        path = diff[0]
        groups: dict[str, list[int]] = {}
        for rank, other in enumerate(descriptions):
            value = json.dumps(_lookup(other, path), sort_keys=True, default=repr)
            groups.setdefault(value, []).append(rank)
        parts = "; ".join(f"ranks {ranks}: {value}" for value, ranks in groups.items())
        return (
            f"ranks disagree at initialize: {format_path(path)} differs ({parts}). Every rank "
            "must build the same model, ZeroConfig and optimizer"
        )
    raise AssertionError("descriptions do not differ")
