"""Tier 4: `engine.export`, the one live-engine -> HF-folder path.

A live export writes a sharded checkpoint (or takes `checkpoint=`, one of this very step, which
it verifies) and consolidates it with `hf_zero.consolidate`, so it is byte for byte what
`hf-zero consolidate` writes from a checkpoint of the same step. Refusals and failures are
raised on every rank. Renames that save_pretrained applies are followed (GPT-NeoX writes
`embed_out.weight` for the head: the export loads with nothing missing and the same logits); a
real conversion of values (Mixtral's fused experts) is refused before anything is written,
saying which conversion.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_zero
from hf_zero.checkpoint import CheckpointError, Manifest
from hf_zero.cli import main
from scripts.harness.cases import global_batch, make_model, param_groups, rank_slice
from scripts.harness.dist import run_distributed


def _train(engine, rank, world_size, steps, first=0):
    for step in range(first, first + steps):
        loss = engine(**rank_slice(global_batch("gpt2", step, 0, world_size), rank)).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()


def _outcome(fn):
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _export_worker(rank, world_size, root):
    import hf_zero.checkpoint.export as export

    root = Path(root)
    model = make_model("gpt2")
    engine = hf_zero.initialize(
        model, torch.optim.AdamW(param_groups(model), lr=1e-2), config=hf_zero.ZeroConfig(stage=3)
    )
    _train(engine, rank, world_size, 2)
    engine.save_checkpoint(root / "ckpt")
    engine.export(root / "live-fp32", dtype="float32", max_shard_size="20KB")
    engine.export(root / "live-auto")
    engine.export(
        root / "from-ckpt", dtype="float32", max_shard_size="20KB", checkpoint=root / "ckpt"
    )
    out = {"listing": sorted(os.listdir(root))}
    # Refusals and failures, each raised on every rank.
    out["not empty"] = _outcome(lambda: engine.export(root / "live-auto"))
    _train(engine, rank, world_size, 1, first=2)
    out["other step"] = _outcome(lambda: engine.export(root / "x", checkpoint=root / "ckpt"))
    real = export.write_export
    if rank == 0:

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        export.write_export = disk_full
    out["consolidate failed"] = _outcome(lambda: engine.export(root / "y"))
    export.write_export = real
    out["listing after"] = sorted(os.listdir(root))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    results = run_distributed(_export_worker, 2, str(root), timeout=600)
    return root, results


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


def test_live_export_and_cli_consolidate_of_the_same_step_are_byte_identical(exported, tmp_path):
    root, _ = exported
    cli = tmp_path / "cli"
    assert main(["consolidate", str(root / "ckpt"), str(cli), "--max-shard-size", "20KB"]) == 0
    assert main(["consolidate", str(root / "ckpt"), str(tmp_path / "auto"), "--dtype", "auto"]) == 0
    want = _files(cli)
    assert len([n for n in want if n.endswith(".safetensors")]) > 2  # sharded: the index too
    assert "model.safetensors.index.json" in want and "config.json" in want
    assert _files(root / "live-fp32") == want
    assert _files(root / "from-ckpt") == want
    assert _files(root / "live-auto") == _files(tmp_path / "auto")
    for folder in ("live-fp32", "live-auto", "from-ckpt"):
        assert (root / folder / "README.md").is_file()
    # The exports load, and hold the trained weights.
    model, info = __import__("transformers").AutoModelForCausalLM.from_pretrained(
        root / "live-auto", output_loading_info=True
    )
    assert {k: list(v) for k, v in info.items() if v} == {}


def test_temporary_checkpoints_are_removed(exported):
    _, results = exported
    for r in results:
        assert r["listing"] == ["ckpt", "from-ckpt", "live-auto", "live-fp32"]
        assert r["listing after"] == r["listing"]


def test_export_refusals_and_failures_are_raised_on_every_rank(exported):
    root, results = exported
    for r in results:
        assert r["not empty"].startswith(
            f"CheckpointError: exporting to {root / 'live-auto'} refused: FileExistsError: "
            f"output_dir {root / 'live-auto'} exists and is not empty; pass overwrite=True"
        ), r["not empty"]
        assert r["other step"].startswith(
            f"CheckpointError: exporting to {root / 'x'} refused: checkpoint {root / 'ckpt'} is "
            "of step 2, this engine is at step 3: pass a checkpoint saved at this step, or "
            "checkpoint=None"
        ), r["other step"]
        assert r["consolidate failed"] == (
            f"CheckpointError: exporting to {root / 'y'} failed: rank 0: OSError: [Errno 28] "
            "No space left on device"
        ), r["consolidate failed"]


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            vocab_size=97,
            max_position_embeddings=16,
        )
    )


def test_gpt_neox_export_follows_the_embed_out_rename(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _neox()
    engine = hf_zero.initialize(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), config=hf_zero.ZeroConfig(stage=2)
    )
    ids = torch.arange(24).reshape(2, 12) % 97
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.zero_grad()
    engine.save_checkpoint(tmp_path / "ckpt")
    export = Manifest.read(tmp_path / "ckpt").hf_export
    assert export.renames == {"embed_out.weight": "lm_head.weight"}
    assert not export.weight_conversion and export.conversion is None
    out = engine.export(tmp_path / "hf", dtype="float32")
    tensors = load_file(str(out / "model.safetensors"))
    model.save_pretrained(tmp_path / "reference")  # what transformers itself writes
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert set(tensors) == set(reference) and "embed_out.weight" in tensors
    for key, value in reference.items():
        assert torch.equal(tensors[key], value), key
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0
        )


def test_export_refuses_a_model_whose_save_converts_values_before_writing(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(
        MixtralConfig(
            num_hidden_layers=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=2,
            vocab_size=50,
        )
    )
    engine = hf_zero.initialize(
        model, torch.optim.AdamW(model.parameters()), config=hf_zero.ZeroConfig(stage=1)
    )
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"cannot export MixtralForCausalLM to {tmp_path / 'hf'}: it converts its weights when "
            "saved: save_pretrained writes 6 tensors that are not model tensors renamed (e.g. "
        )
        + r".*reverting transformers' weight conversion \.experts\.gate_up_proj -> "
        r"\.experts\.\*\.w1\.weight \+ \.experts\.\*\.w3\.weight \(MergeModulelist, Concatenate\)"
        r".*save the model's full_state_dict\(\) with save_pretrained instead",
    ):
        engine.export(tmp_path / "hf")
    assert os.listdir(tmp_path) == []  # refused before anything was written


def test_export_keys_in_manifest_json_stay_format_version_1(exported):
    root, _ = exported
    raw = json.loads((root / "ckpt" / "zero" / "manifest.json").read_text())
    assert raw["format_version"] == 1
    assert set(raw["hf_export"]) == {"keys", "dtypes", "weight_conversion"}  # GPT-2: no renames
