"""Tier 4: `scripts/finetune.py --push_to_hub` against the local Hub server (one process): the
Hub gets the consolidated export and its model card, nothing else, and it loads back with
`from_pretrained(repo_id)` through the same server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.hub_server import USER, HubServer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
pytest.importorskip("transformers")

_LOAD_BACK = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
assert all(not v for v in info.values()), info
AutoTokenizer.from_pretrained(sys.argv[1])
print("loaded", type(model).__name__)
"""


def test_push_to_hub_uploads_the_export_and_card(tmp_path):
    repo_id = f"{USER}/tiny-gpt2-docstrings"
    with HubServer() as hub:
        env = {**os.environ, **hub.env(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        proc = subprocess.run(
            [
                sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "out"),
                "--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "true",
                "--save_strategy", "no", "--max_eval_samples", "8",
                "--push_to_hub", "--hub_model_id", repo_id,
            ],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        files = hub.files(repo_id)
        assert hub.unhandled == []
        assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
        assert not [f for f in files if f.startswith(("zero/", "checkpoint-", "_hf_zero"))]
        card = files["README.md"].decode()
        assert "zero-stage-2" in card and "causal-lm" in card
        back = subprocess.run(
            [sys.executable, "-c", _LOAD_BACK, repo_id],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert back.returncode == 0, back.stderr
        assert back.stdout.strip() == "loaded GPT2LMHeadModel"
