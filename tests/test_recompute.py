"""Gradient (activation) checkpointing under every stage: the same losses and weights as the
run without it, and the reentrant variant refused with the fix.

With checkpointing, each block's forward runs again inside backward; at stage 3 the block is
gathered for that recompute by the backward gather every rank walks, and released after.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import hf_zero
from scripts.harness.cases import ACCUM, global_batch, make_model, param_groups, rank_slice
from scripts.harness.dist import run_distributed

STEPS = 3


def _train(kind, rank, world_size, stage, checkpointing):
    model = make_model(kind)
    if checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant: the transformers default
    model.train()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
    # A module inside the checkpointed block forward: it runs again in every backward.
    inner = next(
        m for n, m in model.named_modules() if n.endswith(".0.attention") or n.endswith(".0.attn")
    )
    calls = []
    inner.register_forward_pre_hook(lambda m, a: calls.append(1))
    losses, norms = [], []
    for step in range(STEPS):
        for micro in range(ACCUM):
            batch = rank_slice(global_batch(kind, step, micro, world_size), rank)
            sync = engine.no_sync() if micro < ACCUM - 1 else contextlib.nullcontext()
            with sync:
                loss = engine(**batch).loss
                engine.backward(loss / ACCUM)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item())
        norms.append(engine.clip_grad_norm_(1.0).item())
        engine.step()
        engine.zero_grad()
    full = engine.full_state_dict(all_ranks=True)
    return losses, norms, full, engine.comm_stats(), len(calls)


def _recompute_worker(rank, world_size, kinds, stages):
    rows = []
    for kind in kinds:
        for stage in stages:
            plain = _train(kind, rank, world_size, stage, False)
            ckpt = _train(kind, rank, world_size, stage, True)
            rows.append(
                {
                    "kind": kind,
                    "stage": stage,
                    "losses_equal": plain[0] == ckpt[0],
                    "norms_equal": plain[1] == ckpt[1],
                    "weights_diff": max(
                        (plain[2][k] - v).abs().max().item()
                        for k, v in ckpt[2].items()
                        if v.is_floating_point()
                    ),
                    "comm_plain": plain[3],
                    "comm_ckpt": ckpt[3],
                    "block_forwards": (plain[4], ckpt[4]),
                }
            )
    return rows


def test_gradient_checkpointing_equals_the_run_without_it_at_every_stage():
    results = run_distributed(_recompute_worker, 2, ["gpt2", "bert"], [0, 1, 2, 3], timeout=600)
    for rank_rows in results:
        for r in rank_rows:
            # The recompute runs the same kernels on the same values: bit-identical.
            assert r["losses_equal"] and r["norms_equal"], r
            assert r["weights_diff"] == 0.0, r
            # Checkpointing is on: every backward ran the block's forward once more.
            assert r["block_forwards"] == (STEPS * ACCUM, 2 * STEPS * ACCUM), r
            # Stage 3 gathers no unit more than without checkpointing.
            assert r["comm_plain"] == r["comm_ckpt"], r
    print("\n".join(str(r) for r in results[0]))


def test_reentrant_gradient_checkpointing_is_refused_with_the_fix():
    model = make_model("gpt2")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(
        ValueError, match=r"use_reentrant=True is enabled on .*use_reentrant.: False"
    ):
        hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=3))
    # Enabled after initialize: refused at the first training forward, before any gather.
    model = make_model("gpt2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=2))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    batch = global_batch("gpt2", 0, 0, 1)
    with pytest.raises(ValueError, match="use_reentrant=True"):
        engine(**batch)
    with torch.no_grad():  # evaluation recomputes nothing: allowed
        engine(**batch)
