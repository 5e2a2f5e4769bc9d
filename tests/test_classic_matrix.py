"""Tier 3: the classic small case. A 100x100 weight `W`, a fresh 100x100 input `x` every step,
loss mean((x @ W)^2), torch.optim.Adam at lr 0.01 for 100 steps: under every stage at 4 gloo
ranks (each rank its 25 rows of the global batch) the final `W` equals one process's to 1e-5.

Adam cancels a constant scale of the gradient, so this case sees a dropped or duplicated
contribution, a wrong slice or a stale shard, not a sum taken for a mean (the parity tests
compare gradient norms for that).
"""

from __future__ import annotations

import torch
from torch import nn

import hf_zero
from scripts.harness.dist import run_distributed

N, STEPS, LR, WORLD = 100, 100, 0.01, 4
ATOL = 1e-5


class _Matrix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Parameter(torch.randn(N, N) / N**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.W).square().mean()


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(N, N, generator=torch.Generator().manual_seed(step))


def _reference() -> torch.Tensor:
    model = _Matrix()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(STEPS):
        model(_inputs(step)).backward()
        opt.step()
        opt.zero_grad()
    return model.W.detach().clone()


def _classic_worker(rank: int, world_size: int) -> dict:
    ref = _reference()
    rows = N // world_size
    out = {}
    for stage in range(4):
        model = _Matrix()
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
        for step in range(STEPS):
            engine.backward(engine(_inputs(step)[rank * rows : (rank + 1) * rows]))
            engine.step()
            engine.zero_grad()
        full = engine.full_state_dict()
        if rank == 0:
            out[stage] = (full["W"] - ref).abs().max().item()
    return out


def test_classic_matrix_every_stage_matches_one_process_adam():
    diffs = run_distributed(_classic_worker, WORLD, timeout=300)[0]
    print("max |W - W_ref| by stage:", diffs)
    assert set(diffs) == {0, 1, 2, 3}
    for stage, d in diffs.items():
        assert d <= ATOL, (stage, d, diffs)
