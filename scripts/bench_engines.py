"""The benchmark's engines, in one table: what each one is and what it must show.

`bench.py` (which engines exist, their order, memory formula, communication volume and peers),
`bench_worker.py` (which setup function builds each one, with which options) and
`tests/test_bench.py` (which must run, which AdamW kernel each uses) all read this table, so an
engine is added or changed here only. Pure data: no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Engine", "ENGINES", "names"]


@dataclass(frozen=True)
class Engine:
    name: str
    setup: str
    """The `bench_worker` function that builds it."""

    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `setup`."""

    stage: int = 0
    """The ZeRO stage whose model-state memory it matches."""

    volume: int = 2
    """Communication volume in Ψ elements per rank per step (the ZeRO paper's convention: an
    all-reduce is 2Ψ, a reduce-scatter or an all-gather Ψ)."""

    single: bool = False
    """One process on the whole global batch (the compute limit), not one per rank."""

    fused: bool = False
    """Whether its AdamW runs the fused kernel (hf_zero picks it for its flat shards)."""

    peers: tuple[str, ...] = ()
    """Engines its step time is compared with."""

    requires: str | None = None
    """An optional package it needs; without it the engine is skipped, saying so."""


_ENGINES = [
    Engine("single", "setup_single", single=True, volume=0),
    Engine("single_fused", "setup_single", {"fused": True}, single=True, volume=0, fused=True),
    Engine("ddp", "setup_ddp"),
    Engine("ddp_fused", "setup_ddp", {"fused": True}, fused=True),
    Engine("zero_redundancy", "setup_ddp", {"zero_redundancy": True}, stage=1),
    Engine("fsdp2", "setup_fsdp2", {"reshard": True}, stage=3, volume=3),
    Engine("fsdp2_no_reshard", "setup_fsdp2", {"reshard": False}, stage=3),
    Engine("hf_zero0", "setup_hf_zero", {"stage": 0}, fused=True, peers=("ddp", "ddp_fused")),
    Engine(
        "hf_zero1", "setup_hf_zero", {"stage": 1}, stage=1, fused=True, peers=("zero_redundancy",)
    ),
    Engine("hf_zero2", "setup_hf_zero", {"stage": 2}, stage=2, fused=True, peers=("deepspeed2",)),
    Engine(
        "hf_zero3",
        "setup_hf_zero",
        {"stage": 3},
        stage=3,
        volume=3,
        fused=True,
        peers=("deepspeed3", "fsdp2"),
    ),
    Engine("deepspeed2", "setup_deepspeed", {"stage": 2}, stage=2, requires="deepspeed"),
    Engine("deepspeed3", "setup_deepspeed", {"stage": 3}, stage=3, volume=3, requires="deepspeed"),
]
ENGINES: dict[str, Engine] = {e.name: e for e in _ENGINES}


def names() -> list[str]:
    """Every engine, in the order the benchmark runs them."""
    return list(ENGINES)
