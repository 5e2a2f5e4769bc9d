"""Exact resume under ZeroTrainer, calibrated by plain DDP Trainer, and resume refusals.

`resume_worker` (2 ranks), for plain Trainer and for ZeroTrainer at stage 3, with dropout on (so
the RNG restore matters) and a stop in the middle of an epoch (so the Trainer skips batches):
  1. the uninterrupted run: 6 optimizer steps, a checkpoint every 2;
  2. the same run stopped after step 4 by a callback (the schedule still ends at step 6);
  3. a new Trainer resuming with resume_from_checkpoint=True (the newest, checkpoint-4).
Steps 5-6 of (3) must equal those of (1) bit for bit. Then checkpoint-4 of the ZeroTrainer run
is resumed at stage 1 (same ranks, so the same RNG files apply: within reduction-order noise).
A dropout-free pair (uninterrupted, stopped) at stage 2 leaves a checkpoint for
`other_world_worker`, which resumes it on 1 rank with twice the per-device batch (the same
global batches): within reduction-order noise of the uninterrupted run.

`refusals_worker` (run last by `resume_worker`): what must fail before any training step, on
every rank.
"""

from __future__ import annotations

from pathlib import Path

from tests.trainer_scripts.common import lm_data, logged, tiny_gpt2, trainer_args

STOP_AT = 4
COMMON = dict(
    max_steps=6,
    gradient_accumulation_steps=2,
    lr_scheduler_type="cosine",
    warmup_steps=1,
    weight_decay=0.1,
    max_grad_norm=1.0,
    save_strategy="steps",
    save_steps=2,
)
N_TRAIN = 48  # 2 ranks x 2 per device x 2 accumulation = 8 a step: 6 steps an epoch


def _callbacks():
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == STOP_AT:
                control.should_training_stop = True

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_begin(self, args, state, control, **kw):
            CountSteps.steps += 1

    return StopAt, CountSteps


def _make(kind: str, folder, *, dropout: float, callbacks=(), model=None, **kw):
    from transformers import Trainer, TrainingArguments

    from hf_zero import ZeroTrainer, ZeroTrainingArguments

    if kind == "ddp":
        cls, args_cls, extra = Trainer, TrainingArguments, {}
    else:
        cls, args_cls, extra = ZeroTrainer, ZeroTrainingArguments, {"zero_stage": int(kind[-1])}
    args = trainer_args(args_cls, folder, **{**COMMON, **extra, **kw})
    return cls(
        model=model if model is not None else tiny_gpt2(dropout=dropout),
        args=args,
        train_dataset=lm_data(N_TRAIN),
        callbacks=list(callbacks),
    )


def resume_worker(rank: int, world_size: int, root: str) -> dict:
    StopAt, _ = _callbacks()
    root = Path(root)
    out: dict = {}
    for kind in ("ddp", "zero3"):
        full = _make(kind, root / kind / "full", dropout=0.1)
        full.train()
        _make(kind, root / kind / "part", dropout=0.1, callbacks=[StopAt()]).train()
        resumed = _make(kind, root / kind / "part", dropout=0.1)
        resumed.train(resume_from_checkpoint=True)
        out[kind] = {
            "full": logged(full, after=STOP_AT),
            "resumed": logged(resumed, after=STOP_AT),
            "full_grad_norm": logged(full, "grad_norm", after=STOP_AT),
            "resumed_grad_norm": logged(resumed, "grad_norm", after=STOP_AT),
            "global_step": resumed.state.global_step,
        }
    other = _make("zero1", root / "zero3" / "other_stage", dropout=0.1)
    other.train(resume_from_checkpoint=str(root / "zero3" / "part" / f"checkpoint-{STOP_AT}"))
    out["other_stage"] = logged(other, after=STOP_AT)
    # For the other world size: no dropout (its RNG streams are per rank).
    plain = _make("zero2", root / "plain" / "full", dropout=0.0)
    plain.train()
    _make("zero2", root / "plain" / "part", dropout=0.0, callbacks=[StopAt()]).train()
    out["plain_full"] = logged(plain, after=STOP_AT)
    out["refusals"] = refusals_worker(rank, world_size, str(root))
    return out


def other_world_worker(rank: int, world_size: int, root: str) -> list[float]:
    """Resume the 2-rank stage-2 checkpoint at stage 3 on `world_size` ranks, with the same
    global batch (per-device batch scaled by 2 / world_size)."""
    trainer = _make(
        "zero3",
        Path(root) / "plain" / "other_world",
        dropout=0.0,
        per_device_train_batch_size=2 * 2 // world_size,
    )
    trainer.train(
        resume_from_checkpoint=str(Path(root) / "plain" / "part" / f"checkpoint-{STOP_AT}")
    )
    return logged(trainer, after=STOP_AT)


def refusals_worker(rank: int, world_size: int, root: str) -> dict:
    """Each case: (exception type, message) on this rank, and how many training steps began."""
    from transformers import GPT2ForSequenceClassification

    from hf_zero import ZeroTrainingArguments

    _, CountSteps = _callbacks()
    root = Path(root)
    ckpt = str(root / "zero3" / "part" / f"checkpoint-{STOP_AT}")
    cases = {
        "other_class": dict(model=GPT2ForSequenceClassification(tiny_gpt2().config), resume=ckpt),
        "other_shapes": dict(model=tiny_gpt2(n_embd=48), resume=ckpt),
        "not_a_checkpoint": dict(model=tiny_gpt2(), resume=str(root / "zero3" / "part")),
    }
    # With save_only_model a checkpoint is the export: loadable, not resumable.
    only_model = _make(
        "zero2",
        root / "refused" / "save_only_model",
        dropout=0.0,
        max_steps=2,
        save_only_model=True,
    )
    only_model.train()
    saved = root / "refused" / "save_only_model" / "checkpoint-2"
    cases["save_only_model"] = dict(model=tiny_gpt2(), resume=str(saved))
    out: dict = {"save_only_model_files": sorted(p.name for p in saved.iterdir())}
    for name, case in cases.items():
        CountSteps.steps = 0
        trainer = _make(
            "zero3",
            root / "refused" / name,
            dropout=0.0,
            model=case["model"],
            callbacks=[CountSteps()],
        )
        try:
            trainer.train(resume_from_checkpoint=case["resume"])
            out[name] = (None, "no error", CountSteps.steps)
        except Exception as e:  # noqa: BLE001 - the test checks type and text
            out[name] = (type(e).__name__, str(e), CountSteps.steps)
    # Without use_cpu on a machine without GPUs, the Trainer sees 1 process of 2.
    try:
        from hf_zero import ZeroTrainer

        ZeroTrainer(
            model=tiny_gpt2(),
            args=trainer_args(ZeroTrainingArguments, root / "refused" / "world", use_cpu=False),
            train_dataset=lm_data(8),
        )
        out["world"] = (None, "no error", 0)
    except Exception as e:  # noqa: BLE001
        out["world"] = (type(e).__name__, str(e), 0)
    return out
