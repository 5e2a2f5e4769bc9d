"""Tier 2-3: the mistakes a user can make around an engine either work as in torch/DDP or stop
with an error that names the fix (issue 11, items 5-11, 14 and 15). Every stage, at world sizes
1, 2 and 3 where ranks matter; errors matched by text.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import pytest
import torch
import torch.distributed as dist

import hf_zero
from scripts.harness.cases import (
    ACCUM,
    global_batch,
    make_model,
    max_weight_diff,
    param_groups,
    rank_slice,
    run_reference,
)
from scripts.harness.dist import run_distributed

STAGES = (0, 1, 2, 3)
WORLD_SIZES = (1, 2, 3)
STEPS = 2

NO_ZERO = re.escape(
    "backward after step() without zero_grad(): the gradients of the last step are still held "
    "(already unscaled, averaged over ranks and clipped in place), so this backward would add to "
    "them. Call engine.zero_grad() (or optimizer.zero_grad() / model.zero_grad()) after each "
    "step()"
)
CLIP = (
    r"torch\.nn\.utils\.clip_grad_(norm|value)_ was given the parameters of a hf_zero engine "
    r"\(stage \d\): their \.grad does not hold the global gradient .* Call "
    r"engine\.clip_grad_norm_\(max_norm\) \(with Accelerate: accelerator\.clip_grad_norm_ of "
    r"hf_zero's ZeroAccelerator\), or set ZeroConfig\(gradient_clipping=max_norm\)"
)


def _engine(stage, model=None, **config):
    model = model if model is not None else make_model("gpt2")
    opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    return hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage, **config))


def _loss(engine, rank, world_size, step=0, micro=0):
    return engine(**rank_slice(global_batch("gpt2", step, micro, world_size), rank)).loss


def _raises(fn, *args) -> str:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the type is asserted by the caller
        return f"{type(e).__name__}: {e}"
    return "no error"


# ---- 5. accumulation with and without no_sync ----------------------------------------------------


def _accumulate_worker(rank, world_size):
    """Each stage, with no_sync on the first micro-step (the usual way), on none, or on the last:
    each micro-step must count once, as DDP counts it (DDP averages every reduction)."""
    ref_losses, ref_norms, ref_sd = run_reference("gpt2", STEPS, world_size)
    rows = []
    for stage in STAGES:
        for pattern in ("first", "none", "last"):
            engine = _engine(stage)
            norms = []
            for step in range(STEPS):
                for micro in range(ACCUM):
                    quiet = {"first": micro == 0, "none": False, "last": micro == ACCUM - 1}
                    ctx = engine.no_sync() if quiet[pattern] else contextlib.nullcontext()
                    with ctx:
                        engine.backward(_loss(engine, rank, world_size, step, micro) / ACCUM)
                norms.append(engine.clip_grad_norm_(1.0).item())
                engine.step()
                engine.zero_grad()
            full = engine.full_state_dict()
            row = {"stage": stage, "pattern": pattern, "norms": norms}
            if rank == 0:
                row["weights"] = max_weight_diff(full, ref_sd)
            rows.append(row)
    return ref_norms, rows


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_each_micro_step_counts_once_with_or_without_no_sync(world_size):
    results = run_distributed(_accumulate_worker, world_size, timeout=900)
    ref_norms, rows = results[0]
    for row in rows:
        # The pre-clip norm sees any wrong scale (the clip and AdamW would hide it).
        assert row["norms"] == pytest.approx(ref_norms, rel=1e-5), row
        assert row["weights"] <= 2e-5, row


def _bare_second_backward_worker(rank, world_size, stage):
    engine = _engine(stage)
    _loss(engine, rank, world_size).backward()  # the first synchronised backward is fine
    return _raises(lambda: _loss(engine, rank, world_size, micro=1).backward())


@pytest.mark.parametrize("stage", [0, 1])
def test_second_bare_backward_before_step_is_refused(stage):
    # Stages 0-1 reduce in the synchronised backward into the buffers .grad are views of.
    for message in run_distributed(_bare_second_backward_worker, 2, stage, timeout=300):
        assert message.startswith(
            f"RuntimeError: hf_zero stage {stage}: a second backward before "
        ), message
        assert "Call engine.backward(loss)" in message and "engine.no_sync()" in message


def _stage1_sends_in_backward_worker(rank, world_size):
    engine = _engine(1, bucket_size=2_000)  # a few buckets: blocks first, the embeddings last
    sent, early = [], []

    # The gradient of the embedding output arrives after every block's backward and before the
    # embeddings' own gradients: the blocks' buckets must be on the wire by then.
    def watch(module, args, out):
        out.register_hook(lambda g: early.append(engine.comm_stats().get("reduce_scatter", 0)))

    engine.module.transformer.wte.register_forward_hook(watch)
    for micro in range(3):
        ctx = engine.no_sync() if micro < 2 else contextlib.nullcontext()
        with ctx:
            engine.backward(_loss(engine, rank, world_size, micro=micro))
        sent.append(engine.comm_stats().get("reduce_scatter", 0))
    engine.step()  # nothing left to reduce at the step
    sent.append(engine.comm_stats().get("reduce_scatter", 0))
    return sent, early, engine.num_parameters()


def test_stage1_reduce_scatters_once_per_step_overlapped_with_the_last_backward():
    for sent, early, numel in run_distributed(_stage1_sends_in_backward_worker, 2, timeout=300):
        assert sent[0] == sent[1] == 0, sent  # no_sync: nothing on the wire
        assert sent[2] >= 4 * numel and sent[3] == sent[2], sent  # every gradient, once
        assert early[:2] == [0, 0] and 0 < early[2] < sent[2], (early, sent)  # in backward


# ---- 6, 7, 8, 9, 15: the loop's other mistakes, every stage --------------------------------------


def _loop_worker(rank, world_size):
    rows = []
    for stage in STAGES:
        row = {"stage": stage}
        engine = _engine(stage)
        model = engine.module

        # 7. step() with no backward: nothing changes, nothing is counted.
        before = engine.full_state_dict(all_ranks=True)
        row["idle_step"] = (engine.step(), engine.step_was_skipped, engine.global_steps)
        engine.backward(_loss(engine, rank, world_size))
        engine.zero_grad()
        row["step_after_zero_grad"] = engine.step()
        after = engine.full_state_dict(all_ranks=True)
        row["idle_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        row["counts"] = (engine.global_steps, engine.skipped_steps)

        # 8. Two clips in one step: the second returns the norm of the clipped gradients.
        engine.backward(_loss(engine, rank, world_size))
        row["clips"] = [engine.clip_grad_norm_(m).item() for m in (1.0, 1.0, 0.5)]
        # 9. torch's own clipping on the engine's parameters is refused, before step().
        row["torch_clip"] = _raises(torch.nn.utils.clip_grad_norm_, model.parameters(), 1.0)
        row["torch_clip_value"] = _raises(torch.nn.utils.clip_grad_value_, model.parameters(), 1)
        row["applied"] = (engine.step(), engine.step_was_skipped)
        adam_steps = [float(s["step"]) for s in engine.optimizer.state.values()]
        row["adam_steps"] = sorted(set(adam_steps))
        row["idle_step_after"] = engine.step()
        row["adam_steps_after_idle"] = sorted(
            {float(s["step"]) for s in engine.optimizer.state.values()}
        )

        # 6. Forgetting zero_grad: the next backward is refused (engine.backward and a bare
        # loss.backward()), and each of the three zero_grads lets it through again.
        engine.zero_grad()
        engine.backward(_loss(engine, rank, world_size, step=1))
        engine.step()
        row["no_zero"] = _raises(engine.backward, _loss(engine, rank, world_size, step=2))
        row["no_zero_bare"] = _raises(_loss(engine, rank, world_size, step=2).backward)
        zeroed = []
        for zero in (engine.zero_grad, engine.optimizer.zero_grad, model.zero_grad):
            zero()
            engine.backward(_loss(engine, rank, world_size, step=3))
            zeroed.append(engine.step())
        row["zeroed"] = zeroed
        engine.zero_grad()

        # 15. save_pretrained at stage 3 points at the export.
        row["save_pretrained"] = _raises(model.save_pretrained, "/nonexistent/hf_zero-never")
        rows.append(row)
    return rows


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_loop_mistakes_match_torch_or_raise(world_size):
    ref = make_model("gpt2")
    ref(**global_batch("gpt2", 0, 0, world_size)).loss.backward()
    ref_clips = [torch.nn.utils.clip_grad_norm_(ref.parameters(), m).item() for m in (1, 1, 0.5)]
    for rank_rows in run_distributed(_loop_worker, world_size, timeout=900):
        for r in rank_rows:
            stage = r["stage"]
            assert r["idle_step"] == (False, True, 0), r
            assert r["step_after_zero_grad"] is False and r["idle_unchanged"], r
            assert r["counts"] == (0, 0), r
            # As torch: 23.2 then 1.0 (here about 3.1, then 1.0, then 0.5 after a second clip).
            assert r["clips"] == pytest.approx(ref_clips, rel=1e-5), (r, ref_clips)
            assert r["clips"][1] == pytest.approx(1.0, abs=1e-5), r
            assert re.fullmatch("RuntimeError: " + CLIP, r["torch_clip"]), r
            assert re.fullmatch("RuntimeError: " + CLIP, r["torch_clip_value"]), r
            assert f"(stage {stage})" in r["torch_clip"], r
            assert r["applied"] == (True, False), r
            assert r["adam_steps"] == [1.0], r  # one applied step: Adam counted one
            assert r["idle_step_after"] is False, r
            assert r["adam_steps_after_idle"] == [1.0], r
            assert re.fullmatch("RuntimeError: " + NO_ZERO, r["no_zero"]), r
            assert re.fullmatch("RuntimeError: " + NO_ZERO, r["no_zero_bare"]), r
            assert r["zeroed"] == [True, True, True], r
            if stage == 3:
                assert r["save_pretrained"] == (
                    "RuntimeError: GPT2LMHeadModel.save_pretrained cannot write a stage-3 model: "
                    f"its parameters are sharded across the {world_size} ranks and the full "
                    "tensors are empty outside forward and backward. Write the HF folder with "
                    "engine.export(output_dir) (collective: call it on every rank), or take "
                    "engine.full_state_dict() on rank 0"
                ), r
            else:  # the model's own save_pretrained is untouched (the path is bad on purpose)
                assert not r["save_pretrained"].startswith("RuntimeError: GPT2LMHeadModel"), r


def _zero_grad_routes_worker(rank, world_size, stage):
    """The same training with each of the three zero_grads gives the same weights."""
    out = []
    for zero in ("engine", "optimizer", "model"):
        engine = _engine(stage)
        fn = {
            "engine": engine.zero_grad,
            "optimizer": engine.optimizer.zero_grad,
            "model": engine.module.zero_grad,
        }[zero]
        for step in range(3):
            engine.backward(_loss(engine, rank, world_size, step))
            engine.step()
            fn()
        out.append(engine.full_state_dict(all_ranks=True))
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_model_optimizer_and_engine_zero_grad_are_the_same(stage):
    # And as torch's: AdamW in one process on the global batch, zero_grad after each step.
    ref = make_model("gpt2")
    opt = torch.optim.AdamW(param_groups(ref), lr=1e-3)
    for step in range(3):
        ref(**global_batch("gpt2", step, 0, 2)).loss.backward()
        opt.step()
        opt.zero_grad()
    for sds in run_distributed(_zero_grad_routes_worker, 2, stage, timeout=300):
        for sd in sds[1:]:
            assert all(torch.equal(sd[k], sds[0][k]) for k in sd)
        assert max_weight_diff(sds[0], ref.state_dict()) <= 2e-5


# ---- 10. one engine per model -------------------------------------------------------------------


def test_initialize_twice_on_one_model_is_refused():
    assert not dist.is_initialized()
    engine = _engine(2)
    model = engine.module
    message = (
        "GPT2LMHeadModel already has a hf_zero engine: hf_zero.initialize was called on it "
        "before, and that engine owns its parameters and gradients (parameter "
        "'transformer.wte.weight'). Keep using the first engine (engine.module is this model), "
        "or build a fresh model for a second engine"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    wrapper = torch.nn.Sequential(model)
    with pytest.raises(ValueError, match=r"^Sequential already has a hf_zero engine \(through "):
        hf_zero.initialize(wrapper, torch.optim.AdamW(wrapper.parameters(), lr=1e-3))
    # The first engine still trains.
    engine.backward(_loss(engine, 0, 1))
    assert engine.step()
    # A fresh model is fine.
    assert _engine(2).global_steps == 0


# ---- 11. parameters of other dtypes -----------------------------------------------------------


def _with_odd_dtypes(model):
    """A frozen int64 counter that fp32 cannot hold (2**25 + 1) and a frozen float64 constant,
    in the root unit and inside a unit."""
    big = torch.tensor([2**25 + 1, -(2**40) - 3], dtype=torch.int64)
    third = torch.tensor([1 / 3, 1e-300], dtype=torch.float64)
    model.register_parameter("counter", torch.nn.Parameter(big, requires_grad=False))
    block = model.transformer.h[0]
    block.register_parameter("third", torch.nn.Parameter(third, requires_grad=False))
    return model


ODD = {"counter": torch.int64, "transformer.h.0.third": torch.float64}


def _odd_dtypes_worker(rank, world_size, stage, tmp):
    engine = _engine(stage, model=_with_odd_dtypes(make_model("gpt2")))
    want = {k: v.detach().clone() for k, v in engine.module.state_dict().items() if k in ODD}
    for step in range(2):
        engine.backward(_loss(engine, rank, world_size, step))
        engine.step()
        engine.zero_grad()
    sd = dict(engine.module.named_parameters())
    out = {
        "kept": all(torch.equal(sd[k], want[k]) and sd[k].dtype == ODD[k] for k in ODD),
        "full": {k: engine.full_state_dict(all_ranks=True)[k] for k in ODD},
        "count": engine.num_parameters() - make_model("gpt2").num_parameters(),
    }
    path = engine.save_checkpoint(f"{tmp}/ckpt")
    with torch.no_grad():
        for k in ODD:
            sd[k].zero_()
    engine.load_checkpoint(path)
    out["restored"] = all(torch.equal(sd[k], want[k]) for k in ODD)
    return out, want


@pytest.mark.parametrize("stage", [0, 3])
def test_frozen_parameters_of_other_dtypes_stay_bit_exact(stage, tmp_path):
    from safetensors.torch import load_file

    results = run_distributed(_odd_dtypes_worker, 2, stage, str(tmp_path), timeout=300)
    want = results[0][1]
    for out, _ in results:
        assert out["kept"] and out["restored"], out
        assert out["count"] == 2 + 2, out
        for k in ODD:
            assert torch.equal(out["full"][k], want[k]) and out["full"][k].dtype == ODD[k]
    # The offline export carries them too, in their own dtypes ("auto": the model's dtypes).
    hf_zero.consolidate(tmp_path / "ckpt", tmp_path / "export", dtype="auto", progress=False)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    for k in ODD:
        assert torch.equal(exported[k], want[k]) and exported[k].dtype == ODD[k], k


def test_trainable_float64_parameter_is_refused_with_how_to_cast():
    model = make_model("gpt2").double()
    message = (
        "parameter 'transformer.wte.weight' is float64 and requires grad: hf_zero trains fp32 "
        "master weights (bf16/fp16 compute with ZeroConfig.mixed_precision), which would round "
        "it. Cast the model before initialize (model.float() or model.to(torch.float32)), or "
        "freeze it (transformer.wte.weight.requires_grad_(False)) to keep it whole, bit-exact, "
        "in float64"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    # The fix it names works.
    model.float()
    assert hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))


# ---- 14. fp16 with a NaN loss every step ---------------------------------------------------------


def test_fp16_nan_every_step_warns_with_the_scale_then_stops_before_underflow():
    engine = _engine(2, mixed_precision="fp16")
    said, error = [], None
    for step in range(100):
        loss = _loss(engine, 0, 1, step) * float("nan")
        engine.backward(loss)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                assert engine.step() is False
            except FloatingPointError as e:
                error = (step, str(e))
                break
        said += [(step, str(w.message)) for w in caught if "loss scale" in str(w.message)]
        engine.zero_grad()
    # Warned after 5, 10, 20 and 40 skipped steps in a row, naming the scale reached.
    assert [s for s, _ in said] == [4, 9, 19, 39], said
    assert said[0][1].startswith(
        "hf_zero: 5 optimizer steps in a row were skipped for non-finite fp16 gradients; the loss "
        "scale is now 2048."
    ), said[0]
    assert "mixed_precision='bf16'" in said[0][1]
    # 2**16 halves to 2**-24 in 40 steps; the 41st would go below: a clear error, not a
    # ZeroDivisionError once the scale reaches 0.
    assert error is not None and error[0] == 40, error
    assert error[1].startswith(
        "fp16 loss scale 5.96046e-08 cannot back off further: 41 optimizer steps in a row had "
        "non-finite gradients, and below 5.96046e-08 the scaled loss is zero in fp16, so "
        "training stopped."
    ), error
    assert engine.skipped_steps == 41 and engine.global_steps == 0
    # The engine is left usable: the gradients were zeroed, a finite loss trains again.
    engine.backward(_loss(engine, 0, 1))
    assert engine.step() is True
