"""The real pretrained all-MiniLM-L6-v2 fine-tuned for sentiment with ZeroTrainer.

`bert_worker` (2 ranks) trains the same fine-tune at ZeRO stage 3 and at stage 0 (dropout on,
the Trainer's defaults otherwise), then at stage 3: evaluates (accuracy on held-out text),
predicts the held-out logits, and exports with save_model; rank 0 loads the export with plain
`from_pretrained` (and its tokenizer from the same folder) and computes the same logits.

max_grad_norm is the Trainer's default, 1.0, below every gradient norm of this fine-tune
(1.4-3.6): every step clips, so the clip factor (the global norm over 22.7M elements, summed in
another order at stage 0 and at stage 3) is part of what must agree.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from tests.trainer_scripts.common import logged, minilm_dir, trainer_args

STEPS = 24
GOOD = [
    "wonderful",
    "delightful",
    "excellent",
    "moving",
    "brilliant",
    "charming",
    "superb",
    "great",
]
BAD = ["dreadful", "boring", "awful", "tedious", "terrible", "dull", "painful", "bad"]
NOUNS_TRAIN = ["film", "movie", "story", "cast"]
NOUNS_HELD_OUT = ["show", "plot"]
FRAMES = ["the {n} was {a}", "what a {a} {n}", "i found the {n} {a} from start to finish", "{a}"]


def texts(nouns: list[str]) -> tuple[list[str], list[int]]:
    """Every frame x noun x adjective, labelled 1 for the good adjectives."""
    out, labels = [], []
    for frame, noun, (adjs, label) in itertools.product(FRAMES, nouns, ((GOOD, 1), (BAD, 0))):
        for a in adjs:
            out.append(frame.format(n=noun, a=a))
            labels.append(label)
    return out, labels


def encode(tokenizer, nouns: list[str]) -> list[dict]:
    sentences, labels = texts(nouns)
    enc = tokenizer(sentences, padding="max_length", max_length=16, truncation=True)
    return [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)
    ]


def accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def _model():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the classification head is new: the same init in every run
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)


def bert_worker(rank: int, world_size: int, root: str, *, max_grad_norm: float = 1.0) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_zero import ZeroTrainer, ZeroTrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    train, held_out = encode(tokenizer, NOUNS_TRAIN), encode(tokenizer, NOUNS_HELD_OUT)
    out: dict = {"n_train": len(train), "n_held_out": len(held_out)}
    for stage in (3, 0):
        folder = Path(root) / f"stage{stage}"
        trainer = ZeroTrainer(
            model=_model(),
            args=trainer_args(
                ZeroTrainingArguments,
                folder,
                zero_stage=stage,
                max_steps=STEPS,
                max_grad_norm=max_grad_norm,
                per_device_train_batch_size=4,
                per_device_eval_batch_size=16,
                learning_rate=1e-4,
                warmup_steps=2,
                weight_decay=0.01,
            ),
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=tokenizer,
            compute_metrics=accuracy,
        )
        trainer.train()
        row = {"loss": logged(trainer), "grad_norm": logged(trainer, "grad_norm")}
        if stage == 3:
            row["eval"] = trainer.evaluate()
            row["logits"] = torch.as_tensor(trainer.predict(held_out).predictions).clone()
            row["num_parameters"] = trainer.model.num_parameters()
            trainer.save_model()
            if rank == 0:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    folder, output_loading_info=True
                )
                tok = AutoTokenizer.from_pretrained(folder)
                batch = tok(
                    texts(NOUNS_HELD_OUT)[0],
                    padding="max_length",
                    max_length=16,
                    truncation=True,
                    return_tensors="pt",
                )
                model.eval()
                with torch.no_grad():
                    row["export_logits"] = model(**batch).logits
                row["loading_info"] = {k: list(v) for k, v in info.items()}
                row["export_num_parameters"] = model.num_parameters()
        out[stage] = row
    return out
