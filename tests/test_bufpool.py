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


def test_stage3_steady_state_allocates_nothing_new():
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_zero

    def train(stage):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=256, n_positions=32)
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        model = GPT2LMHeadModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
        allocated, norms = [], []
        for step in range(3):
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
            norms.append(float(engine.grad_norm))
            engine.zero_grad()
            if stage == 3:
                allocated.append(engine._params_store.pool.allocated)
        return engine, allocated, norms

    _, _, norms0 = train(0)
    engine, allocated, norms3 = train(3)
    assert norms3 == pytest.approx(norms0, rel=1e-5)
    # Blocks are created in the first step only: root, the position embedding's flat of its own
    # (its gradient is reduced as sparse rows), and the units alive at once.
    assert allocated[0] == allocated[-1] <= 5, allocated
    stats = engine.memory_stats()
    assert stats["pooled_buffer_bytes"] > 0
    assert stats["pooled_buffer_bytes"] not in (stats["param_bytes"], stats["total_bytes"])
