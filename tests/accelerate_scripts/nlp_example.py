"""A training loop in the style of Accelerate's `examples/nlp_example.py`, run under
`accelerate launch` by tests/test_accelerate_launch.py.

A small BERT (built from a config: no download) learns a sentence-pair task; AdamW with
weight-decay groups, a linear-warmup schedule, gradient accumulation with
`accelerator.accumulate`, `clip_grad_norm_`, `accelerator.print` of the loss and
`gather_for_metrics` for the eval accuracy; `save_state` / `load_state` with
`skip_first_batches` to resume mid-epoch, and `save_model` at the end. `--lora` trains LoRA
adapters (peft) on the attention projections instead of every weight, `--gradient_checkpointing`
recomputes each layer's activations in backward.

hf_zero changes one line, the Accelerator's: `Accelerator(...)` ->
`hf_zero.ZeroAccelerator(zero_config=..., ...)`. Everything else is the same for both.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

import hf_zero

VOCAB, CLS, SEP, PAD = 96, 1, 2, 0
GRADIENT_ACCUMULATION_STEPS = 2
EVAL_BATCH_SIZE = 8


def make_pairs(n: int, seed: int) -> list[dict]:
    """Sentence pairs of random length; label 1 when the second sentence has a word from the
    upper half of the vocabulary, more often than the first."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        la, lb = (int(x) for x in torch.randint(3, 10, (2,), generator=g))
        a = torch.randint(3, VOCAB, (la,), generator=g)
        b = torch.randint(3, VOCAB, (lb,), generator=g)
        label = int((b >= VOCAB // 2).float().mean() > (a >= VOCAB // 2).float().mean())
        ids = [CLS, *a.tolist(), SEP, *b.tolist(), SEP]
        types = [0] * (la + 2) + [1] * (lb + 1)
        out.append({"input_ids": ids, "token_type_ids": types, "labels": label})
    return out


def collate_fn(examples: list[dict]) -> dict:
    """Pad to the longest sequence of the batch, as `tokenizer.pad` does."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(key, value):
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])

    mask = [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in examples]
    return {
        "input_ids": pad("input_ids", PAD),
        "token_type_ids": pad("token_type_ids", 0),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def get_dataloaders(accelerator, batch_size: int, seed: int):
    with accelerator.main_process_first():
        train, evaluation = make_pairs(64, seed=1), make_pairs(20, seed=2)
    train_dataloader = DataLoader(
        train,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=batch_size,
        # Seeded: the data order and the loader's worker seed restart identically on resume.
        generator=torch.Generator().manual_seed(seed),
    )
    eval_dataloader = DataLoader(
        evaluation, shuffle=False, collate_fn=collate_fn, batch_size=EVAL_BATCH_SIZE
    )
    return train_dataloader, eval_dataloader


class Progress:
    """Where training is, saved with `register_for_checkpointing`."""

    def __init__(self):
        self.batches = 0

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def training_function(args) -> None:
    accelerator_kwargs = dict(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS,
    )
    if args.zero_stage is None and args.zero_config is None:
        accelerator = Accelerator(**accelerator_kwargs)
    else:  # the one changed line
        zero_config = args.zero_config or hf_zero.ZeroConfig(stage=args.zero_stage)
        accelerator = hf_zero.ZeroAccelerator(zero_config=zero_config, **accelerator_kwargs)

    lr, num_epochs, seed, batch_size = 1e-2, args.num_epochs, args.seed, 4
    max_grad_norm = 0.15  # below most steps' norms: clipping is exercised
    set_seed(seed)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size, seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant: the transformers default
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = get_peft_model(model, lora)
    no_decay = ["bias", "LayerNorm.weight"]
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer_grouped_parameters = [
        {
            "params": [p for n, p in trained if not any(nd in n for nd in no_decay)],
            "weight_decay": 0.01,
        },
        {
            "params": [p for n, p in trained if any(nd in n for nd in no_decay)],
            "weight_decay": 0.0,
        },
    ]
    optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=2,
        num_training_steps=(len(train_dataloader) * num_epochs) // GRADIENT_ACCUMULATION_STEPS,
    )
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.resume_from:
        accelerator.load_state(args.resume_from)
    starting_epoch, resume_step = divmod(progress.batches, len(train_dataloader))

    record = {"losses": [], "lrs": [], "grad_norms": [], "skipped": [], "accuracy": []}
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        active_dataloader = train_dataloader
        if epoch == starting_epoch and resume_step:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    record["grad_norms"].append(float(norm))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                record["skipped"].append(bool(accelerator.optimizer_step_was_skipped))
            record["losses"].append(accelerator.reduce(loss.detach(), "mean").item())
            record["lrs"].append(lr_scheduler.get_last_lr()[0])
            progress.batches += 1
            accelerator.print(f"epoch {epoch} batch {progress.batches}: loss {loss.item():.6f}")
            if args.save_state_at == progress.batches:
                accelerator.save_state(args.save_state_dir)

        model.eval()
        correct = total = 0
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            predictions = outputs.logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            correct += int((predictions == references).sum())
            total += len(references)
        record["accuracy"].append(correct / total)
        record["eval_examples"] = total
        accelerator.print(f"epoch {epoch}: accuracy {correct / total:.3f} of {total}")

    probe = collate_fn(make_pairs(EVAL_BATCH_SIZE, seed=2))
    with torch.no_grad():
        logits = model(**{k: v.to(accelerator.device) for k, v in probe.items()}).logits
    record["logits"] = logits.float().cpu().tolist()
    record["num_processes"] = accelerator.num_processes
    if args.save_model:
        accelerator.wait_for_everyone()
        accelerator.save_model(model, args.save_model)
    if args.results and accelerator.is_main_process:
        with open(args.results, "w") as f:
            json.dump(record, f)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Accelerate-style training loop for hf_zero.")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU")
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--zero_stage", type=int, default=None, help="ZeroAccelerator stage")
    parser.add_argument("--zero_config", default=None, help="ZeroAccelerator config file")
    parser.add_argument("--num_epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--save_state_at", type=int, default=None, help="batch to save at")
    parser.add_argument("--save_state_dir", default=None)
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--save_model", default=None, help="folder for save_model at the end")
    parser.add_argument("--results", default=None, help="JSON file the main process writes")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) only")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    return parser.parse_args(argv)


def main():
    training_function(parse_args())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
