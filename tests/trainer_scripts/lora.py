"""LoRA + gradient checkpointing + stage 3 + bf16 through ZeroTrainer, resumed exactly.

`lora_resume_worker` (2 ranks), dropout on (the RNG restore matters): the uninterrupted run (6
steps, a checkpoint every 2), the same run stopped after step 4, and a new Trainer resuming
from checkpoint-4. Steps 5-6 must equal the uninterrupted run's bit for bit; the final
`save_model` writes the adapter only."""

from __future__ import annotations

from pathlib import Path

from tests.trainer_scripts.common import lm_data, logged, tiny_gpt2, trainer_args
from tests.trainer_scripts.resume import COMMON, N_TRAIN, STOP_AT, _callbacks


def _lora_model():
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2(dropout=0.1)
    torch.manual_seed(1)
    config = LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _make(folder, callbacks=()):
    from hf_zero import ZeroTrainer, ZeroTrainingArguments

    args = trainer_args(
        ZeroTrainingArguments,
        folder,
        **COMMON,
        zero_stage=3,
        bf16=True,
        gradient_checkpointing=True,
    )
    return ZeroTrainer(
        model=_lora_model(), args=args, train_dataset=lm_data(N_TRAIN), callbacks=list(callbacks)
    )


def lora_resume_worker(rank: int, world_size: int, root: str) -> dict:
    StopAt, _ = _callbacks()
    root = Path(root)
    full = _make(root / "full")
    full.train()
    full.save_model(str(root / "full" / "final"))
    _make(root / "part", callbacks=[StopAt()]).train()
    resumed = _make(root / "part")
    resumed.train(resume_from_checkpoint=str(root / "part" / f"checkpoint-{STOP_AT}"))
    return {
        "full": logged(full, after=STOP_AT),
        "resumed": logged(resumed, after=STOP_AT),
        "full_grad_norm": logged(full, "grad_norm", after=STOP_AT),
        "resumed_grad_norm": logged(resumed, "grad_norm", after=STOP_AT),
        "all": logged(full),
        "checkpointing": full.model.base_model.model.is_activation_checkpointing,
        "final_files": sorted(p.name for p in (root / "full" / "final").iterdir()),
    }
