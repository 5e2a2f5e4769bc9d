"""Tier 2: a load reads exactly the bytes it verified, whatever a concurrent save does.

A save replaces a checkpoint by swapping a new folder in and deleting the old one. A load opens
the checkpoint's zero/ folder and each file once, verifies from the open file and reads from it,
so it holds one save's weights, optimizer state and step, or raises CheckpointError saying the
checkpoint changed while loading, never a raw FileNotFoundError and never "corrupted" for a file
that a save replaced. Ranks of one load that read different manifests all refuse.

The stress test runs a saver and a loader on one path for a few seconds (a minute in the slow
variant, `--run-slow`).
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
import torch

import hf_zero
import hf_zero.checkpoint.format as fmt
import hf_zero.checkpoint.reader as reader
from hf_zero.checkpoint import CheckpointError
from scripts.harness.cases import make_model, param_groups
from scripts.harness.checkpoint_misuse import (
    concurrent_save_and_load,
    ranks_read_different_manifests,
)

IDS = torch.arange(16).reshape(2, 8) % 97


def _engine(seed=0):
    model = make_model("gpt2", seed=seed)
    return hf_zero.initialize(
        model,
        torch.optim.AdamW(param_groups(model), lr=1e-3),
        config=hf_zero.ZeroConfig(stage=1),
    )


def _train_one(engine):
    engine.backward(engine(input_ids=IDS, labels=IDS).loss)
    engine.step()
    engine.zero_grad()


def _snapshot(engine):
    state = engine._checkpoint_state()
    return (
        [m.detach().clone() for m in state.masters.values()],
        len(engine.optimizer.state),
        engine.global_steps,
    )


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1:] == b[1:]


@pytest.fixture
def saver(tmp_path):
    e = _engine()
    _train_one(e)
    e.save_checkpoint(tmp_path / "ckpt")
    return e


def _after_manifest_read(monkeypatch, action):
    """Run `action()` once, right after a load has read the manifest, before it opens any
    shard."""
    real = fmt.read_manifest_at
    done = []

    def read_then_act(dir_fd, path):
        got = real(dir_fd, path)
        if not done:
            done.append(True)
            action()
        return got

    monkeypatch.setattr(fmt, "read_manifest_at", read_then_act)


def test_checkpoint_replaced_by_a_save_mid_load_is_reported_as_changed(
    saver, tmp_path, monkeypatch
):
    """A real save to the same path lands between the manifest read and the shard reads: the
    load's folder is deleted under it. It must say the checkpoint changed while loading."""
    ckpt = tmp_path / "ckpt"
    _train_one(saver)  # step 2, saved in the middle of the load
    _after_manifest_read(monkeypatch, lambda: saver.save_checkpoint(ckpt))
    loader = _engine(seed=1)
    before = _snapshot(loader)
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{ckpt}: the checkpoint changed while loading (")
        + r".*a save to this path was probably running: load again once it has finished",
    ):
        loader.load_checkpoint(ckpt)
    assert _same(before, _snapshot(loader))
    monkeypatch.undo()
    assert loader.load_checkpoint(ckpt).step == 2  # the new version loads


def test_shard_replaced_mid_load_is_reported_as_changed_not_corrupted(saver, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    other = _engine(seed=2)
    _train_one(other)
    other.save_checkpoint(tmp_path / "other")
    name = "params-rank00000-of-00001.safetensors"

    def replace_shard():
        time.sleep(0.05)  # file times are coarse: after the load began, measurably
        shutil.copyfile(tmp_path / "other" / "zero" / name, tmp_path / "new")
        os.replace(tmp_path / "new", ckpt / "zero" / name)

    _after_manifest_read(monkeypatch, replace_shard)
    loader = _engine(seed=1)
    before = _snapshot(loader)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"{ckpt}: the checkpoint changed while loading ({name} was replaced or modified "
            "after the load began)"
        ),
    ):
        loader.load_checkpoint(ckpt)
    assert _same(before, _snapshot(loader))


def test_a_load_reads_the_files_it_verified_even_if_they_are_deleted(saver, tmp_path, monkeypatch):
    """Once a load has opened and verified its files, deleting the checkpoint does not matter:
    it reads what it verified."""
    ckpt = tmp_path / "ckpt"
    real = reader.CheckpointReader.shard
    want = saver.full_state_dict()

    def shard_then_delete(self, kind, rank):
        got = real(self, kind, rank)
        if kind == "rng" and ckpt.exists():  # the last file a load opens
            shutil.rmtree(ckpt)
        return got

    monkeypatch.setattr(reader.CheckpointReader, "shard", shard_then_delete)
    loader = _engine(seed=1)
    assert loader.load_checkpoint(ckpt).step == 1
    assert not ckpt.exists()
    got = loader.full_state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_a_shard_replaced_after_it_was_verified_is_not_read(saver, tmp_path, monkeypatch):
    """The bytes read are the bytes hashed: a file swapped in at the same path after its check
    is never what the load reads (it would pass every later check: same layout, same size)."""
    ckpt = tmp_path / "ckpt"
    other = _engine(seed=2)
    _train_one(other)
    other.save_checkpoint(tmp_path / "other")
    name = "params-rank00000-of-00001.safetensors"
    real = reader.CheckpointReader.verify

    def verify_then_replace(self, shard):
        fd = real(self, shard)
        if shard == name and (tmp_path / "other").exists():
            os.replace(tmp_path / "other" / "zero" / name, ckpt / "zero" / name)
            shutil.rmtree(tmp_path / "other")
        return fd

    monkeypatch.setattr(reader.CheckpointReader, "verify", verify_then_replace)
    want = saver.full_state_dict()
    loader = _engine(seed=1)
    loader.load_checkpoint(ckpt)
    got = loader.full_state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_ranks_that_read_different_manifests_all_refuse():
    record = ranks_read_different_manifests(world_size=2)
    assert not record.problems, (record.problems, record.run_error)
    assert [o.error_type for o in record.ranks] == ["CheckpointError"] * 2
    assert record.message.startswith(
        "<tmp>/ckpt: the checkpoint changed while loading (the ranks read different manifests: "
        "rank 0: step 1, rank 1: step 2)"
    ), record.message


def test_concurrent_save_and_load_reads_one_save_or_says_it_changed():
    record = concurrent_save_and_load(seconds=5.0)
    assert not record.problems, (record.problems, record.run_error)
    assert record.extra["saves"] > 1 and record.extra["loads"] > 0, record.extra


@pytest.mark.slow
def test_concurrent_save_and_load_reads_one_save_or_says_it_changed_long():
    record = concurrent_save_and_load(seconds=60.0)
    assert not record.problems, (record.problems, record.run_error)
    assert record.extra["saves"] > 10 and record.extra["loads"] > 10, record.extra
