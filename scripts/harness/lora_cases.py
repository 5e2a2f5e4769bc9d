"""LoRA (peft) versions of the parity cases, and their single-process reference.

`make_lora_model` attaches LoRA adapters (r=8, the attention projections) to the tiny GPT-2 or
BERT of `cases.make_model`, or to the real pretrained MiniLM; `run_lora_reference` trains it in
one process on the global batch (`cases.run_reference`'s recipe: accumulation 2, clipping at
1.0, AdamW over the trainable parameters), and `run_lora_engine` the same through the engine.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist

import hf_zero

from .cases import (
    ACCUM,
    global_batch,
    make_minilm_classifier,
    make_model,
    minilm_dir,
    rank_slice,
)

LR = 1e-3
TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"], "minilm": ["query", "value"]}
MINILM_TEXTS = [
    "the film was a delight from start to finish",
    "a tedious, overlong mess",
    "solid performances but a thin script",
    "I would watch it again tomorrow",
    "the plot makes no sense at all",
    "an instant classic",
    "the soundtrack is the only good part",
    "surprisingly moving and well made",
]
MINILM_LABELS = [1, 0, 1, 1, 0, 1, 0, 1]


def make_base(kind: str) -> torch.nn.Module:
    return make_minilm_classifier() if kind == "minilm" else make_model(kind)


def lora_config(kind: str):
    from peft import LoraConfig

    return LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=TARGETS[kind],
        fan_in_fan_out=kind == "gpt2",  # GPT-2's projections are Conv1D (in, out)
        task_type="CAUSAL_LM" if kind == "gpt2" else "SEQ_CLS",
    )


def make_lora_model(kind: str, *, checkpointing: bool = False) -> torch.nn.Module:
    """The base model with LoRA adapters; `checkpointing`: non-reentrant gradient
    checkpointing (transformers' default) enabled first."""
    from peft import get_peft_model

    base = make_base(kind)
    if checkpointing:
        base.gradient_checkpointing_enable()
    torch.manual_seed(1)
    model = get_peft_model(base, lora_config(kind))
    model.train()
    return model


@functools.cache
def _minilm_encoded() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    enc = tok(MINILM_TEXTS, padding="max_length", max_length=16, return_tensors="pt")
    return dict(enc, labels=torch.tensor(MINILM_LABELS))


def batch(kind: str, step: int, micro: int, world_size: int) -> dict[str, torch.Tensor]:
    """The global micro-batch; MiniLM's is its 8 texts in a shuffled order (world size 1, 2, 4
    or 8)."""
    if kind != "minilm":
        return global_batch(kind, step, micro, world_size)
    g = torch.Generator().manual_seed(1000 * step + micro)
    pick = torch.randperm(len(MINILM_TEXTS), generator=g)
    return {k: v[pick] for k, v in _minilm_encoded().items()}


def per_rank(kind: str, world_size: int) -> int:
    return len(next(iter(batch(kind, 0, 0, world_size).values()))) // world_size


def _slice(kind: str, b: dict, rank: int, world_size: int) -> dict:
    if kind != "minilm":
        return rank_slice(b, rank)
    n = per_rank(kind, world_size)
    return {k: v[rank * n : (rank + 1) * n] for k, v in b.items()}


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _on(b: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in b.items()}


def run_lora_reference(kind: str, steps: int, world_size: int, *, device: str = "cpu"):
    """One process, the whole global batch. Returns (losses, grad norms, state dict)."""
    model = make_lora_model(kind).to(device)
    opt = torch.optim.AdamW(trainable(model), lr=LR)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(ACCUM):
            loss = model(**_on(batch(kind, step, micro, world_size), device)).loss
            (loss / ACCUM).backward()
            losses.append(loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(trainable(model), 1.0).item())
        opt.step()
        opt.zero_grad()
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_lora_engine(
    kind: str,
    steps: int,
    rank: int,
    world_size: int,
    config: hf_zero.ZeroConfig,
    *,
    lora: bool = True,
    checkpointing: bool = False,
    inspect=None,
    device: str = "cpu",
):
    """The same training through the engine (`lora=False`: the base model, every weight
    trainable). Returns (engine, global mean losses, pre-clip grad norms)."""
    if lora:
        model = make_lora_model(kind, checkpointing=checkpointing)
    else:
        model = make_base(kind)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
    model.to(device)
    engine = hf_zero.initialize(model, torch.optim.AdamW(trainable(model), lr=LR), config=config)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(ACCUM):
            full = _on(batch(kind, step, micro, world_size), device)
            ctx = engine.no_sync() if micro < ACCUM - 1 else contextlib.nullcontext()
            with ctx:
                loss = engine(**_slice(kind, full, rank, world_size)).loss
                engine.backward(loss / ACCUM)
            mean = loss.detach().float().clone()
            if dist.is_initialized():
                dist.all_reduce(mean)
            losses.append(mean.item() / world_size)
        norms.append(engine.clip_grad_norm_(1.0).item())
        engine.step()
        if inspect is not None:
            inspect(engine, step)
        engine.zero_grad()
    return engine, losses, norms
