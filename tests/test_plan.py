"""hf_zero/plan.py: the stage table as data. Tier 1: no process group.

The design's two stage tables (what each stage shards and communicates, and the memory per
rank that the README's "What the ZeRO stages are" gives) are written here as data, cell by
cell, and the plans (and the memory formula that reads them) must reproduce them.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from hf_zero.config import ZeroConfig
from hf_zero.estimate import model_state_bytes
from hf_zero.plan import GradReduction, ParamGather, StagePlan

# "What each stage does": stage -> (sharded across ranks, when gradients are
# communicated, params all-gathered).
STAGE_TABLE = {
    0: (
        (),
        "every micro-step, bucketed all-reduce overlapped with backward",
        "never",
    ),
    1: (
        ("optimizer state", "fp32 master weights"),
        "once per optimizer step, at the accumulation boundary: reduce-scatter of the locally "
        "accumulated full grads",
        "after step (updated shard -> full params)",
    ),
    2: (
        ("optimizer state", "fp32 master weights", "gradients"),
        "every micro-step, bucketed reduce-scatter overlapped with backward; the full grad of a "
        "bucket is freed as soon as it is reduced",
        "after step (updated shard -> full params)",
    ),
    3: (
        ("optimizer state", "fp32 master weights", "gradients", "parameters"),
        "every micro-step, bucketed reduce-scatter overlapped with backward; the full grad of a "
        "bucket is freed as soon as it is reduced",  # "as stage 2"
        "before each unit's forward and backward, freed after; prefetch next unit",
    ),
}

# Memory per rank with AdamW, as (coefficient of Ψ, coefficient of Ψ/N) for fp32
# and for bf16/fp16 compute.
MEMORY_TABLE = {
    0: ((16, 0), (16, 0)),
    1: ((8, 8), (4, 12)),
    2: ((4, 12), (2, 14)),
    3: ((0, 16), (0, 16)),
}


def _row(plan: StagePlan) -> tuple:
    return (plan.sharded, plan.grad_reduction.value, plan.param_gather.value)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_four_plans_are_the_design_table(stage):
    assert _row(StagePlan.for_stage(stage)) == STAGE_TABLE[stage]


def test_the_named_properties_follow_the_table():
    rows = {
        s: (
            p.shards_optimizer,
            p.shards_grads,
            p.shards_params,
            p.reduce_in_backward,
            p.gather_after_step,
            p.poll_reductions,
        )
        for s in range(4)
        for p in [StagePlan.for_stage(s)]
    }
    assert rows == {
        0: (False, False, False, True, False, False),
        1: (True, False, False, False, True, False),
        2: (True, True, False, True, True, False),
        3: (True, True, True, True, False, True),
    }
    assert StagePlan.for_stage(0).grad_reduction is GradReduction.ALL_REDUCE_IN_BACKWARD
    assert StagePlan.for_stage(3).param_gather is ParamGather.AROUND_USE


@pytest.mark.parametrize("mixed", ["no", "bf16", "fp16"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_the_memory_formula_is_the_design_table(mixed, world_size):
    psi = 1200
    for stage, (fp32, low) in MEMORY_TABLE.items():
        whole, per_rank = fp32 if mixed == "no" else low
        got = model_state_bytes(psi, world_size=world_size, stage=stage, mixed_precision=mixed)
        assert got["total_bytes"] == pytest.approx(whole * psi + per_rank * psi / world_size)


def test_config_fields_refine_the_plan():
    assert StagePlan.from_config(ZeroConfig(stage=2, bucket_size=123)).bucket_size == 123
    # Stage 3 gathers one flat buffer per unit: no buckets, whatever the config says.
    assert StagePlan.from_config(ZeroConfig(stage=3, bucket_size=123)).bucket_size is None
    keep = {s: StagePlan.from_config(ZeroConfig(stage=s)).keep_grad_shards for s in range(4)}
    assert keep == {0: False, 1: False, 2: True, 3: False}  # only sharded gradients are kept
    flipped = [
        ZeroConfig(stage=2, keep_grad_shards=False),
        ZeroConfig(stage=3, keep_grad_shards=True),
    ]
    assert [StagePlan.from_config(c).keep_grad_shards for c in flipped] == [False, True]
    prefetch = {s: StagePlan.from_config(ZeroConfig(stage=s)).prefetch for s in range(4)}
    assert prefetch == {0: False, 1: False, 2: False, 3: True}
    assert not StagePlan.from_config(ZeroConfig(stage=3, prefetch=False)).prefetch


def test_divisors_per_kind():
    got = {s: StagePlan.for_stage(s).model_state_divisors(5) for s in range(4)}
    assert got == {
        0: {"params": 1, "grads": 1, "optim": 1},
        1: {"params": 1, "grads": 1, "optim": 5},
        2: {"params": 1, "grads": 5, "optim": 5},
        3: {"params": 5, "grads": 5, "optim": 5},
    }


@pytest.mark.parametrize("stage", [4, -1, 1.0, True, "2"])
def test_bad_stage_is_refused(stage):
    with pytest.raises(
        ValueError, match="^" + re.escape(f"stage must be 0, 1, 2 or 3, got {stage!r}") + "$"
    ):
        StagePlan.for_stage(stage)


def test_a_plan_is_frozen():
    plan = StagePlan.for_stage(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.shards_grads = False  # type: ignore[misc]
