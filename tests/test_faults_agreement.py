"""Tier 2: ranks that disagree are stopped at initialize, by name (issue #5 part 3), and a
non-finite gradient without a loss scaler is caught on every rank alike (part 4)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import hf_zero
from hf_zero.fingerprint import describe, disagreement_message, first_difference, format_path
from hf_zero.partition import ParamEntry
from tests.helpers.dist import run_distributed
from tests.parity_cases import global_batch, make_model, param_groups, rank_slice


def _initialize_worker(rank, world_size, case):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    n_embd = 48 if (case == "model" and rank == 2) else 32
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=97, n_positions=8)
    )
    stage = 3 if (case == "config" and rank == 1) else 2
    if case == "optimizer" and rank == 1:
        opt = torch.optim.SGD(param_groups(model), lr=1e-3, momentum=0.9)
    elif case == "groups" and rank == 0:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    try:
        hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
    except ValueError as e:
        return str(e)
    return None


WTE = r"model\.parameters\['transformer\.wte\.weight'\]"
LN = r"model\.parameters\['transformer\.h\.0\.ln_1\.weight'\]"
CASES = [
    ("model", WTE + r"\.shape differs \(ranks \[0, 1\]: \[97, 32\]; ranks \[2\]: \[97, 48\]\)"),
    ("config", r"config\.stage differs \(ranks \[0, 2\]: 2; ranks \[1\]: 3\)"),
    (
        "optimizer",
        r"optimizer\.class differs "
        r"\(ranks \[0, 2\]: \"torch\.optim\.adamw\.AdamW\"; "
        r"ranks \[1\]: \"torch\.optim\.sgd\.SGD\"\)",
    ),
    ("groups", LN + r"\.group differs \(ranks \[0\]: 0; ranks \[1, 2\]: 1\)"),
]


@pytest.mark.parametrize("case,pattern", CASES)
def test_ranks_that_disagree_fail_at_initialize(case, pattern):
    messages = run_distributed(_initialize_worker, 3, case, timeout=120)
    for m in messages:  # every rank gets the same clear error, nobody hangs
        assert m is not None and re.search(pattern, m), m
        assert m.startswith("ranks disagree at initialize:")


def test_first_difference_is_pure_and_ordered():
    a = {"x": 1, "y": {"a.b": [1, 2]}}
    assert first_difference(a, a) is None
    path, va, vb = first_difference(a, {"x": 1, "y": {"a.b": [1, 3]}})
    assert (format_path(path), va, vb) == ("y['a.b']", [1, 2], [1, 3])
    path, va, vb = first_difference({"g": [{"lr": 1}]}, {"g": [{"lr": 2}]})
    assert (format_path(path), va, vb) == ("g[0].lr", 1, 2)
    assert first_difference(a, {"x": 1})[0] == ("y",)
    cfg = hf_zero.ZeroConfig()
    model = make_model("gpt2")
    opt = torch.optim.AdamW(model.parameters())
    entries = [ParamEntry("w", (2,), "", 0)]
    d = describe(cfg, entries, model, opt)
    assert "ranks [0]: 2; ranks [1]: 3" in disagreement_message(
        [d, {**d, "config": {**d["config"], "stage": 3}}]
    )


# ---- non-finite gradients without a loss scaler ------------------------------------------------


def _nonfinite_worker(rank, world_size, mixed, policy):
    rows = []
    for stage in range(4):
        model = make_model("gpt2")
        cfg = hf_zero.ZeroConfig(stage=stage, mixed_precision=mixed, nonfinite_grads=policy)
        engine = hf_zero.initialize(
            model, torch.optim.AdamW(param_groups(model), lr=1e-3), config=cfg
        )
        outcome = []
        for step in range(3):
            loss = engine(**rank_slice(global_batch("gpt2", step, 0, world_size), rank)).loss
            if step == 1 and rank == 1:
                loss = loss * float("nan")  # one rank, one step
            engine.backward(loss)
            before = engine.full_state_dict(all_ranks=True)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    applied = engine.step()
                outcome.append(
                    ("applied" if applied else "skipped", [str(w.message) for w in caught])
                )
            except FloatingPointError as e:
                outcome.append(("raised", str(e)))
                break
            finally:
                engine.zero_grad()
            after = engine.full_state_dict(all_ranks=True)
            if not applied:
                assert all(torch.equal(before[k], after[k]) for k in before)
        rows.append(outcome)
    return rows


@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_nonfinite_gradient_raises_on_every_rank(mixed):
    for rank_rows in run_distributed(_nonfinite_worker, 2, mixed, "raise", timeout=300):
        for outcome in rank_rows:
            assert [o[0] for o in outcome] == ["applied", "raised"], outcome
            assert "non-finite gradient norm (nan) at optimizer step 2" in outcome[1][1]
            assert "nonfinite_grads='skip'" in outcome[1][1]


def test_nonfinite_gradient_skip_policy_skips_on_every_rank():
    for rank_rows in run_distributed(_nonfinite_worker, 2, "no", "skip", timeout=300):
        for outcome in rank_rows:
            assert [o[0] for o in outcome] == ["applied", "skipped", "applied"], outcome
            assert any(
                "at optimizer step 2; skipping the step on every rank" in w for w in outcome[1][1]
            )


def test_nonfinite_policy_is_validated():
    with pytest.raises(ValueError, match="nonfinite_grads must be 'raise' or 'skip', got 'ignore'"):
        hf_zero.ZeroConfig(nonfinite_grads="ignore")
