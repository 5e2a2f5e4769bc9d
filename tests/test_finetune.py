"""scripts/finetune.py up to the Trainer: arguments, defaults, and every bad input stopping with
a clear message before any process group starts. Tier 1 (in-process, `plan()` starts no process
group) plus one launch that proves the "before": a rank told it has a peer that never comes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_zero import models
from scripts.harness.dist import find_free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
pytest.importorskip("transformers")


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and HfArgumentParser resolve types through it
    spec.loader.exec_module(module)
    return module


finetune = _load_script()


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(models, "hub_unreachable", lambda timeout_s=3.0: "no network: test")


def _plan(tmp_path, *args):
    return finetune.plan(["--output_dir", str(tmp_path / "out"), *args])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---- the defaults -----------------------------------------------------------------------------


def test_no_arguments_is_the_tiny_gpt2_on_the_embedded_corpus(tmp_path):
    p = finetune.plan([])
    assert (p.source.name, p.task, p.dataset) == (
        "embedded:tiny-gpt2",
        "clm",
        "embedded:docstrings",
    )
    assert type(p.model).__name__ == "GPT2LMHeadModel" and p.block_size == 64
    kw = p.training_kwargs
    assert kw["output_dir"] == str(Path("output") / "tiny-gpt2")
    assert (kw["max_steps"], kw["learning_rate"]) == (150, 2e-3)  # the preset's defaults
    assert kw["zero_stage"] is None  # the engine's default (2) applies


def test_minilm_preset_does_classification_and_flags_win(tmp_path):
    p = _plan(tmp_path, "--model_name_or_path", "embedded:minilm", "--stage", "3",
              "--learning_rate", "3e-4", "--max_length", "32")  # fmt: skip
    assert (p.task, p.dataset, p.class_names) == (
        "cls",
        "embedded:docstring-topics",
        ["networking", "numbers"],
    )
    assert p.model.config.id2label == {0: "networking", 1: "numbers"}
    assert p.training_kwargs["zero_stage"] == 3 and p.training_kwargs["learning_rate"] == 3e-4
    assert p.max_length == 32 and p.training_kwargs["max_steps"] == 60


def test_task_is_inferred_from_the_data(tmp_path):
    text_only = _jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(40)])
    p = _plan(tmp_path, "--model", "embedded:minilm", "--dataset", text_only, "--block_size", "16")
    assert p.task == "mlm"  # an encoder and no label column
    labelled = _jsonl(tmp_path / "l.jsonl", [{"text": f"x {i}", "label": i % 3} for i in range(30)])
    p = _plan(tmp_path, "--model", "embedded:minilm", "--dataset", labelled)
    assert p.task == "cls" and p.class_names == ["0", "1", "2"]


# ---- bad input: every message names the value and the fix -------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "two"], "--stage must be a number 0, 1, 2 or 3, got 'two'"),
        (["--stage", "4"], "--stage must be 0, 1, 2 or 3, got 4: 0 replicates (DDP)"),
        (["--stage", "-1"], "--stage must be 0, 1, 2 or 3, got -1"),
        (["--stage", "2", "--zero_stage", "3"], "--stage 2 and --zero_stage 3 disagree"),
        (["--zero_stage", "5"], "--zero_stage must be 0, 1, 2 or 3, got 5"),
        (["--zero_config", "nope.yaml"], "--zero_config 'nope.yaml': no such file"),
        (
            ["--stage", "3", "--zero_config", str(ROOT / "configs" / "zero2.yaml")],
            "--stage 3 but --zero_config",
        ),
        (["--task", "seq2seq"], "--task must be one of clm, cls, mlm, got 'seq2seq'"),
        (["--task", "cls"], "--task cls does not fit embedded:tiny-gpt2, which does clm"),
        (["--model", "embedded:gpt5"], "'embedded:gpt5' is not an embedded preset"),
        (["--block_size", "4096"], "--block_size 4096 is longer than the model's 128 positions"),
        (["--eval_fraction", "1"], "--eval_fraction must be in [0, 1), got 1.0"),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    with pytest.raises(finetune.UsageError) as e:
        _plan(tmp_path, *args)
    assert message in str(e.value)


def test_missing_dataset_file(tmp_path):
    missing = tmp_path / "train.jsonl"
    with pytest.raises(finetune.UsageError, match=f"--dataset file not found: '{missing}'"):
        _plan(tmp_path, "--dataset", str(missing))


def test_absent_text_column(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"body": "x", "stars": 1}] * 4)
    with pytest.raises(
        finetune.UsageError,
        match=r"text column 'text' is not in the 'train' split \(columns: body, stars\); pass "
        "--text_column NAME",
    ):
        _plan(tmp_path, "--dataset", path)


def test_cls_without_a_label_column(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "x"}] * 4)
    with pytest.raises(finetune.UsageError, match="--task cls needs a label column"):
        _plan(tmp_path, "--model", "embedded:minilm", "--task", "cls", "--dataset", path)


def test_hub_model_while_offline(tmp_path, offline):
    with pytest.raises(finetune.UsageError) as e:
        _plan(tmp_path, "--model", "gpt2")
    msg = str(e.value)
    assert "--model 'gpt2' is not a local folder, and this machine is offline" in msg
    assert "Point --model at a local model folder" in msg and "embedded:tiny-gpt2" in msg


def test_hub_dataset_while_offline(tmp_path, offline):
    with pytest.raises(finetune.UsageError, match="--dataset 'wikitext' is not a local file, and"):
        _plan(tmp_path, "--dataset", "wikitext", "--dataset_config", "wikitext-2-raw-v1")


def test_bad_input_stops_before_any_process_group(tmp_path):
    """A rank launched as rank 0 of 2 whose peer never comes: any process-group start would
    wait for it (here, until the subprocess timeout). Each bad input ends at once instead,
    exit status 2, with its message."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    cases = [
        (["--dataset", str(tmp_path / "missing.jsonl")], "--dataset file not found"),
        (["--model", "hf-zero-tests/not-cached"], "this machine is offline (HF_HUB_OFFLINE"),
    ]
    for args, message in cases:
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "o"), *args],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=240,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("finetune.py: error: ") and message in proc.stderr
        assert "Traceback" not in proc.stderr
        assert time.monotonic() - start < 200


# ---- what the user sees at the end ------------------------------------------------------------


SUMMARY = {
    "model": "embedded:tiny-gpt2",
    "model_class": "GPT2LMHeadModel",
    "task": "clm",
    "dataset": "embedded:docstrings",
    "train_examples": 1300,
    "eval_examples": 60,
    "stage": 2,
    "world_size": 2,
    "mixed_precision": "no",
    "num_parameters": 239_360,
    "global_steps": 30,
    "skipped_steps": 0,
    "first_train_loss": 7.5,
    "final_train_loss": 6.7,
    "eval_loss": 6.6,
    "eval_accuracy": None,
    "perplexity": 735.1,
    "steps_per_second": 4.5,
    "model_state_bytes_per_rank": [2_393_608, 2_393_608],
    "zero_model_state_bytes": 2_393_600,
    "ddp_model_state_bytes": 3_829_760,
    "export": "out",
    "model_card": "out/README.md",
    "loss_curve": "out/loss_curve.png",
}


def test_format_summary():
    text = finetune.format_summary(SUMMARY)
    assert "30 steps, ZeRO stage 2, 2 rank(s), fp32: 4.50 steps/s" in text
    assert "train 7.5000 -> 6.7000 (first and last logged), eval 6.6000 (perplexity 735.1)" in text
    assert "rank 0 2.3 MiB, rank 1 2.3 MiB" in text
    assert "plain data parallelism would hold 3.7 MiB per rank" in text
    assert "export        out (from_pretrained loads it; model card out/README.md)" in text


def test_accuracy_counts_class_ids():
    import numpy as np

    ids, labels = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    assert finetune._accuracy((ids, labels)) == {"accuracy": 0.75}


def test_loss_curve(tmp_path, monkeypatch):
    history = [{"step": s, "loss": 5 - s / 10} for s in range(1, 11)] + [
        {"step": 10, "eval_loss": 4.2}
    ]
    path = tmp_path / "loss.png"
    pytest.importorskip("matplotlib")
    assert finetune.plot_loss_curve(history, path) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert finetune.plot_loss_curve([], path).startswith("not drawn: no loss was logged")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    note = finetune.plot_loss_curve(history, tmp_path / "other.png")
    assert note == "not drawn: matplotlib is not installed (pip install matplotlib)"
    assert not (tmp_path / "other.png").exists()
