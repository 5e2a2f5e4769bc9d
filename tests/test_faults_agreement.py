"""Tier 2: ranks that disagree are stopped at initialize, by name, and a non-finite gradient
without a loss scaler is caught on every rank alike.

The multi-rank scenarios run in scripts/harness/faults.py, shared with
scripts/reliability_report.py; these tests assert on the records they return."""

from __future__ import annotations

import re

import pytest
import torch

import hf_zero
from hf_zero.fingerprint import describe, disagreement_message, first_difference, format_path
from hf_zero.partition import ParamEntry
from scripts.harness.cases import make_model
from scripts.harness.faults import disagreement, nonfinite_grads

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
    record = disagreement(case, world_size=3)
    assert not record.problems, (record.problems, record.run_error)
    for o in record.ranks:  # every rank gets the same clear error, nobody hangs
        assert o.status == "raised" and o.error_type == "ValueError", o
        m = o.message
        assert re.search(pattern, m), m
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


@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_nonfinite_gradient_raises_on_every_rank(mixed):
    # Rank 1's loss is NaN in the second optimizer step, at every stage in turn.
    records = nonfinite_grads(mixed, "raise", range(4), world_size=2)
    assert [r.stage for r in records] == [0, 1, 2, 3]
    for record in records:
        assert not record.problems, (record.stage, record.problems, record.run_error)
        for o in record.ranks:
            steps = o.detail  # per step: (applied / skipped / raised, warnings or error, unchanged)
            assert [s[0] for s in steps] == ["applied", "raised"], steps
            assert "non-finite gradient norm (nan) at optimizer step 2" in steps[1][1]
            assert "nonfinite_grads='skip'" in steps[1][1]
            assert o.error_type == "FloatingPointError" and o.message == steps[1][1]


def test_nonfinite_gradient_skip_policy_skips_on_every_rank():
    records = nonfinite_grads("no", "skip", range(4), world_size=2)
    assert [r.stage for r in records] == [0, 1, 2, 3]
    for record in records:
        assert not record.problems, (record.stage, record.problems, record.run_error)
        for o in record.ranks:
            steps = o.detail
            assert [s[0] for s in steps] == ["applied", "skipped", "applied"], steps
            assert any(
                "at optimizer step 2; skipping the step on every rank" in w for w in steps[1][1]
            )
            # The skipped step left the weights exactly as they were.
            assert all(unchanged for kind, _, unchanged in steps if kind == "skipped"), steps


def test_nonfinite_policy_is_validated():
    with pytest.raises(ValueError, match="nonfinite_grads must be 'raise' or 'skip', got 'ignore'"):
        hf_zero.ZeroConfig(nonfinite_grads="ignore")
