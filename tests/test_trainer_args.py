"""ZeroTrainingArguments: what it adds, what it translates, and what it refuses at construction
(before any process group, model or training step). One process, no ranks."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from hf_zero import ZeroConfig  # noqa: E402
from hf_zero.integrations.trainer import (  # noqa: E402
    SHARDABLE_OPTIMS,
    ZeroTrainer,
    ZeroTrainingArguments,
)


def _args(tmp_path, **kw) -> ZeroTrainingArguments:
    return ZeroTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)


def test_engine_config_from_stage_precision_and_file(tmp_path):
    assert _args(tmp_path).zero_engine_config() == ZeroConfig()
    assert _args(tmp_path, zero_stage=3, bf16=True).zero_engine_config() == ZeroConfig(
        stage=3, mixed_precision="bf16"
    )
    cfg = tmp_path / "zero.yaml"
    cfg.write_text("stage: 1\nbucket_size: 1024\n")
    got = _args(tmp_path, zero_config=str(cfg), bf16=True).zero_engine_config()
    assert got == ZeroConfig(stage=1, bucket_size=1024, mixed_precision="bf16")
    assert _args(tmp_path, zero_config=str(cfg), zero_stage=1).zero_engine_config().stage == 1


def test_parses_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ZeroTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--zero_stage", "3", "--report_to", "none"]
    )
    assert args.zero_stage == 3 and args.zero_config is None
    assert args.zero_engine_config().stage == 3


@pytest.mark.parametrize("optim", ["adafactor", "adamw_8bit", "paged_adamw_32bit", "lion_32bit"])
def test_optim_that_cannot_shard_is_refused_naming_the_alternatives(tmp_path, optim):
    with pytest.raises(ValueError, match=rf"optim='{optim}' cannot be sharded") as e:
        _args(tmp_path, optim=optim)
    assert all(name in str(e.value) for name in SHARDABLE_OPTIMS)


@pytest.mark.parametrize("optim", SHARDABLE_OPTIMS)
def test_elementwise_optims_are_accepted(tmp_path, optim):
    assert str(_args(tmp_path, optim=optim).optim.value) == optim


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, r"got deepspeed=.* zero_stage=3"),
        ({"fsdp": "full_shard"}, r"got fsdp='full_shard' \(with zero_stage=3\)"),
    ],
)
def test_zero_stage_with_deepspeed_or_fsdp_is_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        _args(tmp_path, zero_stage=3, **kw)
    assert "shards the model itself" in str(e.value)


def test_deepspeed_from_the_launcher_environment_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="ACCELERATE_USE_DEEPSPEED is set in the environment"):
        _args(tmp_path, zero_stage=2)


@pytest.mark.parametrize(
    "kw, yaml, match",
    [
        ({"zero_stage": 5}, None, r"stage must be 0, 1, 2 or 3, got 5"),
        (
            {"zero_stage": 3},
            "stage: 2\n",
            r"ZeRO stage 3 was asked for, but config file .* stage 2",
        ),
        ({"fp16": True}, "mixed_precision: bf16\n", r"is 'fp16' but config file .*'bf16'"),
        ({}, "gradient_clipping: 1.0\n", r"set max_grad_norm=1.0 and remove gradient_clipping"),
        ({}, "stage: 2\nbucket: 3\n", r"unknown key 'bucket'"),
    ],
)
def test_bad_engine_settings_fail_at_construction(tmp_path, kw, yaml, match):
    if yaml is not None:
        (tmp_path / "zero.yaml").write_text(yaml)
        kw = {**kw, "zero_config": str(tmp_path / "zero.yaml")}
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kw)


def test_missing_zero_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        _args(tmp_path, zero_config=str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize(
    "kw, match",
    [
        (
            {"push_to_hub": True, "hub_strategy": "checkpoint", "hub_model_id": "u/m"},
            r"hub_strategy='checkpoint' uploads resumable checkpoints.*'every_save' or 'end'",
        ),
        (
            {
                "save_only_model": True,
                "load_best_model_at_end": True,
                "eval_strategy": "steps",
                "save_strategy": "steps",
            },
            r"save_only_model=True with load_best_model_at_end=True",
        ),
        ({"auto_find_batch_size": True}, r"auto_find_batch_size=True is not supported"),
        ({"torch_compile": True}, r"torch_compile=True is not supported"),
    ],
)
def test_arguments_whose_meaning_cannot_be_kept_are_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kw)


def test_trainer_needs_zero_training_arguments(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match=r"needs args=hf_zero.ZeroTrainingArguments.*got Training"):
        ZeroTrainer(model=None, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))


def test_lazy_names_resolve_to_this_module():
    import hf_zero

    assert hf_zero.ZeroTrainer is ZeroTrainer
    assert hf_zero.ZeroTrainingArguments is ZeroTrainingArguments
