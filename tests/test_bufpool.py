"""Tier 1: the gather pool moves memory in and out of a storage without copying, reuses it by
size, keeps at most `capacity` idle blocks per size, and stage 3 stops allocating after its
first step."""

from __future__ import annotations

import pytest
import torch

from hf_zero import bufpool
from hf_zero.bufpool import GatherPool


def test_blocks_move_between_storages_and_are_reused_by_size():
    pool = GatherPool(capacity=2)
    full = torch.empty(8)
    view = full[2:4]  # a parameter is a view of the full buffer: it must follow the memory
    full.untyped_storage().resize_(0)
    pool.acquire(full.untyped_storage(), 32)
    full.copy_(torch.arange(8.0))
    assert view.tolist() == [2.0, 3.0]
    ptr = full.untyped_storage().data_ptr()
    pool.release(full.untyped_storage())
    assert full.untyped_storage().nbytes() == 0 and pool.idle_bytes() == 32
    other = torch.empty(8)
    other.untyped_storage().resize_(0)
    pool.acquire(other.untyped_storage(), 32)  # another unit of the same size: the same block
    assert other.untyped_storage().data_ptr() == ptr and other.tolist() == list(range(8))
    assert pool.allocated == 1 and pool.idle_bytes() == 0
    # A size never seen allocates; tensors from take() pack into blocks too.
    t = pool.take(3, torch.float32, torch.device("cpu"))
    assert t.shape == (3,) and pool.allocated == 2
    pool.give(t)
    assert pool.idle_bytes() == 12


def test_without_storage_swaps_the_pool_resizes_in_place_and_keeps_nothing(monkeypatch):
    # torch before 2.13 has no UntypedStorage._swap_data_ptr_.
    monkeypatch.setattr(bufpool, "_SWAP", False)
    pool = GatherPool(capacity=2)
    full = torch.empty(8)
    view = full[2:4]
    full.untyped_storage().resize_(0)
    pool.acquire(full.untyped_storage(), 32)
    full.copy_(torch.arange(8.0))
    assert view.tolist() == [2.0, 3.0]
    pool.release(full.untyped_storage())
    assert full.untyped_storage().nbytes() == 0 and pool.idle_bytes() == 0
    t = pool.take(3, torch.float32, torch.device("cpu"))
    t.fill_(1.0)
    pool.give(t)
    assert pool.allocated == 2 and pool.idle_bytes() == 0


def test_at_most_capacity_idle_blocks_per_size():
    pool = GatherPool(capacity=2)
    held = [pool.take(4, torch.float32, torch.device("cpu")) for _ in range(3)]
    for t in held:
        pool.give(t)
    assert pool.idle_bytes() == 2 * 16  # the third block was freed
    pool.clear()
    assert pool.idle_bytes() == 0
    with pytest.raises(ValueError, match="capacity must be >= 1 idle block per size, got 0"):
        GatherPool(capacity=0)


def test_a_backward_pass_frees_the_sizes_it_asks_no_more_of():
    pool, cpu = GatherPool(capacity=3), torch.device("cpu")
    pool.begin_pass({16: 3, 32: 1})
    first = pool.take(4, torch.float32, cpu)
    spare = pool.take(4, torch.float32, cpu)
    pool.give(spare)  # one 16-byte block still to be asked for: kept
    assert pool.idle_bytes() == 16
    last = pool.take(4, torch.float32, cpu)  # the last one: nothing of this size idles now
    assert pool.idle_bytes() == 0 and pool.allocated == 2
    pool.give(first)  # released after the last take, within the pass: freed
    assert pool.idle_bytes() == 0
    big = pool.take(8, torch.float32, cpu)  # all it asked for: the pass is over
    pool.give(last)
    pool.give(big)
    assert pool.idle_bytes() == 16 + 32 and pool.allocated == 3
    pool.begin_pass({16: 1, 32: 1})
    pool.end_pass()  # backward ended before taking all it asked for: kept as outside a pass
    held = [pool.take(4, torch.float32, cpu) for _ in range(3)]
    for t in held:
        pool.give(t)
    assert pool.idle_bytes() == 3 * 16 + 32


def test_stage3_steady_state_allocates_a_fixed_few_blocks_per_step():
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_zero

    def train(stage, n_layer):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=256, n_positions=32)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        model = GPT2LMHeadModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
        allocated, norms, idle = [], [], []
        for step in range(4):
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            if stage == 3:
                idle.append(engine.memory_stats()["pooled_buffer_bytes"])
            engine.step()
            norms.append(float(engine.grad_norm))
            engine.zero_grad()
            if stage == 3:
                allocated.append(engine._params_store.pool.allocated)
        return engine, allocated, norms, idle

    _, _, norms0, _ = train(0, 3)
    for n_layer in (3, 6):
        engine, allocated, norms3, idle = train(3, n_layer)
        if n_layer == 3:
            assert norms3 == pytest.approx(norms0, rel=1e-5)
        # Steady state, whatever the depth: each step creates 4 blocks, freed in backward once
        # their size was asked for no more: the forward's first block and its prefetched
        # successor, and the position embedding's flat (its gather, and its gradient bucket,
        # packed while the root unit is still gathered). Every other gather and gradient
        # bucket reuses a block.
        per_step = [b - a for a, b in zip(allocated, allocated[1:])]
        assert per_step == [4, 4, 4], (n_layer, allocated)
        # After backward no block of the transformer blocks' size idles; the root's is kept.
        pool = engine._params_store.pool
        block_bytes = engine._params_store.fulls[-1].untyped_storage().nbytes()
        assert (torch.device("cpu"), block_bytes) not in pool._idle, pool._idle
        assert len(pool._idle) >= 1, pool._idle
        stats = engine.memory_stats()
        assert stats["pooled_buffer_bytes"] > 0
        assert stats["pooled_buffer_bytes"] not in (stats["param_bytes"], stats["total_bytes"])
