"""Tier 4: pushing to the Hub with huggingface_hub's real client, against a local Hub server
(tests/helpers/hub_server.py), and loading the pushed repo back with `from_pretrained`.

The clients run in subprocesses started with HF_ENDPOINT pointing at the server (huggingface_hub
reads it when imported). What must hold: a push uploads exactly the consolidated export and its
card (never per-rank shards or anything else in the folder), the repo loads back with every
loading-info list empty and the trained model's logits, and a folder that is neither a
checkpoint nor an export is refused by name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_zero import consolidate
from hf_zero.cli import main as cli_main
from hf_zero.hub import export_files
from tests.helpers.hub_server import HubServer, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors"}


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server
        assert server.unhandled == [], "the client used routes the test server does not serve"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    run = save_tiny_checkpoint(root / "ckpt", stage=2, steps=2)
    export = consolidate(root / "ckpt", root / "export", progress=False)
    torch.save({"input_ids": run["input_ids"], "logits": run["logits"]}, root / "reference.pt")
    return {"root": root, "ckpt": root / "ckpt", "export": export, **run}


# The console script `pip install` made, next to this interpreter.
HF_ZERO = Path(sys.executable).with_name("hf-zero")


def client(hub: HubServer, home: Path, *argv: str, code: str | None = None):
    """Run `hf-zero ARGV` (or python `code` with ARGV) with the local Hub's environment."""
    if code is not None:
        cmd = [sys.executable, "-c", code, *argv]
    elif HF_ZERO.is_file():
        cmd = [str(HF_ZERO), *argv]
    else:  # not installed as a package: the same entry point
        cmd = [sys.executable, "-m", "hf_zero.cli", *argv]
    env = {**os.environ, **hub.env(home), "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def test_hf_zero_push_of_a_checkpoint_uploads_its_export_and_card_only(hub, trained, tmp_path):
    # A name without a namespace lands in the token's own namespace, as on the Hub.
    proc = client(hub, tmp_path, "push", str(trained["ckpt"]), "--repo-id", "from-checkpoint")
    repo = f"{hub.user}/from-checkpoint"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pushed {trained['ckpt']} to {hub.url}/{repo}/commit/" in proc.stdout
    files = hub.files(repo)
    assert set(files) == EXPORT_FILES | {"README.md"}
    # The same bytes `hf-zero consolidate` writes: the push consolidated the checkpoint.
    for name in EXPORT_FILES:
        assert files[name] == (trained["export"] / name).read_bytes(), name
    card = ModelCard(files["README.md"].decode())
    setup = card.data.to_dict()["hf_zero"]
    assert (setup["zero_stage"], setup["world_size"], setup["steps"]) == (2, 1, 2)
    assert "hf_zero" in card.data.tags
    assert f'AutoModelForCausalLM.from_pretrained("{repo}")' in card.text
    assert [c.message for c in hub.commits(repo)] == [
        f"Upload {repo} trained with hf_zero",
        "initial commit",
    ]


PUSH_AND_LOAD = r"""
import json, sys, torch
from hf_zero import CardInfo, push_to_hub
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM

export, repo, reference = sys.argv[1:4]
push_to_hub(export, repo, card=CardInfo(base_model="gpt2", datasets=["wikitext"], eval_loss=3.0))
model, info = AutoModelForCausalLM.from_pretrained(repo, output_loading_info=True)
ref = torch.load(reference)
with torch.no_grad():
    logits = model(input_ids=ref["input_ids"]).logits
folder = snapshot_download(repo)
try:
    hf_hub_download(repo, "optimizer.pt")
    missing = "downloaded"
except EntryNotFoundError:
    missing = "EntryNotFoundError"
print(json.dumps({
    "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
    "same_logits": torch.equal(logits, ref["logits"]),
    "max_diff": (logits - ref["logits"]).abs().max().item(),
    "tied": model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(),
    "snapshot": sorted(p.name for p in __import__("pathlib").Path(folder).iterdir()),
    "missing": missing,
}))
"""


def test_a_pushed_export_loads_back_with_from_pretrained(hub, trained, tmp_path):
    # The export folder also holds what a training run leaves around: none of it is uploaded.
    export = tmp_path / "export"
    shutil.copytree(trained["export"], export)
    (export / "zero").mkdir()
    (export / "zero" / "params-rank00000-of-00001.safetensors").write_bytes(b"shard")
    (export / "optimizer.pt").write_bytes(b"state")
    card_on_disk = (export / "README.md").read_text()
    repo = "hf-zero-test/from-export"
    proc = client(
        hub, tmp_path, str(export), repo, str(trained["root"] / "reference.pt"), code=PUSH_AND_LOAD
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["loading_info"] == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert got["same_logits"], got["max_diff"]
    assert got["tied"]
    assert got["missing"] == "EntryNotFoundError"
    files = hub.files(repo)
    assert set(files) == EXPORT_FILES | {"README.md"}
    assert got["snapshot"] == sorted(files)
    for name in EXPORT_FILES:
        assert files[name] == (export / name).read_bytes(), name
    # The card given to the push replaced the folder's README in the repo, not on disk.
    assert (export / "README.md").read_text() == card_on_disk
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "gpt2" and card.data.datasets == ["wikitext"]
    assert card.data.to_dict()["hf_zero"]["zero_stage"] == 2  # from the folder's hf_zero card
    assert card.data.eval_results[0].metric_value == 3.0


def test_push_to_a_private_repo_on_a_branch(hub, trained, tmp_path):
    # Pushed as it is (no new card): still only the export's files leave the folder.
    export = tmp_path / "export"
    shutil.copytree(trained["export"], export)
    shutil.copytree(trained["ckpt"] / "zero", export / "zero")
    (export / "zero" / "manifest.json").unlink()  # with it, the folder is a checkpoint
    (export / "training_args.bin").write_bytes(b"args")
    (export / "logs").mkdir()
    (export / "logs" / "events.txt").write_text("loss 1.0")
    repo = "hf-zero-test/private-branch"
    argv = ["push", str(export), "--repo-id", repo, "--private", "--revision", "dev"]
    proc = client(hub, tmp_path, *argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub.repos[repo].private
    assert set(hub.files(repo, "dev")) == EXPORT_FILES | {"README.md"}
    assert hub.files(repo, "main") == {}  # the branch was made from main; main is untouched


REPUSH = r"""
import sys
from hf_zero import push_to_hub
sharded, single, repo = sys.argv[1:4]
push_to_hub(sharded, repo)
push_to_hub(single, repo, commit_message="one file now")
"""


def test_a_second_push_deletes_weight_files_the_new_export_does_not_have(hub, trained, tmp_path):
    sharded = consolidate(
        trained["ckpt"], tmp_path / "sharded", max_shard_size="40KB", progress=False
    )
    shards = {p.name for p in sharded.glob("model-*.safetensors")}
    assert len(shards) > 1
    repo = "hf-zero-test/repush"
    proc = client(hub, tmp_path, str(sharded), str(trained["export"]), repo, code=REPUSH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = hub.commits(repo)[1]
    index = {"model.safetensors.index.json"}
    assert set(first.files) == shards | index | EXPORT_FILES - {"model.safetensors"} | {"README.md"}
    # Left behind, an index and its shards next to model.safetensors are two sets of weights in
    # one repo: the second push deletes them in its commit.
    assert set(hub.files(repo)) == EXPORT_FILES | {"README.md"}
    assert hub.commits(repo)[0].message == "one file now"


def test_hf_zero_push_reports_what_the_hub_refused(hub, trained, tmp_path):
    env = {**os.environ, **hub.env(tmp_path), "HF_TOKEN": "hf_not_the_token"}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_zero.cli", "push", str(trained["export"])]
        + ["--repo-id", "hf-zero-test/refused"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("hf-zero push: the Hub refused the upload to 'hf-zero-test/ref")
    assert "401" in proc.stderr and "Traceback" not in proc.stderr
    assert "hf-zero-test/refused" not in hub.repos


def _refusal(path: Path, capsys) -> str:
    assert cli_main(["push", str(path), "--repo-id", "hf-zero-test/never"]) == 1
    return capsys.readouterr().err


def test_push_refuses_a_folder_that_is_neither_a_checkpoint_nor_an_export(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "data").mkdir()
    err = _refusal(tmp_path, capsys)
    assert err == (
        f"hf-zero push: {tmp_path} is neither an hf_zero checkpoint (no zero/manifest.json) nor "
        "an HF export (no model.safetensors or model.safetensors.index.json); it holds data/, "
        "notes.txt. Pass a checkpoint saved by engine.save_checkpoint or a folder written by "
        "hf_zero.consolidate / engine.export\n"
    )


def test_push_refuses_weights_without_a_config(tmp_path, trained, capsys):
    shutil.copy(trained["export"] / "model.safetensors", tmp_path)
    assert "nor an HF export (no config.json); it holds model.safetensors" in _refusal(
        tmp_path, capsys
    )


def test_push_refuses_an_index_whose_shards_are_missing(tmp_path, trained, capsys):
    sharded = consolidate(
        trained["ckpt"], tmp_path / "sharded", max_shard_size="40KB", progress=False
    )
    gone = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    gone.unlink()
    err = _refusal(sharded, capsys)
    assert f"model.safetensors.index.json names shards that are missing: {gone.name}; " in err
    assert "write the export again" in err


def test_push_refuses_an_unfinished_checkpoint(tmp_path, capsys):
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "params-rank00000-of-00001.safetensors").write_bytes(b"")
    assert "no manifest; this is not a complete hf_zero checkpoint" in _refusal(tmp_path, capsys)


def test_push_refuses_a_missing_path_and_points_at_the_newest_checkpoint(tmp_path, trained, capsys):
    assert f"{tmp_path / 'nope'} is missing" in _refusal(tmp_path / "nope", capsys)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(trained["ckpt"], run_dir / "checkpoint-2")
    assert f"It holds checkpoints: the newest is {run_dir / 'checkpoint-2'}; pass that" in (
        _refusal(run_dir, capsys)
    )


def test_a_new_card_for_an_export_needs_the_card_hf_zero_wrote(trained, tmp_path):
    from hf_zero.card import CardInfo
    from hf_zero.hub import PushError, push_to_hub

    export = tmp_path / "export"
    shutil.copytree(trained["export"], export)
    (export / "README.md").write_text("---\nlicense: mit\n---\nsomeone else's card\n")
    with pytest.raises(PushError, match="cannot write a new card for the export .* Push the chec"):
        push_to_hub(export, "hf-zero-test/never", card=CardInfo(base_model="gpt2"))


def test_export_files_are_the_export_only(trained, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(trained["export"], export)
    for junk in ("optimizer.pt", "training_args.bin", "rng_state.pth", "trainer_state.json"):
        (export / junk).write_bytes(b"x")
    (export / "README.md").write_text("card")
    assert export_files(export) == [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "README.md",
    ]
