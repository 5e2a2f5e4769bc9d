"""ZeroTrainer with LoRA adapters, gradient checkpointing, stage 3 and bf16 together, saved
mid-run and resumed bit-identically (tests/trainer_scripts/lora.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

from scripts.harness.dist import run_distributed  # noqa: E402
from tests.trainer_scripts import lora  # noqa: E402


def test_lora_checkpointing_stage3_bf16_resumes_bit_identically(tmp_path):
    rank0, _ = run_distributed(lora.lora_resume_worker, 2, str(tmp_path), timeout=900)
    assert rank0["checkpointing"] is True
    assert len(rank0["full"]) == 2 and len(rank0["all"]) == 6
    assert rank0["all"][-1] < rank0["all"][0]  # the adapters trained
    assert rank0["resumed"] == rank0["full"], rank0
    assert rank0["resumed_grad_norm"] == rank0["full_grad_norm"], rank0
    assert "adapter_model.safetensors" in rank0["final_files"], rank0["final_files"]
    assert "model.safetensors" not in rank0["final_files"], rank0["final_files"]
