"""A PEFT model's frozen base in a checkpoint: referenced and verified, not copied.

LoRA trains a few hundred thousand parameters on top of a base of tens or hundreds of millions
that never change. Writing the base into every checkpoint would make each one as large as a
full fine-tune's (less its optimizer state), so a checkpoint of a PEFT model leaves out the flat
units of frozen parameters (group FROZEN) and records instead, in the manifest's `frozen_base`:
  - `source`: where the base came from (`config._name_or_path`, as `from_pretrained` set it);
  - `digests`: per frozen parameter, a 64-bit digest of its values (16 hex digits).
A load takes the frozen values from the model it loads into, after checking that they have the
recorded digests: a different base (another model, another revision, an edited layer) is refused
by name before anything is copied. Offline consolidation, which has no base at hand, refuses such
a checkpoint and says how to export it.

The digest of a parameter does not depend on the world size or stage, so a checkpoint verifies
on any world size: it is the sum, modulo 2^64, over the parameter's elements, of a 64-bit mix of
(element index, fp32 bit pattern, a seed from the parameter's name). Each rank sums the elements
of its own shard (`RankState.saved_slice`) and the ranks add their partial sums (one small
object all-gather). Any single changed element changes the digest; two different bases collide
with probability about 2^-64 per parameter. It guards against the wrong base, not an adversary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from .. import comm
from ..partition import FlatUnit
from .errors import CheckpointError
from .state import RankState

__all__ = [
    "FrozenBase",
    "digest",
    "is_peft_model",
    "frozen_units",
    "references_frozen",
    "frozen_digests",
    "check_frozen",
]

_LABEL = "frozen base digest"
_MASK = (1 << 64) - 1
_CHUNK = 1 << 20  # elements hashed at once: bounds the temporaries (a few 8 MB tensors)


def _signed(c: int) -> int:
    """The int64 with the bit pattern of the unsigned 64-bit `c`."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 `x` (torch's `>>` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer, in int64 arithmetic that wraps."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


def _seed(name: str) -> int:
    return _signed(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


@torch.no_grad()
def _partial_sum(values: torch.Tensor, start: int, seed: int) -> int:
    """Sum mod 2^64 of the mixed (index, bits) of `values`, elements [start, start + n) of one
    parameter."""
    total = 0
    values = values.detach().to("cpu", torch.float32).contiguous()
    for lo in range(0, values.numel(), _CHUNK):
        chunk = values[lo : lo + _CHUNK]
        bits = chunk.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        idx = torch.arange(start + lo, start + lo + chunk.numel(), dtype=torch.int64)
        x = _mix((idx * _GOLDEN) ^ (bits << 32) ^ bits ^ seed)
        total = (total + int(x.sum())) & _MASK
    return total


def digest(name: str, value: torch.Tensor) -> str:
    """The digest of parameter `name` holding `value` (whole, in one process): what
    `frozen_digests` computes from the ranks' shards."""
    return f"{_partial_sum(value.reshape(-1), 0, _seed(name)):016x}"


@dataclass(frozen=True)
class FrozenBase:
    """The manifest's `frozen_base`: what a checkpoint that leaves the frozen base out records."""

    source: str | None
    """Where the base came from (`config._name_or_path`), None when unknown."""

    digests: dict[str, str]
    """Frozen parameter name -> its digest (16 hex digits)."""

    def to_json(self) -> dict:
        return {"source": self.source, "digests": dict(self.digests)}

    @classmethod
    def parse(cls, value, *, where: str) -> FrozenBase:
        ok = (
            isinstance(value, dict)
            and (value.get("source") is None or isinstance(value.get("source"), str))
            and isinstance(value.get("digests"), dict)
            and all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 16
                for k, v in value["digests"].items()
            )
        )
        if not ok:
            raise CheckpointError(
                f"{where}: frozen_base must be {{'source': str or null, 'digests': {{parameter "
                f"name: 16 hex digits}}}}, got {str(value)[:200]}"
            )
        return cls(value.get("source"), dict(value["digests"]))


def is_peft_model(module: nn.Module) -> bool:
    """Whether `module` is a `peft.PeftModel` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def frozen_units(state: RankState) -> list[FlatUnit]:
    """The flat units of frozen parameters."""
    return [fu for fu in state.layout.flat_units if not fu.trainable]


def references_frozen(state: RankState) -> bool:
    """Whether a save of `state` leaves its frozen flat units out: a PEFT model with some."""
    return is_peft_model(state.module) and bool(frozen_units(state))


def source_of(state: RankState) -> str | None:
    config = getattr(state.module, "config", None)
    return getattr(config, "_name_or_path", None) or None


def frozen_digests(state: RankState) -> dict[str, str]:
    """Per frozen parameter of `state`, its digest (collective; {} on every rank when the model
    has no frozen parameter)."""
    units = frozen_units(state)
    if not units:
        return {}
    partial: dict[str, int] = {}
    for fu in units:
        shard = state.saved_slice(fu, state.masters[fu.index])
        for piece in fu.shard_pieces(state.rank):
            name = piece.param.name
            values = shard[piece.shard_start : piece.shard_start + piece.length]
            s = _partial_sum(values, piece.param_start, _seed(name))
            partial[name] = (partial.get(name, 0) + s) & _MASK
    total: dict[str, int] = {p.name: 0 for fu in units for p in fu.params}
    for theirs in comm.all_gather_object(partial, group=state.group, label=_LABEL):
        for name, s in theirs.items():
            total[name] = (total[name] + s) & _MASK
    return {name: f"{s:016x}" for name, s in total.items()}


def check_frozen(recorded: FrozenBase, mine: dict[str, str], names: list[str], where: str) -> None:
    """Raise unless each of `names` (the frozen parameters a load takes from the model instead
    of the checkpoint) has the digest the checkpoint recorded."""
    missing = [n for n in names if n not in recorded.digests]
    if missing:
        raise CheckpointError(
            f"{where}: the checkpoint records no digest for frozen parameter {missing[0]!r} "
            f"({len(missing)} in all) and does not hold its values"
        )
    unfrozen = [n for n in names if n not in mine]
    if unfrozen:
        raise CheckpointError(
            f"{where}: parameter {unfrozen[0]!r} was frozen when the checkpoint was saved and "
            "is trainable here; the checkpoint does not hold its values (it references the "
            f"base {recorded.source or '(source unknown)'}): freeze it as it was, or load "
            "that base and unfreeze it after loading"
        )
    differ = [n for n in names if mine[n] != recorded.digests[n]]
    if differ:
        n = differ[0]
        raise CheckpointError(
            f"{where}: the checkpoint does not hold the frozen base, it references "
            f"{recorded.source or 'a base of unknown source'}, and this model's frozen "
            f"parameters differ from it: {n!r} has digest {mine[n]}, the checkpoint's base "
            f"{recorded.digests[n]} ({len(differ)} of {len(names)} frozen parameters differ). "
            "Load the same base model (same revision, same dtype) before loading the checkpoint"
        )
