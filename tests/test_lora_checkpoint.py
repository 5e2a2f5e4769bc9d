"""Sharded checkpoints of a PEFT model: the frozen base is referenced, not stored.

The params files hold the trainable flat units only; the manifest records where the base came
from and one digest per frozen parameter, the same digest one process computes on the whole
parameter (so it holds at any world size). A load verifies the digests against the model it
loads into: the same base resumes exactly (at another world size and stage too), a changed
base is refused by name with the engine left as it was, and offline consolidation, which has no
base, refuses and says how to export.
"""

from __future__ import annotations

import json

import pytest
import torch

import hf_zero
from scripts.harness.dist import run_distributed

pytest.importorskip("peft")


def _max_diff(a: dict, b: dict) -> float:
    """Largest difference of two full state dicts (gathered on rank 0; {} elsewhere)."""
    assert a.keys() == b.keys()
    return max(((v - b[k]).abs().max().item() for k, v in a.items()), default=0.0)


def _worker(rank, world_size, root):
    from safetensors import safe_open

    from hf_zero.checkpoint import CheckpointError
    from hf_zero.checkpoint.frozen import digest
    from scripts.harness.lora_cases import LR, make_lora_model, run_lora_engine, trainable

    out = {}
    start = make_lora_model("gpt2")
    frozen = {n: p.detach().clone() for n, p in start.named_parameters() if not p.requires_grad}
    engine, _, _ = run_lora_engine("gpt2", 2, rank, world_size, hf_zero.ZeroConfig(stage=3))
    saved = engine.full_state_dict()
    ckpt = f"{root}/ckpt"
    engine.save_checkpoint(ckpt)

    def fresh(stage, edit=None):
        model = make_lora_model("gpt2")
        if edit is not None:
            with torch.no_grad():
                edit(model)
        opt = torch.optim.AdamW(trainable(model), lr=LR)
        return hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))

    # The same base, at another stage: every weight as saved, and the optimizer state.
    same = fresh(1)
    same.load_checkpoint(ckpt)
    out["resumed_diff"] = _max_diff(same.full_state_dict(), saved)
    out["resumed_step"] = same.global_steps
    # One more step on both: equal only if the optimizer state came back too.
    from scripts.harness.lora_cases import _slice, batch

    for e in (engine, same):
        e.backward(e(**_slice("gpt2", batch("gpt2", 5, 0, world_size), rank, world_size)).loss)
        e.step()
        e.zero_grad()
    a, b = engine.full_state_dict(), same.full_state_dict()
    out["next_step_diff"] = _max_diff(a, b)
    out["next_step_moved"] = _max_diff(a, saved)

    # A base with one frozen weight changed by one ulp: refused, nothing loaded.
    name = "base_model.model.transformer.h.1.mlp.c_fc.weight"

    def nudge(model):
        w = dict(model.named_parameters())[name]
        w.view(-1)[7] = torch.nextafter(w.view(-1)[7], torch.tensor(1e9))

    other = fresh(3, nudge)
    before = other.full_state_dict()
    try:
        other.load_checkpoint(ckpt)
        out["changed_error"] = None
    except CheckpointError as e:
        out["changed_error"] = str(e)
    out["changed_untouched"] = _max_diff(other.full_state_dict(), before) == 0.0
    if rank == 0:
        with open(f"{ckpt}/zero/manifest.json") as f:
            manifest = json.load(f)
        out["frozen_base"] = manifest["frozen_base"]
        out["expected_digests"] = {n: digest(n, v) for n, v in frozen.items()}
        stored = 0
        for r in range(world_size):
            with safe_open(
                f"{ckpt}/zero/params-rank{r:05d}-of-{world_size:05d}.safetensors", "pt"
            ) as f:
                stored += sum(
                    f.get_slice(k).get_shape()[0] for k in f.keys() if k.startswith("flat")
                )
        out["stored_numel"] = stored
        out["trainable_numel"] = sum(p.numel() for p in start.parameters() if p.requires_grad)
        out["frozen_numel"] = sum(v.numel() for v in frozen.values())
        try:
            hf_zero.consolidate(ckpt, f"{root}/export")
            out["consolidate_error"] = None
        except CheckpointError as e:
            out["consolidate_error"] = str(e)
    return out


def test_peft_checkpoint_references_the_frozen_base_and_verifies_it(tmp_path):
    results = run_distributed(_worker, 2, str(tmp_path), timeout=600)
    r0 = results[0]
    # Only the trainable state is stored (padding: fewer than world-size elements a flat unit).
    assert r0["trainable_numel"] <= r0["stored_numel"] < r0["trainable_numel"] + 64, r0
    assert r0["frozen_numel"] > 10 * r0["trainable_numel"], r0
    # One digest per frozen parameter, equal to one process's over the whole parameter.
    assert r0["frozen_base"]["digests"] == r0["expected_digests"]
    assert r0["resumed_diff"] == 0.0, r0
    assert r0["next_step_diff"] <= 1e-6 < r0["next_step_moved"], r0
    for r in results:
        assert r["resumed_step"] == 2, r
        assert r["changed_error"] is not None, r
        assert "h.1.mlp.c_fc.weight" in r["changed_error"], r["changed_error"]
        assert "1 of" in r["changed_error"], r["changed_error"]
        assert r["changed_untouched"], r
    assert "holds the trained adapter only" in r0["consolidate_error"], r0["consolidate_error"]
    assert "merge_adapters=True" in r0["consolidate_error"]
