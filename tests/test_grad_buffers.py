"""Stages 2-3: the gradient buckets' buffers (packed gradients, and what gloo's reduce-scatter
receives into) are reused by size within a backward and, under no_sync(), across the
micro-steps of an accumulation window; a synchronised backward and zero_grad() free them.

Tier 1 for the pool itself (no process group); tier 2 for the engine at 2 and 3 gloo ranks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from hf_zero.grads import _BufferPool
from scripts.harness.dist import run_distributed

CPU = torch.device("cpu")


def test_pool_keeps_up_to_keep_idle_buffers_of_each_size():
    pool = _BufferPool(keep=1)
    a, b = pool.take(4, torch.float32, CPU), pool.take(8, torch.float32, CPU)
    pool.give(a)
    pool.give(b)  # another size: both kept
    assert pool.idle_bytes() == 4 * 4 + 8 * 4
    c = pool.take(4, torch.float32, CPU)
    assert c is a and pool.allocated == 2
    pool.give(c)
    pool.give(pool.take(4, torch.float32, CPU))
    d = torch.empty(4)
    pool.give(d)  # one of size 4 kept by default: the older goes
    assert pool.take(4, torch.float32, CPU) is d
    pool.give(a, keep=3)
    pool.give(d, keep=3)
    assert pool.idle_bytes() == 2 * 4 * 4 + 8 * 4
    pool.clear()
    assert pool.idle_bytes() == 0


MICRO = 4


def _window_worker(rank: int, world_size: int, stage: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_zero

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=256, n_positions=32)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
    grads = engine._grads

    def created() -> int:
        own = 0 if grads._shared_buffers else grads._buffers.allocated
        return own + grads._scratch.allocated

    out = {"created": [], "pooled": [], "after_step": []}
    for step in range(2):
        for micro in range(MICRO):
            g = torch.Generator().manual_seed(step * MICRO + micro)
            ids = torch.randint(0, 256, (2, 16), generator=g)
            before = created()
            with engine.no_sync() if micro < MICRO - 1 else contextlib.nullcontext():
                engine.backward(engine(input_ids=ids, labels=ids).loss / MICRO)
            out["created"].append(created() - before)
            out["pooled"].append(grads.pooled_bytes())
            if step == micro == 0:
                out["reported"] = engine.memory_stats()["pooled_buffer_bytes"]
        engine.step()
        engine.zero_grad()
        out["after_step"].append(grads.pooled_bytes())
    # A window whose every micro-step ran under no_sync(): zero_grad() frees what it kept.
    for micro in range(2):
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(99 + micro))
        with engine.no_sync():
            engine.backward(engine(input_ids=ids, labels=ids).loss)
    out["kept_before_step"] = grads.pooled_bytes()
    engine.step()
    engine.zero_grad()
    out["after_no_sync_step"] = grads.pooled_bytes()
    out["packed_created"] = 0 if grads._shared_buffers else grads._buffers.allocated
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_window_reuses_its_reduction_buffers_and_the_step_frees_them(world_size):
    """4 micro-steps a step. Stage 2 sends its buckets straight from the gradients, so it
    creates no packed bucket at all; what gloo receives into is created by the first two
    micro-steps (the first writes the gradient shards, from N=3 through scratch; the second
    reduces into scratch and adds it to them), and reused by the third and fourth. Without
    keeping it across micro-steps, each creates it again."""
    for stage in (2, 3):
        for rank, r in enumerate(run_distributed(_window_worker, world_size, stage, timeout=300)):
            where = f"stage {stage}, rank {rank}"
            created, pooled = r["created"], r["pooled"]
            if stage == 2:
                # Stage 3 polls its reductions, so how many are in flight at once (and so
                # how many buffers a pass needs) varies from pass to pass.
                assert r["packed_created"] == 0, where
                assert created[1] > 0 and (created[0] > 0) == (world_size > 2), (where, created)
                assert created[2] == created[3] == 0, (where, created)
                assert created[6] == created[7] == 0, (where, created)
                assert created[4:6] == created[0:2], (where, created)
                assert all(b > 0 for b in pooled[1:3] + pooled[5:7]), (where, pooled)
                assert r["reported"] == pooled[0], where  # memory_stats() counts them
                assert r["kept_before_step"] > 0, where
            assert pooled[3] == pooled[7] == 0, (where, pooled)  # the boundary freed them
            assert r["after_step"] == [0, 0], (where, r["after_step"])
            assert r["after_no_sync_step"] == 0, where
