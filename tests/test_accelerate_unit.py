"""ZeroAccelerator and the integrations' common module in one process (world size 1, no
launcher): the guard's arithmetic, config resolution, what prepare accepts and refuses, the
engine calls behind each Accelerator method, fp16 overflow, and save_model's HF folder with
tied weights. The multi-process behaviour is in test_accelerate_launch.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate.scheduler import AcceleratedScheduler
from accelerate.state import AcceleratorState, GradientState

import hf_zero
from hf_zero import comm
from hf_zero.integrations.accelerate import ZeroAccelerator, ZeroOptimizer
from hf_zero.integrations.common import WorldMismatchError, check_world, resolve_zero_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "accelerate_scripts"))
import nlp_example  # noqa: E402

sys.path.remove(str(ROOT / "tests" / "accelerate_scripts"))


@pytest.fixture(autouse=True)
def fresh_accelerate(monkeypatch):
    """No launcher variables; Accelerate's process-wide state reset after each test."""
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _bert():
    torch.manual_seed(0)
    return nlp_example.BertForSequenceClassification(
        nlp_example.BertConfig(
            vocab_size=nlp_example.VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )


def _loader(n=16, batch_size=4):
    data = nlp_example.make_pairs(n, seed=1)
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, collate_fn=nlp_example.collate_fn
    )


# ---- the guard ----------------------------------------------------------------------------

NO_PG = comm.WorldInfo(False, 0, 1, None)


@pytest.mark.parametrize(
    "host, world, env, expected",
    [
        (1, comm.WorldInfo(True, 0, 2, "gloo"), {}, "torch.distributed has 2 processes but "),
        (1, NO_PG, {"WORLD_SIZE": "2"}, "the launcher started 2 processes (WORLD_SIZE=2)"),
        (1, NO_PG, {"LOCAL_WORLD_SIZE": "4"}, "started 4 processes (LOCAL_WORLD_SIZE=4)"),
        (2, comm.WorldInfo(True, 0, 4, "gloo"), {}, "torch.distributed has 4 processes but "),
    ],
)
def test_check_world_stops_a_mismatch(host, world, env, expected):
    with pytest.raises(WorldMismatchError) as e:
        check_world(host, world=world, env=env, host="Accelerate")
    msg = str(e.value)
    assert expected in msg and f"Accelerate trains with {host}" in msg
    n = max([world.world_size, *(int(v) for v in env.values())])
    assert f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n}" in msg


@pytest.mark.parametrize(
    "host, world, env",
    [
        (1, NO_PG, {}),
        (1, NO_PG, {"WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}),
        (2, comm.WorldInfo(True, 0, 2, "gloo"), {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}),
        (4, comm.WorldInfo(True, 0, 4, "nccl"), {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}),
    ],
)
def test_check_world_passes_agreeing_worlds(host, world, env):
    check_world(host, world=world, env=env)


def test_zero_accelerator_runs_the_guard(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(WorldMismatchError, match=r"started 2 processes \(LOCAL_WORLD_SIZE=2\)"):
        ZeroAccelerator()


# ---- config resolution ----------------------------------------------------------------------


def test_resolve_zero_config():
    assert resolve_zero_config().stage == 2
    assert resolve_zero_config(stage=1).stage == 1
    from_file = resolve_zero_config(str(ROOT / "configs" / "zero3.yaml"))
    assert (from_file.stage, from_file.mixed_precision) == (3, "no")
    assert resolve_zero_config(from_file, host_mixed_precision="bf16").mixed_precision == "bf16"
    fp16 = hf_zero.ZeroConfig(mixed_precision="fp16")
    assert resolve_zero_config(fp16, host_mixed_precision="no") is fp16
    assert resolve_zero_config(fp16, host_mixed_precision="fp16") is fp16


def test_resolve_zero_config_conflicts():
    with pytest.raises(ValueError, match=r"stage 3 was asked for, but config file .*zero2.yaml"):
        resolve_zero_config(str(ROOT / "configs" / "zero2.yaml"), stage=3)
    with pytest.raises(
        ValueError, match=r"mixed_precision is 'bf16' but the ZeroConfig has mixed_precision="
    ):
        resolve_zero_config(hf_zero.ZeroConfig(mixed_precision="fp16"), host_mixed_precision="bf16")
    with pytest.raises(ValueError, match=r"mixed_precision is 'fp8', which hf_zero does not"):
        resolve_zero_config(host_mixed_precision="fp8")
    with pytest.raises(TypeError, match=r"zero_config must be a hf_zero.ZeroConfig, a path"):
        resolve_zero_config({"stage": 2})


def test_zero_accelerator_precision_conflict_names_both():
    with pytest.raises(ValueError, match=r"'bf16' but the ZeroConfig has mixed_precision='fp16'"):
        ZeroAccelerator(
            cpu=True,
            mixed_precision="bf16",
            zero_config=hf_zero.ZeroConfig(mixed_precision="fp16"),
        )


def test_zero_accelerator_refuses_other_engines(monkeypatch):
    """Refused before Accelerate sets the other engine up: it would also set
    ACCELERATE_USE_FSDP in this process's environment, for every later launch to inherit."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ValueError, match=r"set up for \['fsdp_plugin'\], but ZeroAccelerator"):
        ZeroAccelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin())
    assert "ACCELERATE_USE_FSDP" not in os.environ


# ---- prepare and the loop ---------------------------------------------------------------------


def test_prepare_in_any_order_and_the_loop_reaches_the_engine():
    """prepare(loader, scheduler, model, optimizer): the engine, its optimizer, Accelerate's
    loader and scheduler; the scheduler drives the sharded optimizer's lr; clip_grad_norm_ is
    the engine's global norm; unwrap_model and get_state_dict give the model's own names."""
    accelerator = ZeroAccelerator(
        cpu=True, gradient_accumulation_steps=2, zero_config=hf_zero.ZeroConfig(stage=3)
    )
    model = _bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    loader, scheduler, engine, opt = accelerator.prepare(_loader(), scheduler, model, optimizer)
    assert isinstance(engine, hf_zero.ZeroEngine) and engine.module is model
    assert engine._is_accelerate_prepared and opt._is_accelerate_prepared
    assert isinstance(opt, ZeroOptimizer) and opt.optimizer is engine.optimizer
    assert isinstance(scheduler, AcceleratedScheduler) and scheduler.optimizers == [opt]
    assert engine.config.stage == 3 and accelerator.unwrap_model(engine) is model
    norms = []
    for batch in loader:
        with accelerator.accumulate(engine):
            accelerator.backward(engine(**batch).loss)
            if accelerator.sync_gradients:
                norms.append(accelerator.clip_grad_norm_(engine.parameters(), 1.0))
            opt.step()
            scheduler.step()
            opt.zero_grad()
    assert len(norms) == 2 and engine.global_steps == 2
    assert norms[-1] is engine.grad_norm and float(norms[-1]) > 0
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    state = accelerator.get_state_dict(engine)
    assert state.keys() == model.state_dict().keys()
    assert set(accelerator.get_state_dict(model, unwrap=False)) == {f"module.{k}" for k in state}


def test_prepare_refusals():
    accelerator = ZeroAccelerator(cpu=True)
    model = _bert()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"the AdamW at position 0 came without the model"):
        accelerator.prepare(optimizer)
    extra = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match=r"two optimizers \(positions 1 and 2\) hold the param"):
        accelerator.prepare(model, optimizer, extra)
    engine, opt = accelerator.prepare(model, optimizer)
    other = _bert()
    with pytest.raises(ValueError, match=r"already trains a BertForSequenceClassification"):
        accelerator.prepare(other, torch.optim.AdamW(other.parameters()))
    loss = engine(**next(iter(_loader()))).loss
    with pytest.raises(TypeError, match=r"backward takes only the loss, got \['retain_graph'\]"):
        accelerator.backward(loss, retain_graph=True)
    accelerator.backward(loss)
    with pytest.raises(ValueError, match=r"pass model.parameters\(\) and norm_type=2 \(got 2 of"):
        accelerator.clip_grad_norm_(list(engine.parameters())[:2], 1.0)
    with pytest.raises(ValueError, match=r"norm_type=1"):
        accelerator.clip_grad_norm_(engine.parameters(), 1.0, norm_type=1)
    with pytest.raises(ValueError, match=r"exports safetensors only"):
        accelerator.save_model(engine, "unused", safe_serialization=False)
    with pytest.raises(TypeError, match=r"save_state takes no model-saving options, got \['tag'"):
        accelerator.save_state("unused", tag="x")


def test_fp16_overflow_skips_the_step_and_the_scheduler():
    """fp16 with a loss scale that overflows: optimizer.step_was_skipped is the engine's, and
    Accelerate's scheduler does not step; the next step (scale backed off) applies."""
    config = hf_zero.ZeroConfig(
        stage=2, mixed_precision="fp16", initial_loss_scale=2.0**40, loss_scale_backoff_factor=1e-9
    )
    accelerator = ZeroAccelerator(cpu=True, zero_config=config)
    model = _bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    engine, opt, scheduler = accelerator.prepare(model, optimizer, scheduler)
    skipped, lrs = [], []
    for batch in _loader(n=8):
        accelerator.backward(engine(**batch).loss)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        skipped.append(opt.step_was_skipped)
        lrs.append(scheduler.get_last_lr()[0])
    assert skipped == [True, False] and accelerator.optimizer_step_was_skipped is False
    assert lrs == [1e-2, 5e-3]
    assert (engine.global_steps, engine.skipped_steps) == (1, 1)


def test_save_model_drops_tied_weights(tmp_path):
    """save_model on a model with tied weights (GPT-2's lm_head / wte) writes the folder
    save_pretrained writes: the tied copy dropped, and from_pretrained loads it all."""
    from safetensors import safe_open
    from transformers import GPT2Config, GPT2LMHeadModel

    accelerator = ZeroAccelerator(cpu=True, zero_config=hf_zero.ZeroConfig(stage=3))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    engine, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        expected = engine.eval()(input_ids=ids).logits
    for _ in range(2):  # a second save into the same folder replaces the first
        accelerator.save_model(engine, tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    reference = tmp_path / "reference"
    GPT2LMHeadModel(model.config).save_pretrained(reference)
    with safe_open(reference / "model.safetensors", "pt") as f:
        assert keys == set(f.keys()) and "lm_head.weight" not in keys
    loaded, info = GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert all(not v for v in info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)


def test_save_state_with_automatic_naming_round_trip(tmp_path):
    """save_state with Accelerate's automatic checkpoint naming and total_limit: the engine's
    checkpoint goes into the folder Accelerate picks (and is deleted with it); load_state()
    with no folder loads the latest, engine and Accelerate state (scheduler, step, registered
    object) alike."""
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(
        project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=1
    )
    accelerator = ZeroAccelerator(cpu=True, project_config=project)
    model = _bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    engine, opt, scheduler = accelerator.prepare(model, optimizer, scheduler)
    progress = nlp_example.Progress()
    accelerator.register_for_checkpointing(progress)
    batches = list(_loader(n=12))

    def train_step(batch):
        accelerator.backward(engine(**batch).loss)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        progress.batches += 1

    for batch in batches[:2]:
        train_step(batch)
        accelerator.save_state()
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["checkpoint_1"]  # total_limit removed checkpoint_0
    assert (tmp_path / "checkpoints" / "checkpoint_1" / "zero_checkpoint").is_dir()
    assert not (tmp_path / "checkpoints" / "checkpoint_1" / "optimizer.bin").exists()
    saved = {k: v.clone() for k, v in accelerator.get_state_dict(engine).items()}
    train_step(batches[2])
    accelerator.load_state()
    assert progress.batches == 2 and scheduler.get_last_lr() == [2.5e-3]
    assert engine.global_steps == 2
    for k, v in accelerator.get_state_dict(engine).items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
