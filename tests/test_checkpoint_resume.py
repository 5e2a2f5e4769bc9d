"""Tier 3: exact resume and resharding of sharded checkpoints.

Exact resume: train 2k steps straight, or k steps, save, start NEW processes, load, train k
more: losses and final weights are bit-identical, every stage, fp32 and bf16. Resharding, in
both directions: save at world size 3 with stage 3 (uneven padding) and load at 2 ranks with
stage 2 and 1 rank with stage 0; save at 2 and load at 3, save at 1 and load at 4; and in bf16
(2 to 3). Every master weight and every element of the optimizer moments survives bit for bit
(compared element by element: a shift by one element fails), so does Adam's step count, and
training continues like the uninterrupted run within reduction-order tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

import hf_zero
from scripts.harness.cases import PER_RANK, VOCAB, make_model, max_weight_diff, param_groups
from scripts.harness.dist import run_distributed

K = 3
# (stage, precision); "dropout" is fp32 with dropout on: bit-identical only if the RNG resumes.
CASES = [(stage, mixed) for mixed in ("no", "bf16") for stage in range(4)] + [(2, "dropout")]
GLOBAL_ROWS = 6 * PER_RANK  # divisible by 1, 2 and 3 ranks


def _batch(step: int, rank: int, world_size: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, 8), generator=g)
    rows = GLOBAL_ROWS // world_size
    mine = ids[rank * rows : (rank + 1) * rows]
    return {"input_ids": mine, "labels": mine}


def _train(engine, rank, world_size, first_step, steps):
    losses = []
    for step in range(first_step, first_step + steps):
        loss = engine(**_batch(step, rank, world_size)).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world_size)
    return losses


def _engine(stage, mixed="no"):
    model = make_model("gpt2", dropout=0.1 if mixed == "dropout" else 0.0)
    model.train()
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    precision = "no" if mixed == "dropout" else mixed
    config = hf_zero.ZeroConfig(stage=stage, mixed_precision=precision, gradient_clipping=1.0)
    return hf_zero.initialize(model, opt, config=config)


def _path(root, stage, mixed):
    return os.path.join(root, f"ckpt-s{stage}-{mixed}")


def _straight_and_first_half(rank, world_size, cases, root):
    out = {}
    for stage, mixed in cases:
        engine = _engine(stage, mixed)
        losses = _train(engine, rank, world_size, 0, 2 * K)
        out[(stage, mixed, "straight")] = (losses, engine.full_state_dict(all_ranks=True))
        engine = _engine(stage, mixed)
        out[(stage, mixed, "first")] = _train(engine, rank, world_size, 0, K)
        engine.save_checkpoint(_path(root, stage, mixed))
    return out


def _second_half(rank, world_size, cases, root):
    out = {}
    for stage, mixed in cases:
        engine = _engine(stage, mixed)
        manifest = engine.load_checkpoint(_path(root, stage, mixed))
        assert manifest.step == K and engine.global_steps == K
        losses = _train(engine, rank, world_size, K, K)
        out[(stage, mixed)] = (losses, engine.full_state_dict(all_ranks=True))
    return out


def test_exact_resume_is_bit_identical(tmp_path):
    first = run_distributed(_straight_and_first_half, 2, CASES, str(tmp_path), timeout=600)
    second = run_distributed(_second_half, 2, CASES, str(tmp_path), timeout=600)  # new processes
    for rank in range(2):
        for stage, mixed in CASES:
            want_losses, want_sd = first[rank][(stage, mixed, "straight")]
            losses, sd = second[rank][(stage, mixed)]
            assert first[rank][(stage, mixed, "first")] + losses == want_losses, (stage, mixed)
            for k, v in want_sd.items():
                assert torch.equal(sd[k], v), (stage, mixed, k)


def _moments(engine) -> dict[tuple[str, str], torch.Tensor]:
    """Adam's moments of every parameter, whole and element by element: (name, "exp_avg" or
    "exp_avg_sq") -> the parameter's moment, gathered over the ranks' shards."""
    state = engine._checkpoint_state()
    out = {}
    for fu in state.layout.flat_units:
        if not fu.trainable:
            continue
        lo, hi = state.owned[fu.index]
        st = state.optimizer.state[state.masters[fu.index]]
        for key in ("exp_avg", "exp_avg_sq"):
            full = torch.zeros(fu.padded_numel)  # shards are disjoint: their sum is their union
            full[lo:hi] = st[key]
            if hi - lo != fu.padded_numel:
                torch.distributed.all_reduce(full)
            for p in fu.params:
                out[(p.name, key)] = full[p.offset : p.offset + p.numel].clone()
    return out


def _save(rank, world_size, stage, mixed, path):
    """Train K steps and save; also train 2K steps straight, the reference."""
    engine = _engine(stage, mixed)
    _train(engine, rank, world_size, 0, K)
    engine.save_checkpoint(path)
    saved = {"moments": _moments(engine), "sd": engine.full_state_dict(all_ranks=True)}
    engine = _engine(stage, mixed)
    losses = _train(engine, rank, world_size, 0, 2 * K)
    return {**saved, "losses": losses, "final": engine.full_state_dict(all_ranks=True)}


def _reshard_continue(rank, world_size, stage, mixed, path):
    engine = _engine(stage, mixed)
    engine.load_checkpoint(path)
    steps = {float(s["step"]) for s in engine.optimizer.state.values()}
    moments = _moments(engine)
    loaded = engine.full_state_dict(all_ranks=True)
    losses = _train(engine, rank, world_size, K, K)
    return {
        "steps": steps,
        "moments": moments,
        "loaded": loaded,
        "losses": losses,
        "global_steps": engine.global_steps,
        "sd": engine.full_state_dict(all_ranks=True),
    }


# (saved world size, stage) -> [(loaded world size, stage)], precision, and the tolerances of
# the continued run against the uninterrupted one at the saved world size (relative loss, weight
# difference): the reduction order differs, and Adam turns a last-bit difference in a near-zero
# gradient element into an update of about lr in either direction.
RESHARDS = {
    "down-3-to-2-and-1": ((3, 3), [(2, 2), (1, 0)], "no", 1e-5, 2e-5),  # 6.9e-8, 9.7e-7
    "up-2-to-3": ((2, 2), [(3, 3)], "no", 2e-4, 5e-4),  # measured 3.8e-5, 2.0e-4
    "up-1-to-4": ((1, 0), [(4, 1)], "no", 2e-4, 5e-4),  # measured 1.0e-7, 3.8e-7
    "bf16-2-to-3": ((2, 1), [(3, 3)], "bf16", 1e-3, 1e-2),  # measured 4.5e-5, 2.1e-3
}


@pytest.mark.parametrize("case", RESHARDS)
def test_reshard_keeps_every_element_and_continues_like_the_uninterrupted_run(tmp_path, case):
    """Save at one world size and stage, load at others (down and up, fp32 and bf16): every
    master weight and every element of both Adam moments is the saved one, bit for bit, Adam's
    step count survives, and training continues like the uninterrupted run (within
    reduction-order noise of the precision)."""
    (save_ws, save_stage), loads, mixed, loss_rtol, weight_atol = RESHARDS[case]
    path = str(tmp_path / "ckpt")
    saved = run_distributed(_save, save_ws, save_stage, mixed, path)[0]
    assert saved["moments"] and all(v.abs().sum() > 0 for v in saved["moments"].values())
    for world_size, stage in loads:
        got = run_distributed(_reshard_continue, world_size, stage, mixed, path)
        for r in got:
            assert r["steps"] == {float(K)}, r["steps"]  # Adam's step count survives
            assert r["moments"].keys() == saved["moments"].keys()
            for key, want in saved["moments"].items():  # every element, resharded
                assert torch.equal(r["moments"][key], want), (case, world_size, stage, key)
            for key, want in saved["sd"].items():
                assert torch.equal(r["loaded"][key], want), (case, world_size, stage, key)
            assert r["global_steps"] == 2 * K
            loss_diff = max(abs(a - b) / b for a, b in zip(r["losses"], saved["losses"][K:]))
            weight_diff = max_weight_diff(r["sd"], saved["final"])
            print(f"{case} -> {world_size} ranks: loss {loss_diff:.2e}, weights {weight_diff:.2e}")
            assert loss_diff <= loss_rtol, (case, world_size, stage, r["losses"], saved["losses"])
            assert weight_diff <= weight_atol, (case, world_size, stage, weight_diff)
