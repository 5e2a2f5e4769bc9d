"""Tier 2/3: a checkpoint never loses data and never loads garbage.

Corrupted inputs (truncated file, flipped byte, missing rank file, a manifest from another
model, an unsupported format_version, file names that point outside the directory) each fail
with a CheckpointError naming the file and what is wrong, before anything is loaded. A rank
SIGKILLed in the middle of a save, or a disk error in one, leaves the previous checkpoint intact,
and `latest_checkpoint` picks the newest complete one. Nothing in a checkpoint is a pickle.

The multi-rank save faults run in scripts/harness/checkpoint_faults.py, shared with
scripts/reliability_report.py; these tests assert on the records they return."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

import hf_zero
from hf_zero.checkpoint import CheckpointError
from scripts.harness.cases import make_model, param_groups
from scripts.harness.checkpoint_faults import (
    corrupted_file_on_load,
    disk_error_during_save,
    sigkill_during_save,
)

IDS = torch.arange(16).reshape(2, 8) % 97


def _engine(stage=1, kind="gpt2"):
    model = make_model(kind)
    return hf_zero.initialize(
        model,
        torch.optim.AdamW(param_groups(model), lr=1e-3),
        config=hf_zero.ZeroConfig(stage=stage),
    )


def _train_one(engine):
    engine.backward(engine(input_ids=IDS, labels=IDS).loss)
    engine.step()
    engine.zero_grad()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-rank checkpoint (no process group: world size 1 runs the same code)."""
    root = tmp_path_factory.mktemp("ckpt")
    engine = _engine()
    _train_one(engine)
    engine.save_checkpoint(root / "good")
    return root / "good"


@pytest.fixture
def ckpt(saved, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    return path


def _load_fresh(path):
    engine = _engine()
    engine.load_checkpoint(path)


def test_round_trip_at_world_size_one(ckpt):
    engine = _engine()
    engine.load_checkpoint(ckpt)
    assert engine.global_steps == 1
    files = sorted(os.listdir(ckpt / "zero"))
    assert files == [
        "manifest.json",
        "optim-rank00000-of-00001.safetensors",
        "params-rank00000-of-00001.safetensors",
        "rng-rank00000-of-00001.safetensors",
    ]
    assert (ckpt / "config.json").is_file() and (ckpt / "generation_config.json").is_file()


def test_truncated_file(ckpt):
    f = ckpt / "zero" / "params-rank00000-of-00001.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(
        CheckpointError, match=re.escape(str(f)) + r": \d+ bytes, the manifest says \d+ \(truncated"
    ):
        _load_fresh(ckpt)


def test_flipped_byte(ckpt):
    f = ckpt / "zero" / "optim-rank00000-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x40
    f.write_bytes(bytes(data))
    engine = _engine()
    before = engine.full_state_dict()
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + r": sha256 .* \(corrupted\)"):
        engine.load_checkpoint(ckpt)
    # Every file is checked before anything is loaded: the engine is exactly as it was.
    after = engine.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.global_steps == 0 and not engine.optimizer.state


def test_missing_rank_file(ckpt):
    (ckpt / "zero" / "params-rank00000-of-00001.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match="checkpoint was saved by 1 ranks but file "
        "params-rank00000-of-00001.safetensors is missing",
    ):
        _load_fresh(ckpt)


def test_manifest_from_another_model(ckpt, tmp_path):
    other = _engine(kind="bert")
    other.save_checkpoint(tmp_path / "bert")
    shutil.copy(tmp_path / "bert" / "zero" / "manifest.json", ckpt / "zero" / "manifest.json")
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + " holds another model"):
        _load_fresh(ckpt)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unsupported_format_version(ckpt, version):
    m = ckpt / "zero" / "manifest.json"
    data = json.loads(m.read_text())
    data["format_version"] = version
    m.write_text(json.dumps(data))
    with pytest.raises(
        CheckpointError, match=re.escape(f"{m}: format_version {version!r} is not supported")
    ):
        _load_fresh(ckpt)


@pytest.mark.parametrize(
    "name",
    [
        "../params-rank00000-of-00001.safetensors",
        "/etc/passwd",
        "params-rank00000-of-00001.safetensors/..",
    ],
)
def test_manifest_cannot_point_outside_the_directory(ckpt, name):
    m = ckpt / "zero" / "manifest.json"
    data = json.loads(m.read_text())
    data["files"][name] = {"size": 1, "sha256": "0" * 64}
    m.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="is not a shard file name"):
        _load_fresh(ckpt)


def test_symlinked_shard_is_reported_as_a_symlink(ckpt, tmp_path):
    f = ckpt / "zero" / "params-rank00000-of-00001.safetensors"
    target = tmp_path / "elsewhere.safetensors"
    shutil.move(f, target)
    f.symlink_to(target)  # the same bytes, so only the link itself is wrong
    want = re.escape(f"{f} is a symlink (to {target}); a checkpoint's files must be its own")
    with pytest.raises(CheckpointError, match=want):
        _load_fresh(ckpt)
    with pytest.raises(CheckpointError, match=want):
        hf_zero.consolidate(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_no_manifest_is_not_a_checkpoint(ckpt):
    (ckpt / "zero" / "manifest.json").unlink()
    with pytest.raises(
        CheckpointError, match=re.escape(str(ckpt / "zero" / "manifest.json")) + ": no manifest"
    ):
        _load_fresh(ckpt)


def test_nothing_is_a_pickle(ckpt):
    for name in os.listdir(ckpt / "zero"):
        head = (ckpt / "zero" / name).read_bytes()[:16]
        assert not head.startswith(b"\x80"), name  # pickle protocol 2+ opcode
        assert b"PK\x03\x04" not in head, name  # torch.save zip container
    from safetensors import safe_open

    for name in os.listdir(ckpt / "zero"):
        if name.endswith(".safetensors"):
            with safe_open(str(ckpt / "zero" / name), "pt") as f:
                meta = f.metadata()
                assert meta["format"] == "pt"
                # ... plus the file's own slice of the layout.
                pieces = json.loads(meta["hf_zero"])["layout_slice"]
                names = {p[0] for unit in pieces for p in unit["pieces"]}
                assert "transformer.wte.weight" in names and "lm_head.weight" not in names


# ---- SIGKILL in the middle of a save -----------------------------------------------------------


def test_sigkill_during_save_keeps_previous_checkpoint():
    record = sigkill_during_save(stage=2, world_size=2)
    assert not record.problems, (record.problems, record.run_error)
    # Rank 1 wrote its files, then the moment, then SIGKILLed itself; it never reported.
    assert record.ranks[1].status == "died" and record.ranks[1].error_type == "SIGKILL"
    survivor = record.ranks[0]
    assert survivor.error_type == "CollectiveError", survivor
    assert survivor.message.startswith("rank 0: save_checkpoint failed"), survivor.message
    names = record.extra["names"]
    assert "checkpoint-1" in names and "checkpoint-2" not in names, names
    assert any(n.startswith("checkpoint-2.tmp-") for n in names), names  # the dead save's debris
    assert record.extra["resumed"] == [("checkpoint-1", 1)] * 2
    assert record.checkpoint_intact is True


def test_export_refuses_models_whose_save_converts_weights(tmp_path, saved):
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
    engine.save_checkpoint(tmp_path / "moe")
    assert (
        json.loads((saved / "zero" / "manifest.json").read_text())["hf_export"]["weight_conversion"]
        is False
    )
    with pytest.raises(
        CheckpointError,
        match=r"MixtralForCausalLM converts its weights when saved: save_pretrained writes \d+ "
        r"tensors that are not model tensors renamed .*experts\.gate_up_proj -> "
        r"\.experts\.\*\.w1\.weight",
    ):
        hf_zero.consolidate(tmp_path / "moe", tmp_path / "out")
    # The sharded checkpoint itself still round-trips.
    engine.load_checkpoint(tmp_path / "moe")


# ---- disk errors during a save ---------------------------------------------------------------


@pytest.mark.parametrize("fault", ["file-too-large", "not-a-directory"])
def test_disk_error_during_save_fails_every_rank_and_keeps_the_previous_checkpoint(fault):
    record = disk_error_during_save(fault, stage=2, world_size=2)
    assert not record.problems, (record.problems, record.run_error)
    for o in record.ranks:  # every rank raises, naming the checkpoint and the failing path
        assert o.status == "raised" and o.error_type == "CheckpointError", o
        m = o.message
        assert "previous checkpoint left as it was" in m, m
        if fault == "file-too-large":
            assert re.search(
                r"rank 1: OSError: writing \S+checkpoint-2\.tmp-\w+/zero/\S+\.safetensors failed", m
            ), m
        else:
            assert "a-file" in m and "NotADirectoryError" in m, m
    names = record.extra["names"]
    assert "checkpoint-2" not in names and not any(".tmp-" in n for n in names), names
    # The save after the failure is the latest; without it, the one before the failed save.
    assert record.extra["latest"] == ["checkpoint-3", "checkpoint-1"]
    assert record.checkpoint_intact is True


# ---- a bad file on one rank, at load -----------------------------------------------------------


def test_bad_file_on_one_rank_fails_every_rank_before_any_engine_changes():
    """Rank 2 of 3 reads a damaged file; ranks 0-1 read only good ones. The ranks agree on the
    checks before copying, so every rank raises CheckpointError naming the file (ranks 0-1
    saying it failed on another rank) and every engine is exactly as it was."""
    records = corrupted_file_on_load(stage=3, world_size=3)
    assert [r.fault for r in records] == [
        "corrupted file on load: truncated",
        "corrupted file on load: flipped byte",
        "corrupted file on load: missing rank file",
    ]
    for record in records:
        assert not record.problems, (record.fault, record.problems, record.run_error)
        assert [o.error_type for o in record.ranks] == ["CheckpointError"] * 3
        assert all(o.detail["unchanged"] for o in record.ranks)
        for o in record.ranks[:2]:
            assert "failed on another rank, this rank's engine is left as it was" in o.message
            assert "rank 2: CheckpointError: " in o.message, o.message
