"""Tier 4: the example script under the real `torchrun` launcher, 2 gloo ranks (and NCCL on a
GPU machine): it trains, and every rank's measured model-state bytes equal the formula."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.dist import find_free_port

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(find_free_port()),
        str(ROOT / "scripts" / "train_example.py"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _check(proc: subprocess.CompletedProcess, world: int, stage: int) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = re.findall(
        r"rank (\d)/(\d) stage (\d): [\d,]+ params, "
        r"model states ([\d.]+) MiB \(formula ([\d.]+) MiB\)",
        proc.stdout,
    )
    assert len(lines) == world, proc.stdout
    for _, w, s, measured, formula in lines:
        assert (int(w), int(s)) == (world, stage)
        assert abs(float(measured) - float(formula)) <= 0.01, proc.stdout
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert losses and losses[-1] < losses[0], proc.stdout  # it trains


@pytest.mark.parametrize("stage", [2, 3])
def test_example_under_torchrun(stage):
    proc = _torchrun(2, "--stage", str(stage), "--steps", "12", "--n-layer", "2", "--n-embd", "64")
    _check(proc, 2, stage)


def test_example_with_config_file():
    proc = _torchrun(
        2, "--zero-config", str(ROOT / "configs" / "zero1.yaml"), "--steps", "6", "--n-layer", "2"
    )
    _check(proc, 2, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_example_on_nccl(stage):
    n = torch.cuda.device_count()
    proc = _torchrun(n, "--stage", str(stage), "--steps", "12", "--mixed-precision", "bf16")
    _check(proc, n, stage)
