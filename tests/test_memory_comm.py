"""Tier 2: the ZeRO promise, measured. `memory_stats()` on every rank equals the ZeRO
formula for each stage and precision (after the step, every model state alive); `zero_grad()`
frees the gradient shards of stage 3 and keeps stage 2's (either can be switched); and
`comm_stats()` over one optimizer step is 2Ψ elements (stages 0-2) or 3Ψ (stage 3), padding
aside."""

from __future__ import annotations

import pytest
import torch

import hf_zero
from hf_zero.estimate import model_state_bytes
from scripts.harness.cases import global_batch, make_model, param_groups, rank_slice
from scripts.harness.dist import run_distributed


def test_formula_matches_design_table():
    psi, n = 1000, 4
    fp32 = {s: model_state_bytes(psi, world_size=n, stage=s)["total_bytes"] for s in range(4)}
    assert fp32 == {
        0: 16 * psi,
        1: 8 * psi + 8 * psi / n,
        2: 4 * psi + 12 * psi / n,
        3: 16 * psi / n,
    }
    bf16 = {
        s: model_state_bytes(psi, world_size=n, stage=s, mixed_precision="bf16")["total_bytes"]
        for s in range(4)
    }
    assert bf16 == {
        0: 16 * psi,
        1: 4 * psi + 12 * psi / n,
        2: 2 * psi + 14 * psi / n,
        3: 16 * psi / n,
    }
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3, got 5"):
        model_state_bytes(psi, world_size=n, stage=5)


def _measure_worker(rank: int, world_size: int) -> list[dict]:
    rows = []
    # Each stage and precision with its default gradient-shard policy, then the other policy.
    runs = [(mixed, stage, None) for mixed in ("no", "bf16") for stage in range(4)]
    runs += [("no", 2, False), ("no", 3, True)]
    for mixed, stage, keep in runs:
        model = make_model("gpt2")
        opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
        # The dense traffic of the formula: sparse embedding gradients change what is sent.
        config = hf_zero.ZeroConfig(
            stage=stage,
            mixed_precision=mixed,
            keep_grad_shards=keep,
            sparse_embedding_grads=False,
        )
        engine = hf_zero.initialize(model, opt, config=config)
        # Step 1 creates the optimizer state; step 2 is the one whose traffic is counted.
        # Model states are measured where all of them are alive: after the step, before
        # zero_grad (which may free the gradient shards at stages 2-3).
        for step in range(2):
            engine.zero_grad()
            before, sent_before = engine.comm_stats(), engine.wire_stats()["sent_bytes"]
            loss = engine(**rank_slice(global_batch("gpt2", step, 0, world_size), rank)).loss
            engine.backward(loss)
            engine.step()
        after, sent_after = engine.comm_stats(), engine.wire_stats()["sent_bytes"]
        memory = engine.memory_stats()
        engine.zero_grad(set_to_none=False)
        kept = engine.memory_stats()["grad_bytes"]
        engine.zero_grad()
        freed = engine.memory_stats()["grad_bytes"]
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "total"}
        layout = engine._layout
        rows.append(
            {
                "stage": stage,
                "mixed": mixed,
                "keep": stage == 2 if keep is None else keep,
                "rank": rank,
                "numel": layout.trainable_numel(),
                "padded": sum(f.padded_numel for f in layout.flat_units if f.trainable),
                "flats": len(layout.flat_units),
                "opt_params": sum(len(g["params"]) for g in engine.optimizer.param_groups),
                "params": len(engine._sharded_optimizer.trainable_specs()),
                "memory": memory,
                "grad_bytes_zeroed": kept,
                "grad_bytes_set_to_none": freed,
                "moved": moved,
                "paths": dict(engine._stats.paths),
                "sent_reduce": sent_after.get("reduce_scatter", 0)
                - sent_before.get("reduce_scatter", 0),
            }
        )
    return rows


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_memory_and_communication_match_formula(world_size):
    results = run_distributed(_measure_worker, world_size, timeout=600)
    for rank_rows in results:
        for r in rank_rows:
            stage, mixed, n = r["stage"], r["mixed"], world_size
            low = 4 if mixed == "no" else 2
            want = model_state_bytes(r["numel"], world_size=n, stage=stage, mixed_precision=mixed)
            got = r["memory"]
            # Padding: fewer than N elements per flat unit, at most 16 bytes each; plus AdamW's
            # 4-byte `step` tensor per optimizer parameter (one per flat unit shard).
            slack = r["flats"] * n * 16 + 4 * r["opt_params"]
            for key in ("param_bytes", "grad_bytes", "optim_bytes", "total_bytes"):
                assert want[key] <= got[key] <= want[key] + slack, (key, r, want)
            # zero_grad(set_to_none=False) keeps every gradient buffer; the default frees the
            # shards of stages 2-3 unless they are kept (stage 2's default), while stages 0-1
            # keep their full buffers (grads are views).
            assert r["grad_bytes_zeroed"] == got["grad_bytes"], r
            freed = stage >= 2 and not r["keep"]
            assert r["grad_bytes_set_to_none"] == (0 if freed else got["grad_bytes"]), r
            padded_bytes = r["padded"] * low
            moved = r["moved"]
            # One small fp32 all-reduce per step: the grad norm's sum of squares and a
            # got-a-gradient flag per parameter (counted 2x, as every all-reduce).
            small = 2 * 4 * (1 + r["params"])
            if stage == 0:
                assert moved == {"all_reduce": 2 * padded_bytes + small}, r
            elif stage in (1, 2):
                assert moved == {
                    "reduce_scatter": padded_bytes,
                    "all_gather": padded_bytes,
                    "all_reduce": small,
                }, r
            else:
                assert moved == {
                    "reduce_scatter": padded_bytes,
                    "all_gather": 2 * padded_bytes,
                    "all_reduce": small,
                }, r
            # Which reduce-scatter ran on gloo: point to point at every stage, stage 3's polled
            # reductions included (waiter.py), so each rank sends half an all-reduce's bytes.
            if stage >= 1 and n > 1:
                assert r["paths"]["reduce_scatter"] == "send/recv of each rank's slice", r
                # What really left this rank for the gradients: every other rank's slice.
                assert r["sent_reduce"] == padded_bytes * (n - 1) // n, r
            volume = sum(moved.values()) - small
            elements = volume / low
            expected = (3 if stage == 3 else 2) * r["numel"]
            assert expected <= elements <= expected + (3 if stage == 3 else 2) * r["flats"] * n, r
