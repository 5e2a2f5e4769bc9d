"""Any elementwise torch optimizer works through the engine, with its param groups and
hyperparameters, and LR schedulers keep working on `engine.optimizer`.

Tiny GPT-2, 2 ranks, 6 steps of accumulation 2, clipping at 1.0, fp32, against the same optimizer
(and scheduler) in one process on the global batch, as tests/test_parity.py does for AdamW. Each
case gives its two param groups different hyperparameters, so a group that lost its settings
shows. Per case and stage: losses 1e-5 relative at every micro-step, the pre-clip gradient norm
1e-5 relative at every step (clipping hides a wrong gradient scale from the weights), final
weights 2e-5 absolute, the lr of every group before every step equal to the reference's, the
groups' hyperparameters and optimizer-state keys equal at the end, and `engine.optimizer is` the
optimizer passed in. One case, plain SGD without clipping, moves every weight by lr times its
gradient, so a wrong gradient scale or learning rate shows in the weights themselves.

One `run_distributed` call trains every case; the tests assert on its table.
"""

from __future__ import annotations

import contextlib
import json
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist

import hf_zero
from hf_zero.optimizer import FUSED_CLASSES, IMPLEMENTATION_KEYS
from scripts.harness.cases import ACCUM, global_batch, make_model, max_weight_diff, rank_slice
from scripts.harness.dist import run_distributed

WORLD_SIZE = 2
STEPS = 6
CLIP = 1.0
STAGES = (1, 2, 3)
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-5
WEIGHT_ATOL = 2e-5

CASES = (
    "sgd_unclipped",
    "sgd_nesterov",
    "adagrad",
    "rmsprop",
    "adam_group_weight_decay",
    "adamw_linear_warmup",
    "lambdalr_before_initialize",
    "adamw_explicit_for_loop",
)
CASE_CLASSES = {
    "sgd_unclipped": torch.optim.SGD,
    "sgd_nesterov": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adam_group_weight_decay": torch.optim.Adam,
    "adamw_linear_warmup": torch.optim.AdamW,
    "lambdalr_before_initialize": torch.optim.AdamW,
    "adamw_explicit_for_loop": torch.optim.AdamW,
}
SCHEDULED = ("adamw_linear_warmup", "lambdalr_before_initialize")
UNCLIPPED = ("sgd_unclipped",)


def _groups(model: torch.nn.Module) -> tuple[list, list]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "ln" in name else decay).append(p)
    return decay, no_decay


def _make_optimizer(case: str, model: torch.nn.Module):
    """(optimizer, scheduler built before initialize or None)."""
    decay, no_decay = _groups(model)
    if case == "sgd_unclipped":  # the update is -lr * grad, nothing else
        opt = torch.optim.SGD([{"params": decay}, {"params": no_decay, "lr": 0.05}], lr=0.1)
    elif case == "sgd_nesterov":
        opt = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": 1e-2},
                {"params": no_decay, "lr": 5e-3, "momentum": 0.8},
            ],
            lr=1e-2,
            momentum=0.9,
            nesterov=True,
        )
    elif case == "adagrad":
        # torch's Adagrad creates its state ("sum", "step") in __init__, before any step.
        opt = torch.optim.Adagrad(
            [{"params": decay, "lr_decay": 0.05}, {"params": no_decay, "lr": 3e-2}],
            lr=1e-2,
            initial_accumulator_value=0.1,
        )
    elif case == "rmsprop":
        opt = torch.optim.RMSprop(
            [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "centered": True}],
            lr=1e-3,
            momentum=0.5,
        )
    elif case == "adam_group_weight_decay":
        opt = torch.optim.Adam(
            [
                {"params": decay, "weight_decay": 0.1},
                {"params": no_decay, "weight_decay": 0.0, "amsgrad": True},
            ],
            lr=1e-3,
        )
    elif case in ("adamw_linear_warmup", "lambdalr_before_initialize"):
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
        )
    elif case == "adamw_explicit_for_loop":  # a kernel the user chose is kept
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
            foreach=False,
        )
    else:
        raise ValueError(case)
    if case == "lambdalr_before_initialize":
        lambdas = [lambda s: 0.7**s, lambda s: 1.0 / (1 + s)]
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
    return opt, None


def _make_late_scheduler(case: str, opt: torch.optim.Optimizer):
    """The scheduler built after initialize, on engine.optimizer (or None)."""
    if case == "adamw_linear_warmup":
        from transformers import get_linear_schedule_with_warmup

        return get_linear_schedule_with_warmup(opt, 2, STEPS)
    return None


def _hyperparameters(opt: torch.optim.Optimizer) -> list[dict]:
    """What each group updates with; the kernel choice (`fused`, `foreach`) is checked apart."""
    return [
        {k: v for k, v in g.items() if k != "params" and k not in IMPLEMENTATION_KEYS}
        for g in opt.param_groups
    ]


def _kernels(opt: torch.optim.Optimizer) -> list[tuple]:
    return [(g.get("fused"), g.get("foreach")) for g in opt.param_groups]


def _state_keys(opt: torch.optim.Optimizer) -> list[list[str]]:
    return [
        sorted({k for p in g["params"] for k in opt.state.get(p, {})}) for g in opt.param_groups
    ]


def _train_reference(case: str) -> dict:
    model = make_model("gpt2")
    opt, sched = _make_optimizer(case, model)
    sched = sched or _make_late_scheduler(case, opt)
    clip = float("inf") if case in UNCLIPPED else CLIP  # an infinite max_norm only measures
    losses, lrs, norms = [], [], []
    for step in range(STEPS):
        for micro in range(ACCUM):
            loss = model(**global_batch("gpt2", step, micro, WORLD_SIZE)).loss
            (loss / ACCUM).backward()
            losses.append(loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
    return {
        "losses": losses,
        "lrs": lrs,
        "norms": norms,
        "hyper": _hyperparameters(opt),
        "state_keys": _state_keys(opt),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def _train_engine(case: str, stage: int, rank: int) -> tuple[hf_zero.ZeroEngine, dict]:
    model = make_model("gpt2")
    opt, sched = _make_optimizer(case, model)
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
    same_object = engine.optimizer is opt
    sched = sched or _make_late_scheduler(case, engine.optimizer)
    losses, lrs, norms = [], [], []
    for step in range(STEPS):
        for micro in range(ACCUM):
            batch = rank_slice(global_batch("gpt2", step, micro, WORLD_SIZE), rank)
            ctx = engine.no_sync() if micro < ACCUM - 1 else contextlib.nullcontext()
            with ctx:
                loss = engine(**batch).loss
                engine.backward(loss / ACCUM)
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / WORLD_SIZE)
        if case not in UNCLIPPED:
            engine.clip_grad_norm_(CLIP)
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
        engine.step()
        norms.append(engine.grad_norm.item())  # pre-clip, also when the engine did not clip
        if sched is not None:
            sched.step()
        engine.zero_grad()
    return engine, {
        "losses": losses,
        "lrs": lrs,
        "norms": norms,
        "hyper": _hyperparameters(engine.optimizer),
        "kernels": _kernels(engine.optimizer),
        "state_keys": _state_keys(engine.optimizer),
        "same_object": same_object,
    }


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def _optimizers_worker(rank: int, world_size: int, cases, stages) -> dict:
    # A scheduler that does not see the optimizer step (the engine bypassing the wrapped
    # optimizer.step) warns on its first step; make that an error.
    warnings.filterwarnings("error", message=r".*lr_scheduler\.step\(\)")
    warnings.filterwarnings("error", message=r".*optimizer\.step\(\)` has been overridden")
    rows = {}
    for case in cases:
        ref = _train_reference(case)
        for stage in stages:
            try:
                engine, got = _train_engine(case, stage, rank)
                full = engine.full_state_dict()
                row = {
                    "loss": _rel(ref["losses"], got["losses"]),
                    "norm": _rel(ref["norms"], got["norms"]),
                    "lrs": got["lrs"],
                    "ref_lrs": ref["lrs"],
                    "hyper": got["hyper"],
                    "ref_hyper": ref["hyper"],
                    "kernels": got["kernels"],
                    "state_keys": got["state_keys"],
                    "ref_state_keys": ref["state_keys"],
                    "same_object": got["same_object"],
                }
                if rank == 0:
                    assert set(full) == set(ref["state_dict"]), set(full) ^ set(ref["state_dict"])
                    row["weights"] = max_weight_diff(full, ref["state_dict"])
            except Exception:
                # Both ranks fail the same way at initialize; keep going with the other cases.
                row = {"error": traceback.format_exc()}
            rows[(case, stage)] = row
    return rows


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_optimizers_worker, WORLD_SIZE, CASES, STAGES, timeout=300)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(
    "case",
    [c for c in CASES],
)
def test_optimizer_matches_single_process(results, case, stage):
    for rank, rows in enumerate(results):
        r = rows[(case, stage)]
        assert "error" not in r, f"rank {rank} failed:\n{r['error']}"
        assert r["same_object"], "engine.optimizer is not the optimizer passed to initialize"
        assert r["loss"] <= LOSS_RTOL, f"rank {rank}: loss rel diff {r['loss']:.3g}"
        assert r["norm"] <= NORM_RTOL, f"rank {rank}: grad norm rel diff {r['norm']:.3g}"
        assert r["lrs"] == r["ref_lrs"], f"rank {rank}: lr per step {r['lrs']} != {r['ref_lrs']}"
        assert r["hyper"] == r["ref_hyper"]
        # The reference steps with torch's default CPU kernel (a for-loop); the engine picks the
        # fused one for the classes that have it, so parity holds across the two kernels.
        if case == "adamw_explicit_for_loop":
            want = (None, False)
        else:
            want = (True, None) if CASE_CLASSES[case] in FUSED_CLASSES else (None, None)
        assert r["kernels"] == [want, want], r["kernels"]
        assert r["state_keys"] == r["ref_state_keys"]
    weights = results[0][(case, stage)]["weights"]
    assert weights <= WEIGHT_ATOL, f"max weight diff {weights:.3g}"


@pytest.mark.parametrize("case", SCHEDULED)
def test_schedules_change_the_lr(results, case):
    # Guards the lr comparison above: with a schedule, the lr must actually move, per group.
    lrs = results[0][(case, STAGES[0])]["ref_lrs"]
    assert len(lrs) == STEPS
    for group in range(len(lrs[0])):
        assert len({step[group] for step in lrs}) >= STEPS - 1, lrs


def _one_step(engine: hf_zero.ZeroEngine) -> None:
    loss = engine(**global_batch("gpt2", 0, 0, 1)).loss
    engine.backward(loss)
    engine.step()
    engine.zero_grad()


def test_kernel_choice_is_the_loading_engines_own(tmp_path):
    """A checkpoint records the kernel that stepped it (fused), but loading it into an engine
    whose optimizer chose torch's for-loop keeps that choice, and the state still steps."""
    assert not dist.is_initialized()  # world size 1, no process group
    model = make_model("gpt2")
    saver = hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert [g["fused"] for g in saver.optimizer.param_groups] == [True]
    _one_step(saver)
    saver.save_checkpoint(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "zero" / "manifest.json").read_text())
    assert manifest["optimizer"]["param_groups"][0]["fused"] is True

    model = make_model("gpt2", seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    loader = hf_zero.initialize(model, opt)
    loader.load_checkpoint(tmp_path / "ckpt")
    assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(None, False)]
    assert all(
        torch.equal(a, b)
        for a, b in zip(saver.full_state_dict().values(), loader.full_state_dict().values())
    )
    _one_step(saver)
    _one_step(loader)
    for key, a in saver.full_state_dict().items():
        torch.testing.assert_close(loader.full_state_dict()[key], a, rtol=0, atol=1e-6)


def test_differentiable_groups_keep_the_default_kernel():
    model = make_model("gpt2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, differentiable=True)
    engine = hf_zero.initialize(model, opt)
    assert [g["fused"] for g in engine.optimizer.param_groups] == [None]
