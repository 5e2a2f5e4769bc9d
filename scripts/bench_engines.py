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

    model: str = "gpt2"
    """What it trains: "gpt2" (the benchmark's GPT-2) or "bert" (a BERT classifier shaped like
    all-MiniLM-L6-v2, built from its config: a 30,522-row word embedding, half the model)."""

    exact: bool = True
    """Whether its loss must equal the reference's (the same model's exact engines); False for
    lossy communication, whose loss is reported, not checked."""


INT8 = {"params": "int8", "grads": "int8", "block_size": 256}
"""ZeRO++-style quantized communication: the stage-3 parameter all-gather and the gradient
reduce-scatter in blockwise int8."""

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
    # The after-step parameter all-gather left to the next forward (opt-in), against the default.
    Engine(
        "hf_zero1_overlap",
        "setup_hf_zero",
        {"stage": 1, "config": {"overlap_param_gather": True}},
        stage=1,
        fused=True,
        peers=("hf_zero1",),
    ),
    Engine(
        "hf_zero2_overlap",
        "setup_hf_zero",
        {"stage": 2, "config": {"overlap_param_gather": True}},
        stage=2,
        fused=True,
        peers=("hf_zero2",),
    ),
    Engine(
        "hf_zero3",
        "setup_hf_zero",
        {"stage": 3},
        stage=3,
        volume=3,
        fused=True,
        peers=("deepspeed3", "fsdp2"),
    ),
    # What crosses the wire: sparse embedding gradients (exact) on BERT against the dense
    # reduction, and int8 collectives (lossy) against exact stage 3.
    Engine(
        "hf_zero2_bert",
        "setup_hf_zero",
        {"stage": 2, "config": {"sparse_embedding_grads": False}},
        stage=2,
        fused=True,
        model="bert",
    ),
    Engine(
        "hf_zero2_sparse",
        "setup_hf_zero",
        {"stage": 2},
        stage=2,
        fused=True,
        model="bert",
        peers=("hf_zero2_bert",),
    ),
    Engine(
        "hf_zero3_q8",
        "setup_hf_zero",
        {"stage": 3, "config": {"comm_quantization": INT8}},
        stage=3,
        volume=3,
        fused=True,
        exact=False,
        peers=("hf_zero3",),
    ),
    Engine("deepspeed2", "setup_deepspeed", {"stage": 2}, stage=2, requires="deepspeed"),
    Engine("deepspeed3", "setup_deepspeed", {"stage": 3}, stage=3, volume=3, requires="deepspeed"),
]
ENGINES: dict[str, Engine] = {e.name: e for e in _ENGINES}


def names() -> list[str]:
    """Every engine, in the order the benchmark runs them."""
    return list(ENGINES)
