"""Tier 2: a save or an export never deletes what it did not write.

A checkpoint save replaces only a path that does not exist, an empty folder or an hf_zero
checkpoint (zero/manifest.json); a folder of the user's files, a parent folder of checkpoints,
a plain file or a symlink is refused on every rank before anything is written, naming the path
and what it holds, and the data is byte-identical afterwards. `hf-zero consolidate` refuses an
output inside the checkpoint or around it, and `--overwrite` replaces only an earlier export.
A save that cannot delete the previous version says so, naming what is left.

The multi-rank and CLI scenarios run in scripts/harness/checkpoint_misuse.py, shared with
scripts/reliability_report.py; these tests assert on the records they return.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import hf_zero
from hf_zero.checkpoint import CheckpointError, Manifest
from scripts.harness.cases import make_model, param_groups
from scripts.harness.checkpoint_misuse import (
    CONSOLIDATE_MISUSES,
    FOREIGN,
    consolidate_misuse,
    digests,
    save_over_foreign,
    undeletable_previous_version,
)

IDS = torch.arange(16).reshape(2, 8) % 97


def _engine():
    model = make_model("gpt2")
    return hf_zero.initialize(
        model,
        torch.optim.AdamW(param_groups(model), lr=1e-3),
        config=hf_zero.ZeroConfig(stage=1),
    )


def _train_one(engine):
    engine.backward(engine(input_ids=IDS, labels=IDS).loss)
    engine.step()
    engine.zero_grad()


@pytest.fixture(scope="module")
def engine():
    e = _engine()
    _train_one(e)
    return e


@pytest.mark.parametrize("kind", FOREIGN)
def test_save_onto_what_is_not_a_checkpoint_is_refused_on_every_rank(kind):
    record = save_over_foreign(kind, stage=2, world_size=2)
    assert not record.problems, (record.problems, record.run_error)
    assert [o.error_type for o in record.ranks] == ["CheckpointError"] * 2
    assert record.checkpoint_intact is True  # the user's data, byte for byte
    assert record.extra["names"] == ["my_project"]  # no temporary folder either
    assert record.message.startswith("refusing to save a checkpoint to <tmp>/my_project: ")


def test_save_onto_a_folder_of_user_files_names_them_and_changes_nothing(engine, tmp_path):
    project = tmp_path / "my_project"
    (project / "data").mkdir(parents=True)
    (project / "notes.txt").write_text("my notes\n")
    (project / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    before = digests(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"refusing to save a checkpoint to {project}: it is a folder that is not an hf_zero "
            "checkpoint (no zero/manifest.json) and holds 2 entries: 'data/', 'notes.txt'; a "
            "save replaces only an hf_zero checkpoint"
        )
        + ".*never deletes what it did not write. Pick a new path",
    ):
        engine.save_checkpoint(project)
    assert digests(tmp_path) == before


def test_save_onto_a_folder_of_checkpoints_points_at_a_subfolder(engine, tmp_path):
    out = tmp_path / "out"
    engine.save_checkpoint(out / "checkpoint-1")
    engine.save_checkpoint(out / "checkpoint-2")
    before = digests(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "(2 of them hf_zero checkpoints: it is a folder of checkpoints; save each one to its "
            f"own subfolder, such as {out / 'checkpoint-<step>'})"
        ),
    ):
        engine.save_checkpoint(out)
    assert digests(tmp_path) == before


def test_save_onto_a_file_or_a_symlink_is_refused(engine, tmp_path):
    plain = tmp_path / "ckpt"
    plain.write_text("not a folder\n")
    with pytest.raises(CheckpointError, match=re.escape(f"{plain}: it is a file, not a folder")):
        engine.save_checkpoint(plain)
    assert plain.read_text() == "not a folder\n"
    real = tmp_path / "real"
    engine.save_checkpoint(real)
    link = tmp_path / "latest"
    link.symlink_to(real)
    before = digests(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"{link}: it is a symlink (to {real})")):
        engine.save_checkpoint(link)
    assert digests(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "latest", "real"]


def test_save_replaces_an_hf_zero_checkpoint_and_an_empty_folder(tmp_path):
    e = _engine()
    _train_one(e)
    empty = tmp_path / "empty"
    empty.mkdir()
    e.save_checkpoint(empty)
    assert Manifest.read(empty).step == 1
    (empty / "zero" / "stale-from-an-earlier-save").write_text("x")
    _train_one(e)
    e.save_checkpoint(empty)  # a checkpoint: replaced as a whole
    assert Manifest.read(empty).step == 2
    assert "stale-from-an-earlier-save" not in os.listdir(empty / "zero")
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no .old- or .tmp- folder left


def test_save_that_cannot_delete_the_previous_version_warns_naming_the_leftover():
    record = undeletable_previous_version()
    assert not record.problems, record.problems
    (leftover,) = record.extra["leftovers"]
    assert re.fullmatch(r"ckpt\.old-[0-9a-f]{12}", leftover)
    assert re.match(
        rf"hf_zero: <tmp>/ckpt was written, but its previous version, moved aside to "
        rf"<tmp>/{leftover}, could not be deleted \(.*Operation not permitted.*\); delete that "
        "folder by hand",
        record.message,
    ), record.message
    assert record.checkpoint_intact is True  # the new version is in place


@pytest.mark.parametrize("kind", CONSOLIDATE_MISUSES)
def test_consolidate_misuse_is_one_line_error_and_changes_nothing(kind):
    record = consolidate_misuse(kind)
    assert not record.problems, (record.problems, record.ranks)
    assert record.checkpoint_intact is True
    want = {
        "output-inside-checkpoint": "hf-zero consolidate: output_dir <tmp>/run/ckpt/zero is "
        "inside the checkpoint <tmp>/run/ckpt; writing there would change the checkpoint: pick "
        "a folder outside it",
        "checkpoint-inside-output": "hf-zero consolidate: output_dir <tmp>/run would replace "
        "the checkpoint <tmp>/run/ckpt (it is the checkpoint or holds it); pick a folder "
        "outside the checkpoint",
        "overwrite-foreign-folder": "hf-zero consolidate: output_dir <tmp>/mine holds 1 entries "
        "an export does not write: 'notes.txt'; overwrite=True replaces only a folder holding "
        "an export",
        "output-under-a-file": "hf-zero consolidate: output_dir <tmp>/a-file/out: <tmp>/a-file "
        "is a file, not a folder; pick an output path under a folder",
    }[kind]
    assert record.message.startswith(want), record.message


def test_overwrite_replaces_an_earlier_export_only(engine, tmp_path):
    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(ckpt)
    out = hf_zero.consolidate(ckpt, tmp_path / "hf", max_shard_size="20KB", progress=False)
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("model-"))
    assert len(shards) > 1
    hf_zero.consolidate(ckpt, out, overwrite=True, progress=False)  # an export: replaced
    assert "model.safetensors" in os.listdir(out) and not any(
        n.startswith("model-") for n in os.listdir(out)
    )
    (out / "data").mkdir()
    before = digests(tmp_path)
    with pytest.raises(
        FileExistsError, match=re.escape("holds 1 entries an export does not write: 'data'")
    ):
        hf_zero.consolidate(ckpt, out, overwrite=True, progress=False)
    assert digests(tmp_path) == before
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["ckpt", "hf"]
