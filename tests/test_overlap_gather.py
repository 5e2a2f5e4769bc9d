"""Stages 1-2 with `overlap_param_gather`: the after-step all-gather lands during the next forward.

Exact: the same losses, gradient norms and compute weights, bit for bit, as the default (the
parity suite also runs it against single-process AdamW). Safe: every reader the engine knows
waits for the gathers first, checked with after-step gathers that start only when waited on
(`tests/helpers/lazy_gather.py`), so a parameter that nothing waited for is certainly stale.
"""

from __future__ import annotations

import pytest
import torch

import hf_zero
from scripts.harness.cases import (
    global_batch,
    make_model,
    param_groups,
    rank_slice,
    run_engine,
)
from scripts.harness.dist import run_distributed
from tests.helpers.lazy_gather import lazy_after_step_gathers

STEPS = 4


def _bitwise_worker(rank, world_size, cases):
    rows = []
    for kind, stage in cases:
        runs = []
        for overlap in (False, True):
            config = hf_zero.ZeroConfig(stage=stage, overlap_param_gather=overlap)
            engine, losses, norms = run_engine(kind, STEPS, rank, world_size, config)
            engine.wait_for_params()
            weights = [p.detach().clone() for p in engine.module.parameters()]
            runs.append((losses, norms, weights))
        (l0, n0, w0), (l1, n1, w1) = runs
        rows.append(
            {
                "case": (kind, stage),
                "losses": l0 == l1,
                "norms": n0 == n1,
                "weights": all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True)),
            }
        )
    return rows


def test_overlap_is_bit_identical_to_the_default():
    cases = [("gpt2", 1), ("gpt2", 2), ("bert", 2)]
    for rows in run_distributed(_bitwise_worker, 2, cases, timeout=300):
        for r in rows:
            assert r["losses"] and r["norms"] and r["weights"], r


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _readers_worker(rank, world_size, stage, tmp):
    with lazy_after_step_gathers():
        return _readers(rank, world_size, stage, tmp)


def _readers(rank, world_size, stage, tmp):
    engines = []
    for overlap in (False, True):
        model = make_model("gpt2")
        opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
        config = hf_zero.ZeroConfig(stage=stage, overlap_param_gather=overlap)
        engines.append(hf_zero.initialize(model, opt, config=config))
    eager, lazy = engines

    def train_step(step, engine):
        loss = engine(**rank_slice(global_batch("gpt2", step, 0, world_size), rank)).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        return loss.item()

    seen = {}
    step = 0

    def both():
        nonlocal step
        losses = [train_step(step, e) for e in engines]
        step += 1
        return losses

    # 1. The gathers are really left in flight: right after step() some parameter is stale.
    both()
    seen["stale_after_step"] = not _same(_weights(eager.module), _weights(lazy.module))
    # 2. A state dict of the model, or of one of its modules, waits for them.
    sd = lazy.module.state_dict()
    seen["state_dict"] = all(
        torch.equal(v, eager.module.state_dict()[k]) for k, v in sd.items()
    ) and _same(_weights(eager.module), _weights(lazy.module))
    # 3. The next forward waits unit by unit: the losses are the default's, bit for bit.
    losses = [both() for _ in range(3)]
    seen["forward"] = all(a == b for a, b in losses)
    seen["stale_again"] = not _same(_weights(eager.module), _weights(lazy.module))
    block = lazy.module.transformer.h[0].state_dict()
    seen["submodule_state_dict"] = all(
        torch.equal(v, eager.module.transformer.h[0].state_dict()[k]) for k, v in block.items()
    ) and _same(_weights(eager.module), _weights(lazy.module))
    # 4. wait_for_params(), and the next step() even without a backward.
    both()
    lazy.wait_for_params()
    seen["wait_for_params"] = _same(_weights(eager.module), _weights(lazy.module))
    both()
    lazy.step()
    seen["next_step"] = _same(_weights(eager.module), _weights(lazy.module))
    # 5. A checkpoint saved right after a step resumes into the default's weights.
    both()
    lazy.save_checkpoint(f"{tmp}/ckpt")
    seen["checkpoint_saved_after_step"] = _same(_weights(eager.module), _weights(lazy.module))
    return seen


@pytest.mark.parametrize("stage", [1, 2])
def test_every_reader_waits_for_the_gathers_in_flight(stage, tmp_path):
    for seen in run_distributed(_readers_worker, 2, stage, str(tmp_path), timeout=300):
        assert seen == dict.fromkeys(seen, True), seen


@pytest.mark.parametrize("stage", [0, 3])
def test_overlap_is_refused_where_there_is_no_after_step_gather(stage):
    with pytest.raises(
        ValueError, match=f"overlap_param_gather applies to stages 1 and 2, got stage={stage}"
    ):
        hf_zero.ZeroConfig(stage=stage, overlap_param_gather=True)


def test_overlap_must_be_a_bool():
    with pytest.raises(ValueError, match="overlap_param_gather must be true or false, got 'yes'"):
        hf_zero.ZeroConfig(stage=2, overlap_param_gather="yes")
