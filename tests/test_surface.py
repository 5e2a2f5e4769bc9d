"""The engine's public surface (CONTRACT: what integrations and users code against), and the
routing that makes `engine.optimizer` and the model's own `zero_grad()` drive the engine.

Tier 1-2: world size 1 in this process (no process group), Accelerate's wrappers in a spawned
rank of its own (their state is process-wide).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hf_zero
from scripts.harness.cases import global_batch, make_model, param_groups
from scripts.harness.dist import run_distributed

# Beyond nn.Module's own names; `forward` and `zero_grad` are nn.Module's, overridden.
PUBLIC = {
    "module",
    "config",
    "optimizer",
    "rank",
    "world_size",
    "backward",
    "no_sync",
    "clip_grad_norm_",
    "step",
    "grad_norm",
    "global_steps",
    "skipped_steps",
    "step_was_skipped",
    "save_checkpoint",
    "load_checkpoint",
    "export",
    "full_state_dict",
    "wait_for_params",
    "memory_stats",
    "comm_stats",
    "wire_stats",
    "num_parameters",
    "summary",
}
OVERRIDDEN = {"forward", "zero_grad"}


@pytest.fixture(autouse=True)
def _no_process_group():
    assert not dist.is_initialized(), "a test left torch.distributed initialised in pytest"


def _engine(stage=2, **config):
    model = make_model("gpt2")
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    return hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage, **config))


def _train(engine, steps, *, step=None, zero=None, scheduler=None):
    for s in range(steps):
        engine.backward(engine(**global_batch("gpt2", s, 0, 1)).loss)
        (step or engine.step)()
        if scheduler is not None:
            scheduler.step()
        (zero or engine.zero_grad)()


@pytest.mark.parametrize("stage", [0, 3])
def test_public_attributes_are_exactly_the_documented_ones(stage):
    engine = _engine(stage)
    _train(engine, 1)
    public = {n for n in dir(engine) if not n.startswith("_")}
    module_own = set(dir(nn.Module()))
    assert public - module_own == PUBLIC
    own = {n for n in vars(type(engine)) if not n.startswith("_")}
    attributes = {"module", "config", "grad_norm", "global_steps", "skipped_steps"}
    assert own == (PUBLIC - attributes - {"step_was_skipped"}) | OVERRIDDEN
    assert isinstance(engine.config, hf_zero.ZeroConfig) and engine.module is not None
    assert (engine.rank, engine.world_size) == (0, 1)
    assert isinstance(engine.grad_norm, torch.Tensor) and engine.grad_norm.dim() == 0
    assert (engine.global_steps, engine.skipped_steps, engine.step_was_skipped) == (1, 0, False)


def test_summary_reports_the_setup_and_the_ddp_comparison():
    engine = _engine(3, mixed_precision="bf16")
    _train(engine, 2)
    s = engine.summary()
    n = engine.num_parameters()
    assert set(s) == {
        "stage",
        "world_size",
        "mixed_precision",
        "global_steps",
        "skipped_steps",
        "num_parameters",
        "trainable_parameters",
        "memory_stats",
        "ddp_model_state_bytes",
    }
    assert (s["stage"], s["world_size"], s["mixed_precision"]) == (3, 1, "bf16")
    assert (s["global_steps"], s["skipped_steps"]) == (2, 0)
    assert s["num_parameters"] == s["trainable_parameters"] == n
    assert s["memory_stats"] == engine.memory_stats()
    # Plain data parallelism with AdamW: 16 bytes per trainable parameter, whatever the precision.
    assert s["ddp_model_state_bytes"] == 16 * n


def test_optimizer_step_and_zero_grad_are_the_engines():
    a, b = _engine(), _engine()
    _train(a, 3)
    _train(b, 3, step=b.optimizer.step, zero=b.optimizer.zero_grad)
    assert b.global_steps == 3 and b.optimizer.step() is False  # no backward since: a no-op
    sa, sb = a.full_state_dict(), b.full_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(TypeError, match=r"engine\.optimizer\.step\(closure\) is not supported"):
        b.optimizer.step(lambda: 0.0)


@pytest.mark.parametrize("built", ["before", "after"])
@pytest.mark.parametrize("steps_with", ["engine", "optimizer"])
def test_lr_schedulers_built_before_or_after_initialize_drive_the_engine(built, steps_with):
    model = make_model("gpt2")
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)

    def make(o):
        return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s)

    scheduler = make(opt) if built == "before" else None
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=1))
    scheduler = scheduler or make(engine.optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns if it thinks the step went around it
        _train(
            engine,
            3,
            step=engine.step if steps_with == "engine" else engine.optimizer.step,
            scheduler=scheduler,
        )
    assert engine.global_steps == 3
    assert [g["lr"] for g in engine.optimizer.param_groups] == [1e-3 * 0.5**3] * 2


def _accelerate_worker(rank, world_size):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    Accelerator(cpu=True)  # the state the wrappers read
    engine = _engine(2)
    opt = AcceleratedOptimizer(engine.optimizer, device_placement=False)
    sched = AcceleratedScheduler(
        torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: 0.5**s), opt
    )
    for s in range(2):
        engine.backward(engine(**global_batch("gpt2", s, 0, 1)).loss)
        opt.step()
        sched.step()
        opt.zero_grad()
    return engine.global_steps, [g["lr"] for g in engine.optimizer.param_groups]


def test_accelerates_optimizer_and_scheduler_wrappers_drive_the_engine_unchanged():
    ((steps, lrs),) = run_distributed(_accelerate_worker, 1, timeout=300)
    assert steps == 2 and lrs == [1e-3 * 0.25] * 2
