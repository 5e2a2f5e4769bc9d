"""Tier 4: scripts/minimal_loop.py, the README's first example, under torchrun at 4 gloo ranks:
every rank prints the same loss at every step, and the losses are those of one process training
on the same global batch; the last step writes a 4-rank sharded checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.harness.dist import find_free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "minimal_loop.py"
STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(stdout: str, world_size: int) -> dict[int, list[str]]:
    """rank -> the printed loss of each step, as printed."""
    out: dict[int, list[str]] = {}
    for rank, world, step, loss in re.findall(r"rank (\d+)/(\d+) step +(\d+) loss (\S+)", stdout):
        assert int(world) == world_size
        assert len(out.setdefault(int(rank), [])) == int(step)
        out[int(rank)].append(loss)
    return out


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_four_ranks_print_the_one_process_losses(tmp_path, stage):
    args = ["--steps", str(STEPS), "--stage", str(stage)]
    one = _run(
        [sys.executable, str(SCRIPT), *args, "--checkpoint-dir", str(tmp_path / "one")], tmp_path
    )
    four = _run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
            "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
            str(SCRIPT), *args, "--checkpoint-dir", str(tmp_path / "four"),
        ],
        tmp_path,
    )  # fmt: skip
    single = _losses(one.stdout, 1)
    ranks = _losses(four.stdout, 4)
    assert list(single) == [0] and len(single[0]) == STEPS
    assert sorted(ranks) == [0, 1, 2, 3]
    for rank in range(1, 4):
        assert ranks[rank] == ranks[0]  # the same weights on every rank: the same digits
    reference = [float(x) for x in single[0]]
    got = [float(x) for x in ranks[0]]
    # The same global-batch gradient, summed in another order: equal to fp32 rounding.
    assert got == pytest.approx(reference, rel=1e-5)
    assert got[0] == reference[0]  # before any step: the same initial weights, bit for bit
    assert got[-1] < got[0] / 3  # and it learns

    from hf_zero.checkpoint.inspect import inspect_checkpoint

    info = inspect_checkpoint(tmp_path / "four")
    assert (info["world_size"], info["stage"], info["step"]) == (4, stage, STEPS)
    assert all(f["ok"] for f in info["files"])


@pytest.mark.gpu
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_process_per_gpu_prints_the_one_process_losses(tmp_path, stage):
    """The NCCL path: one process per GPU (true reduce-scatter and all-gather), against one
    process on the same global batch."""
    import torch

    n = min(torch.cuda.device_count(), 4)
    args = ["--steps", str(STEPS), "--stage", str(stage)]
    one = _run(
        [sys.executable, str(SCRIPT), *args, "--checkpoint-dir", str(tmp_path / "one")], tmp_path
    )
    many = _run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
            str(SCRIPT), *args, "--checkpoint-dir", str(tmp_path / "many"),
        ],
        tmp_path,
    )  # fmt: skip
    reference = [float(x) for x in _losses(one.stdout, 1)[0]]
    ranks = _losses(many.stdout, n)
    assert all(ranks[r] == ranks[0] for r in range(n))
    assert [float(x) for x in ranks[0]] == pytest.approx(reference, rel=1e-5)
