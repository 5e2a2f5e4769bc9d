"""Tiny GPT-2 (tied weights) under ZeroTrainer at stages 1-3 against plain DDP Trainer.

`stages_worker` runs, on every rank, with the same data and the usual arguments (accumulation,
cosine schedule with warmup, weight decay, max_grad_norm, evaluation every 2 steps):
  - plain DDP Trainer: the reference;
  - ZeroTrainer at stage 1 in bf16, at stage 2 in fp32, and at stage 3 in fp32 with
    gradient_checkpointing=True, checkpoints every 2 steps (save_total_limit=1),
    load_best_model_at_end and, when a Hub repo is given, push_to_hub with
    hub_strategy="every_save" and a final `push_to_hub()`;
  - stage 3 again without gradient checkpointing (it must change nothing);
  - stage 2 again with overlap_param_gather (it must change nothing);
  - stage 2 in fp16 with a loss scale so large that the first steps overflow, max_grad_norm=0.
After each full run: evaluate(), predict() and generate(synced_gpus=True) on the trained model,
save_model() (or the push), and on rank 0 plain GPT2LMHeadModel.from_pretrained of the export.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from tests.helpers.lazy_gather import lazy_after_step_gathers
from tests.trainer_scripts.common import lm_data, logged, tiny_gpt2, trainer_args

PROMPT = [[5, 8, 11, 14]]
COMMON = dict(
    max_steps=4,
    gradient_accumulation_steps=2,
    lr_scheduler_type="cosine",
    warmup_steps=1,
    weight_decay=0.1,
    max_grad_norm=0.5,
    eval_strategy="steps",
    eval_steps=2,
)
RUNS = {
    "stage1-bf16": dict(zero_stage=1, bf16=True),
    "stage2": dict(zero_stage=2),
    "stage3": dict(
        zero_stage=3,
        gradient_checkpointing=True,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
    ),
}


def _generate(model) -> list[int]:
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=6, do_sample=False)
    return out[0].tolist()


def _summary(trainer) -> dict:
    trainer.model.eval()
    with torch.no_grad():
        tokens = trainer.model.generate(
            torch.tensor(PROMPT), max_new_tokens=6, do_sample=False, synced_gpus=True
        )[0].tolist()
    pred = trainer.predict(lm_data(8, seed=7))
    return {
        "loss": logged(trainer),
        "grad_norm": logged(trainer, "grad_norm"),
        "eval_loss": logged(trainer, "eval_loss"),
        "final_eval": trainer.evaluate()["eval_loss"],
        "best_metric": trainer.state.best_metric,
        "predictions": torch.as_tensor(pred.predictions).clone(),
        "tokens": tokens,
        "total_flos": trainer.state.total_flos,
        "num_parameters": trainer.model.num_parameters(),
    }


def _load_export(folder: Path) -> dict:
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    model, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    batch = torch.stack([row["input_ids"] for row in lm_data(8, seed=7)])
    with torch.no_grad():
        logits = model(input_ids=batch).logits
    return {
        "loading_info": {k: list(v) for k, v in info.items()},
        "keys": keys,
        "tied": model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(),
        "files": sorted(os.listdir(folder)),
        "export_tokens": _generate(model),
        "export_logits": logits,
        "card": (folder / "README.md").read_text(),
    }


def stages_worker(rank: int, world_size: int, root: str, hub_repo: str | None) -> dict:
    from transformers import Trainer, TrainingArguments

    from hf_zero import ZeroTrainer, ZeroTrainingArguments

    train, evals = lm_data(32), lm_data(8, seed=3)
    out: dict = {"seconds": {}}

    def run(name, trainer_cls, args_cls, **kw):
        started = time.perf_counter()
        trainer = trainer_cls(
            model=tiny_gpt2(),
            args=trainer_args(args_cls, Path(root) / name, **kw),
            train_dataset=train,
            eval_dataset=evals,
        )
        trainer.train()
        out["seconds"][name] = time.perf_counter() - started
        return trainer

    out["ddp"] = _summary(run("ddp", Trainer, TrainingArguments, **COMMON))
    for name, extra in RUNS.items():
        if name == "stage3" and hub_repo:
            extra = {**extra, "push_to_hub": True, "hub_model_id": hub_repo}
            extra["hub_strategy"] = "every_save"
        trainer = run(name, ZeroTrainer, ZeroTrainingArguments, **COMMON, **extra)
        row = _summary(trainer)
        row["engine"] = type(trainer.model_wrapped).__name__
        row["skipped_steps"] = trainer.model_wrapped.skipped_steps
        folder = Path(root) / name
        if name == "stage3" and hub_repo:
            trainer.push_to_hub(license="mit", dataset="arith-seq", finetuned_from="gpt2")
        else:
            trainer.save_model()
        if rank == 0:
            row.update(_load_export(folder))
            row["checkpoints"] = sorted(p.name for p in folder.glob("checkpoint-*"))
            row["left_over"] = sorted(p.name for p in folder.iterdir() if p.name.startswith("_"))
            if row["checkpoints"]:
                ckpt = folder / row["checkpoints"][-1]
                row["checkpoint_files"] = sorted(
                    str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()
                )
            if name == "stage3" and hub_repo:
                from transformers import AutoModelForCausalLM

                row["hub_tokens"] = _generate(AutoModelForCausalLM.from_pretrained(hub_repo))
        out[name] = row
    plain = run("stage3-no-gc", ZeroTrainer, ZeroTrainingArguments, **{**COMMON, "zero_stage": 3})
    out["stage3-no-gc"] = {"loss": logged(plain), "grad_norm": logged(plain, "grad_norm")}
    # fp16: a loss scale of 2^19 overflows fp16 gradients until the scaler has backed off.
    cfg = Path(root) / "fp16.yaml"
    overlap_cfg = Path(root) / "overlap.yaml"
    if rank == 0:
        cfg.write_text("stage: 2\ninitial_loss_scale: 524288.0\n")
        overlap_cfg.write_text("stage: 2\noverlap_param_gather: true\n")
    plain.accelerator.wait_for_everyone()
    # Stage 2 leaving its after-step all-gather to the next forward (evaluation included).
    with lazy_after_step_gathers():  # a read that did not wait would see stale weights
        overlap = run(
            "stage2-overlap",
            ZeroTrainer,
            ZeroTrainingArguments,
            **COMMON,
            zero_config=str(overlap_cfg),
        )
        out["stage2-overlap"] = _summary(overlap)
    fp16 = run(
        "stage2-fp16",
        ZeroTrainer,
        ZeroTrainingArguments,
        **{
            **COMMON,
            "eval_strategy": "no",
            "max_grad_norm": 0.0,
            "warmup_steps": 0,
            "lr_scheduler_type": "linear",
            "max_steps": 8,
        },
        zero_config=str(cfg),
        fp16=True,
    )
    out["stage2-fp16"] = {
        "loss": logged(fp16),
        "grad_norm": logged(fp16, "grad_norm"),
        "learning_rate": logged(fp16, "learning_rate"),
        "skipped_steps": fp16.model_wrapped.skipped_steps,
        "global_steps": fp16.model_wrapped.global_steps,
    }
    return out
