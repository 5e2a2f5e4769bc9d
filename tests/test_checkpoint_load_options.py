"""Tier 2: a resume that would put optimizer state on the wrong parameters is refused, and the
two ways to load less: `weights_only=True` and `restore_rng=False`.

Param groups in another order, or parameters whose trainability changed, are refused like torch's
`load_state_dict` refuses them, naming the parameters, their group or trainability in the
checkpoint and here, and the options; on every rank, with every engine unchanged (the multi-rank
scenarios run in scripts/harness/checkpoint_misuse.py, shared with the reliability report).
`weights_only=True` loads exactly the saved weights and keeps the engine's optimizer state,
counters and RNG; `restore_rng=False` loads everything but the RNG states.
"""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

import hf_zero
from hf_zero.checkpoint import CheckpointError
from scripts.harness.cases import make_model, param_groups
from scripts.harness.checkpoint_misuse import RESUME_MISMATCHES, resume_mismatch

IDS = torch.arange(16).reshape(2, 8) % 97


def _engine(seed=0, *, groups=None, optimizer=torch.optim.AdamW):
    model = make_model("gpt2", seed=seed)
    groups = groups(model) if groups is not None else param_groups(model)
    return hf_zero.initialize(model, optimizer(groups, lr=1e-3), config=hf_zero.ZeroConfig(stage=1))


def _train_one(engine):
    engine.backward(engine(input_ids=IDS, labels=IDS).loss)
    engine.step()
    engine.zero_grad()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    engine = _engine()
    _train_one(engine)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    engine.save_checkpoint(path)
    return path, engine.full_state_dict(), torch.get_rng_state()


def _reversed_groups(model):
    return param_groups(model)[::-1]


@pytest.mark.parametrize("case", RESUME_MISMATCHES)
def test_resume_with_changed_param_groups_is_refused_on_every_rank(case):
    record = resume_mismatch(case, world_size=2)
    assert not record.problems, (record.problems, record.run_error)
    assert [o.error_type for o in record.ranks] == ["CheckpointError"] * 2


def test_reordered_param_groups_are_refused_naming_the_parameters(saved):
    path, _, _ = saved
    engine = _engine(seed=1, groups=_reversed_groups)
    before = engine.full_state_dict()
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{path}: ")
        + r"\d+ parameters are in another param group since the checkpoint was saved: "
        r"'transformer\.[^']+': param group [01] in the checkpoint, param group [01] here;"
        r".* and \d+ more\. Resuming would apply optimizer state and hyperparameters to the "
        r"wrong parameters\. Build the optimizer with the param groups of the save .*"
        r"load_checkpoint\(path, weights_only=True\)",
    ):
        engine.load_checkpoint(path)
    after = engine.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not engine.optimizer.state


def _without_wte(model):
    model.transformer.wte.weight.requires_grad_(False)
    return [
        {**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups(model)
    ]


def test_changed_trainability_is_refused_naming_the_parameters(saved, tmp_path):
    frozen = _engine(groups=_without_wte)
    _train_one(frozen)
    frozen.save_checkpoint(tmp_path / "frozen")
    unfrozen = _engine(seed=1)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            "1 parameters changed trainability (requires_grad) or param group since the "
            "checkpoint was saved: 'transformer.wte.weight': frozen in the checkpoint, param "
            "group 0 here."
        ),
    ):
        unfrozen.load_checkpoint(tmp_path / "frozen")  # unfrozen since the save
    path, _, _ = saved
    with pytest.raises(
        CheckpointError,
        match=re.escape("'transformer.wte.weight': param group 0 in the checkpoint, frozen here"),
    ):
        _engine(seed=1, groups=_without_wte).load_checkpoint(path)  # frozen since the save
    assert unfrozen.global_steps == 0 and not unfrozen.optimizer.state


def test_weights_only_loads_the_exact_weights_and_keeps_a_fresh_optimizer(saved):
    path, want, _ = saved
    engine = _engine(seed=1, groups=_reversed_groups, optimizer=torch.optim.SGD)
    rng = torch.get_rng_state()
    manifest = engine.load_checkpoint(path, weights_only=True)
    assert manifest.step == 1
    got = engine.full_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not engine.optimizer.state and engine.global_steps == 0
    assert torch.equal(torch.get_rng_state(), rng)  # weights only: the RNG stays this process's
    _train_one(engine)  # and it trains on


def test_restore_rng_false_leaves_the_rng_to_the_host_framework(saved):
    path, _, at_save = saved
    engine = _engine(seed=1)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    mine = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    engine.load_checkpoint(path, restore_rng=False)
    assert engine.global_steps == 1 and engine.optimizer.state  # everything else is loaded
    assert torch.equal(torch.get_rng_state(), mine[0])
    assert random.getstate() == mine[1]
    assert (np.random.get_state()[1] == mine[2]).all()
    engine.load_checkpoint(path)  # the default restores the saved streams
    assert torch.equal(torch.get_rng_state(), at_save)
