"""Tier 2: a rank that stops calling collectives makes the others fail fast and clearly
(issue #5 part 2): within `collective_timeout_s` plus a margin, with a CollectiveError that says
which collective, in which phase, timed out. Nothing hangs."""

from __future__ import annotations

import time

import torch

import hf_zero
from hf_zero.comm import CollectiveError
from tests.helpers.dist import run_distributed
from tests.parity_cases import global_batch, make_model, param_groups, rank_slice

TIMEOUT = 3.0
STALL = 4.5


def _stall_worker(rank, world_size):
    rows = []
    for stage in range(4):
        model = make_model("gpt2")
        cfg = hf_zero.ZeroConfig(stage=stage, collective_timeout_s=TIMEOUT)
        engine = hf_zero.initialize(
            model, torch.optim.AdamW(param_groups(model), lr=1e-3), config=cfg
        )
        t0 = time.monotonic()
        try:
            for step in range(2):
                batch = rank_slice(global_batch("gpt2", step, 0, world_size), rank)
                if step == 1 and rank == world_size - 1:
                    time.sleep(STALL)  # this rank stalls: no collective for a while
                    t0 = time.monotonic()
                if step == 1 and rank != world_size - 1:
                    t0 = time.monotonic()
                engine.backward(engine(**batch).loss)
                engine.step()
                engine.zero_grad()
            rows.append((stage, "finished", time.monotonic() - t0))
        except CollectiveError as e:
            rows.append((stage, str(e), time.monotonic() - t0))
    return rows


def test_stalled_rank_fails_the_others_within_the_timeout():
    results = run_distributed(_stall_worker, 3, timeout=240)
    phases = {
        0: "gradient all-reduce of bucket",
        1: "gradient reduce-scatter of bucket",
        2: "gradient reduce-scatter of bucket",
        3: "all-gather of unit '<root>' (forward)",
    }
    for rank, rows in enumerate(results[:2]):  # the ranks that kept going
        for stage, message, elapsed in rows:
            assert message != "finished", (rank, stage)
            assert phases[stage] in message, (rank, stage, message)
            assert (
                "a peer rank disappeared or stopped calling collectives within the 3 s" in message
            )
            assert f"rank {rank}:" in message
            assert TIMEOUT - 0.5 <= elapsed <= TIMEOUT + 5, (rank, stage, elapsed)


def _dead_rank_worker(rank, world_size, stage):
    import os
    import signal

    model = make_model("gpt2")
    cfg = hf_zero.ZeroConfig(stage=stage, collective_timeout_s=TIMEOUT)
    engine = hf_zero.initialize(model, torch.optim.AdamW(param_groups(model), lr=1e-3), config=cfg)
    if rank == world_size - 1:
        # Die in the middle of the second step's backward (after its first gradient).
        p = engine.module.transformer.h[1].mlp.c_proj.weight
        p.register_hook(
            lambda g: os.kill(os.getpid(), signal.SIGKILL) if engine.global_steps == 1 else None
        )
    t0 = time.monotonic()
    try:
        for step in range(2):
            t0 = time.monotonic()
            batch = rank_slice(global_batch("gpt2", step, 0, world_size), rank)
            engine.backward(engine(**batch).loss)
            engine.step()
            engine.zero_grad()
    except CollectiveError as e:
        return str(e), time.monotonic() - t0
    return "finished", time.monotonic() - t0


def test_sigkilled_rank_fails_the_others_fast_at_every_stage():
    for stage in range(4):
        results = run_distributed(_dead_rank_worker, 3, stage, timeout=120, may_die={2})
        assert results[2] is None
        for rank, (message, elapsed) in enumerate(results[:2]):
            assert message != "finished", (stage, rank)
            assert (
                f"rank {rank}:" in message
                and "a peer rank disappeared or stopped calling" in message
            )
            assert "(backward)" in message or "(optimizer step)" in message, message
            assert elapsed <= TIMEOUT + 5, (stage, rank, elapsed, message)
