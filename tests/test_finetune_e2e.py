"""Tier 4: scripts/finetune.py end to end under the real launcher (torchrun, 2 gloo ranks): the
tiny GPT-2 (clm, stage 2) and the pretrained MiniLM BERT (cls, stage 3). Each export loads with
plain `from_pretrained` (every loading-info list empty), the loss goes down, the summary, the
model card and the loss curve are there, and each rank holds less than plain data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.harness.dist import find_free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
transformers = pytest.importorskip("transformers")


def _torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        str(SCRIPT), "--output_dir", str(out), "--disable_tqdm", "true",
        "--save_strategy", "no", "--eval_strategy", "no", "--eval_on_start", "true",
        "--logging_steps", "1", *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",  # nothing may come from the network
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _check_run(proc, out: Path, *, stage: int, auto_class: str, world_size: int = 2) -> dict:
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "fine-tune done" in proc.stdout
    assert f"ZeRO stage {stage}, {world_size} rank(s)" in proc.stdout
    for noise in ("bos_token_id", "loss_type", "Traceback"):
        assert noise not in log, log[-6000:]
    model, info = getattr(transformers, auto_class).from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    transformers.AutoTokenizer.from_pretrained(out)
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert (summary["stage"], summary["world_size"]) == (stage, world_size)
    assert summary["num_parameters"] == model.num_parameters()
    per_rank = summary["model_state_bytes_per_rank"]
    assert len(per_rank) == world_size
    if world_size > 1 and stage > 0:
        assert max(per_rank) < summary["ddp_model_state_bytes"]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals  # the same eval set, before and after
    card = (out / "README.md").read_text()
    assert f"zero-stage-{stage}" in card and f"world_size: {world_size}" in card
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    return summary


def test_tiny_gpt2_clm_stage2(tmp_path):
    out = tmp_path / "gpt2"
    proc = _torchrun(out, "--stage", "2", "--max_steps", "8", "--max_eval_samples", "16")
    summary = _check_run(proc, out, stage=2, auto_class="AutoModelForCausalLM")
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert summary["global_steps"] == 8


def test_minilm_cls_stage3(tmp_path):
    out = tmp_path / "minilm"
    proc = _torchrun(
        out, "--model", "embedded:minilm", "--stage", "3", "--max_steps", "6",
        "--per_device_train_batch_size", "8", "--max_length", "32", "--learning_rate", "3e-4",
        "--warmup_steps", "0", "--max_eval_samples", "22",
    )  # fmt: skip
    summary = _check_run(proc, out, stage=3, auto_class="AutoModelForSequenceClassification")
    assert summary["eval_accuracy"] is not None
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.id2label == {0: "networking", 1: "numbers"}
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    accuracy = [h["eval_accuracy"] for h in history if "eval_accuracy" in h]
    assert accuracy[-1] > max(0.6, accuracy[0]), accuracy  # two balanced classes: chance is 0.5
    assert "sentence-transformers/all-MiniLM-L6-v2" in (out / "README.md").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_tiny_gpt2_on_gpus_bf16(tmp_path, stage):
    """The NCCL path through the Trainer: one process per GPU (2, or a one-rank NCCL group on a
    machine with one GPU), bf16 compute."""
    import torch

    n = min(torch.cuda.device_count(), 2)
    out = tmp_path / f"gpu{stage}"
    proc = _torchrun(out, "--stage", str(stage), "--max_steps", "8", "--bf16", "true",
                     "--use_cpu", "false", "--max_eval_samples", "16", nproc=n)  # fmt: skip
    summary = _check_run(proc, out, stage=stage, auto_class="AutoModelForCausalLM", world_size=n)
    assert summary["final_train_loss"] < summary["first_train_loss"]
