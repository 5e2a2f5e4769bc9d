"""Tiny models and the single-process reference that the parity tests compare every stage to.

The reference is plain `torch.optim.AdamW` in one process on the whole global batch: for each
optimizer step, `ACCUM` micro-steps of `world_size * PER_RANK` rows each, loss divided by ACCUM,
global-norm clipping, one step. Rank r of the engine run gets rows [r*PER_RANK, (r+1)*PER_RANK)
of each micro-batch. Dropout is off so both sides compute the same function.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

import hf_zero

PER_RANK = 2
SEQ = 8
ACCUM = 2
VOCAB = 97
LABELS = 3


def make_model(kind: str, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=VOCAB,
            n_positions=SEQ,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=0.0,
        )
        return GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            intermediate_size=37,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            num_labels=LABELS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
        )
        return BertForSequenceClassification(cfg)
    raise ValueError(kind)


def param_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Two groups, as fine-tuning scripts build them: no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (
            no_decay if name.endswith("bias") or "ln" in name or "LayerNorm" in name else decay
        ).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def global_batch(kind: str, step: int, micro: int, world_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    rows = world_size * PER_RANK
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    if kind == "gpt2":
        return {"input_ids": ids, "labels": ids.clone()}
    return {"input_ids": ids, "labels": torch.randint(0, LABELS, (rows,), generator=g)}


def rank_slice(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}


def run_reference(kind: str, steps: int, world_size: int, *, lr: float = 1e-3, clip: float = 1.0):
    """Single process, whole global batch.

    Returns (losses per micro-step, grad norms, state dict)."""
    model = make_model(kind)
    opt = torch.optim.AdamW(param_groups(model), lr=lr)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(ACCUM):
            loss = model(**global_batch(kind, step, micro, world_size)).loss
            (loss / ACCUM).backward()
            losses.append(loss.item())
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        opt.step()
        opt.zero_grad()
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_engine(
    kind: str,
    steps: int,
    rank: int,
    world_size: int,
    config: hf_zero.ZeroConfig,
    *,
    lr: float = 1e-3,
    clip: float = 1.0,
    inspect=None,
):
    """The same training through the engine. Losses are the global mean (all-reduced)."""
    model = make_model(kind)
    opt = torch.optim.AdamW(param_groups(model), lr=lr)
    engine = hf_zero.initialize(model, opt, config=config)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(ACCUM):
            batch = rank_slice(global_batch(kind, step, micro, world_size), rank)
            ctx = engine.no_sync() if micro < ACCUM - 1 else contextlib.nullcontext()
            with ctx:
                loss = engine(**batch).loss
                engine.backward(loss / ACCUM)
            mean = loss.detach().float().clone()
            if dist.is_initialized():
                dist.all_reduce(mean)
            losses.append(mean.item() / world_size)
        norms.append(engine.clip_grad_norm_(clip).item())
        engine.step()
        if inspect is not None:
            inspect(engine, step)
        engine.zero_grad()
    return engine, losses, norms


def max_weight_diff(full: dict, reference: dict) -> float:
    return max(
        (full[k].float() - v.float()).abs().max().item()
        for k, v in reference.items()
        if v.is_floating_point()
    )
