"""hf_zero/config.py: ZeroConfig validation and loading. Tier 1: no process group.

Every user-facing error has a test here that matches its text.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from hf_zero.config import MIXED_PRECISION_CHOICES, STAGES, ZeroConfig

REPO = Path(__file__).resolve().parents[1]
# The engine's configs; configs/ also holds launch configs for `accelerate launch`.
CONFIG_FILES = sorted((REPO / "configs").glob("zero*.yaml"))
FIELDS = [f.name for f in dataclasses.fields(ZeroConfig)]
ALLOWED_KEYS = ", ".join(FIELDS)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Construction and defaults


def test_defaults():
    cfg = ZeroConfig()
    assert cfg.stage == 2
    assert cfg.mixed_precision == "no"
    assert cfg.bucket_size == 2**23
    assert cfg.unit_modules is None
    assert cfg.gradient_clipping is None
    assert cfg.prefetch is True
    assert cfg.max_inflight_reductions == 2
    assert cfg.keep_grad_shards is None  # kept at stage 2, freed at stage 3
    # The fp16 scaler starts at 2^16, grows every 2000 steps, backs off by 0.5.
    assert cfg.initial_loss_scale == 2.0**16
    assert cfg.loss_scale_growth_interval == 2000
    assert cfg.loss_scale_backoff_factor == 0.5


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mixed_precision", MIXED_PRECISION_CHOICES)
def test_every_valid_stage_and_precision(stage, mixed_precision):
    cfg = ZeroConfig(stage=stage, mixed_precision=mixed_precision)
    assert (cfg.stage, cfg.mixed_precision) == (stage, mixed_precision)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        ZeroConfig(2)  # type: ignore[misc]


def test_unit_modules_tuple_becomes_list():
    cfg = ZeroConfig(unit_modules=("GPT2Block", "BertLayer"))
    assert cfg.unit_modules == ["GPT2Block", "BertLayer"]


def test_valid_non_default_values():
    cfg = ZeroConfig(
        gradient_clipping=1,
        initial_loss_scale=1024,
        loss_scale_growth_factor=1.5,
        loss_scale_backoff_factor=0.25,
        prefetch=False,
        max_inflight_reductions=1,
        loss_scale_growth_interval=1,
        bucket_size=1,
    )
    assert cfg.gradient_clipping == 1
    assert cfg.prefetch is False


# ---------------------------------------------------------------------------------------------
# Validation errors, one per message


@pytest.mark.parametrize("stage", [4, -1, True, False, "2", None, [2], 2.5])
def test_bad_stage(stage):
    with pytest.raises(ValueError, match=re.escape(f"stage must be 0, 1, 2 or 3, got {stage!r}")):
        ZeroConfig(stage=stage)


def test_float_stage_is_rejected():
    with pytest.raises(ValueError, match=re.escape("stage must be 0, 1, 2 or 3, got 2.0")):
        ZeroConfig(stage=2.0)


@pytest.mark.parametrize("value", ["fp32", "BF16", "", None, False, "float16"])
def test_bad_mixed_precision(value):
    expected = f"mixed_precision must be one of 'no', 'bf16', 'fp16', got {value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig(mixed_precision=value)


def test_unquoted_yaml_no_is_a_bool(tmp_path):
    # YAML 1.1 reads an unquoted `no` as False; the error shows it, so the fix (quote it) is clear.
    path = _write(tmp_path, "c.yaml", "mixed_precision: no\n")
    with pytest.raises(
        ValueError,
        match=re.escape("mixed_precision must be one of 'no', 'bf16', 'fp16', got False"),
    ):
        ZeroConfig.from_file(path)
    path.write_text('mixed_precision: "no"\n')
    assert ZeroConfig.from_file(path).mixed_precision == "no"


@pytest.mark.parametrize(
    ("field", "unit"),
    [
        ("bucket_size", "elements per gradient bucket"),
        ("max_inflight_reductions", "buckets"),
        ("loss_scale_growth_interval", "steps"),
    ],
)
@pytest.mark.parametrize("value", [0, -5, 1.5, 2.0, True, "8", None])
def test_non_positive_int(field, unit, value):
    expected = f"{field} must be a positive integer ({unit}), got {value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig(**{field: value})


@pytest.mark.parametrize(
    "value",
    [
        "GPT2Block",
        ["GPT2Block", 3],
        [""],
        [None],
        5,
    ],
)
def test_bad_unit_modules(value):
    expected = (
        f"unit_modules must be a list of module class names such as ['GPT2Block'], got {value!r}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig(unit_modules=value)


@pytest.mark.parametrize("value", [0, 1, "true", "no"])
def test_bad_keep_grad_shards(value):
    expected = (
        "keep_grad_shards must be true, false or null (kept at stage 2, freed at stage 3), "
        f"got {value!r}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig(keep_grad_shards=value)


@pytest.mark.parametrize("value", [0, -1.0, "1.0", True, float("nan")])
def test_bad_gradient_clipping(value):
    expected = f"gradient_clipping must be a positive max global grad norm or None, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig(gradient_clipping=value)


@pytest.mark.parametrize("value", [0, -1.0, "65536", True, None, float("inf"), float("nan")])
def test_bad_initial_loss_scale(value):
    with pytest.raises(
        ValueError, match=re.escape(f"initial_loss_scale must be finite and > 0, got {value!r}")
    ):
        ZeroConfig(initial_loss_scale=value)


@pytest.mark.parametrize(
    "value", [float("inf"), 1e300, 1e-9, 0.5, 0, -1.0, float("nan"), True, "600", None, 604801]
)
def test_collective_timeout_outside_the_allowed_range_is_refused(value):
    expected = (
        f"collective_timeout_s must be a number of seconds from 1 to 604800 (7 days), got {value!r}"
    )
    with pytest.raises(ValueError, match="^" + re.escape(expected) + "$"):
        ZeroConfig(collective_timeout_s=value)


@pytest.mark.parametrize("value", [1, 1.0, 3.0, 600, 604800])
def test_collective_timeout_in_range_is_accepted(value):
    assert ZeroConfig(collective_timeout_s=value).collective_timeout_s == value


# ---------------------------------------------------------------------------------------------
# Frozen


def test_assigning_a_field_raises_naming_dataclasses_replace():
    cfg = ZeroConfig(stage=2)
    with pytest.raises(
        dataclasses.FrozenInstanceError,
        match=re.escape(
            "ZeroConfig is frozen: cannot assign stage=4 (it would skip validation); build a "
            "changed copy with dataclasses.replace(config, stage=4)"
        ),
    ):
        cfg.stage = 4  # type: ignore[misc]
    assert cfg.stage == 2
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete 'stage'"):
        del cfg.stage  # type: ignore[misc]


def test_dataclasses_replace_validates_the_copy():
    cfg = ZeroConfig(stage=2, mixed_precision="bf16")
    assert dataclasses.replace(cfg, stage=3) == ZeroConfig(stage=3, mixed_precision="bf16")
    with pytest.raises(ValueError, match=re.escape("stage must be 0, 1, 2 or 3, got 4")):
        dataclasses.replace(cfg, stage=4)


def test_a_config_is_hashable_and_compares_by_value():
    assert dataclasses.is_dataclass(ZeroConfig) and ZeroConfig.__dataclass_params__.frozen
    assert ZeroConfig(stage=1) == ZeroConfig(stage=1) != ZeroConfig(stage=2)
    assert hash(ZeroConfig(stage=1)) == hash(ZeroConfig(stage=1))


@pytest.mark.parametrize("value", [1, 1.0, 0.5, -2, True, "2"])
def test_bad_growth_factor(value):
    expected = f"loss_scale_growth_factor must be > 1, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig(loss_scale_growth_factor=value)


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.5, True, "0.5"])
def test_bad_backoff_factor(value):
    expected = f"loss_scale_backoff_factor must be in (0, 1), got {value!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig(loss_scale_backoff_factor=value)


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_bad_prefetch(value):
    with pytest.raises(
        ValueError, match=re.escape(f"prefetch must be true or false, got {value!r}")
    ):
        ZeroConfig(prefetch=value)


# ---------------------------------------------------------------------------------------------
# from_dict / to_dict


def test_from_dict_round_trip():
    cfg = ZeroConfig(stage=3, mixed_precision="bf16", unit_modules=["GPT2Block"], prefetch=False)
    assert ZeroConfig.from_dict(cfg.to_dict()) == cfg
    assert ZeroConfig.from_dict({}) == ZeroConfig()


def test_from_dict_unknown_key_names_key_and_allowed_keys():
    expected = f"unknown key 'stgae' in config; allowed keys are: {ALLOWED_KEYS}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig.from_dict({"stgae": 3})


def test_from_dict_unknown_keys_plural_sorted():
    expected = f"unknown keys 'alpha', 'zeta' in my source; allowed keys are: {ALLOWED_KEYS}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig.from_dict({"zeta": 1, "stage": 1, "alpha": 2}, source="my source")


def test_from_dict_unknown_non_string_key():
    with pytest.raises(ValueError, match="unknown keys"):
        ZeroConfig.from_dict({1: "x", "foo": "y"})


@pytest.mark.parametrize(
    ("data", "kind"), [([1, 2], "list"), ("stage: 2", "str"), (None, "NoneType")]
)
def test_from_dict_not_a_mapping(data, kind):
    with pytest.raises(
        ValueError, match=re.escape(f"config must be a mapping of field: value, got {kind}")
    ):
        ZeroConfig.from_dict(data)


def test_from_dict_bad_value_still_validated():
    with pytest.raises(ValueError, match=re.escape("stage must be 0, 1, 2 or 3, got 7")):
        ZeroConfig.from_dict({"stage": 7})


# ---------------------------------------------------------------------------------------------
# from_file


@pytest.mark.parametrize("name", ["c.yaml", "c.yml", "C.YAML"])
def test_from_file_yaml(tmp_path, name):
    path = _write(tmp_path, name, "stage: 3\nmixed_precision: bf16\nunit_modules: [GPT2Block]\n")
    cfg = ZeroConfig.from_file(path)
    assert (cfg.stage, cfg.mixed_precision, cfg.unit_modules) == (3, "bf16", ["GPT2Block"])


def test_from_file_json(tmp_path):
    path = _write(tmp_path, "c.json", json.dumps({"stage": 1, "gradient_clipping": 1.0}))
    cfg = ZeroConfig.from_file(str(path))
    assert (cfg.stage, cfg.gradient_clipping) == (1, 1.0)


def test_from_file_json_round_trip(tmp_path):
    cfg = ZeroConfig(stage=0, mixed_precision="fp16", bucket_size=1000)
    path = _write(tmp_path, "c.json", json.dumps(cfg.to_dict()))
    assert ZeroConfig.from_file(path) == cfg


def test_from_file_empty_yaml_gives_defaults(tmp_path):
    assert ZeroConfig.from_file(_write(tmp_path, "c.yaml", "# nothing\n")) == ZeroConfig()


@pytest.mark.parametrize(
    ("name", "text"),
    [("c.yaml", "stage: 1\nbucket_sise: 10\n"), ("c.json", '{"stage": 1, "bucket_sise": 10}')],
)
def test_from_file_unknown_key(tmp_path, name, text):
    path = _write(tmp_path, name, text)
    expected = (
        f"unknown key 'bucket_sise' in config file {str(path)!r}; allowed keys are: {ALLOWED_KEYS}"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig.from_file(path)


def test_from_file_bad_value_names_field(tmp_path):
    path = _write(tmp_path, "c.yaml", "stage: 5\n")
    with pytest.raises(ValueError, match=re.escape("stage must be 0, 1, 2 or 3, got 5")):
        ZeroConfig.from_file(path)


@pytest.mark.parametrize(
    ("name", "suffix"), [("c.toml", ".toml"), ("config", ""), ("c.yaml.bak", ".bak")]
)
def test_from_file_bad_extension(tmp_path, name, suffix):
    path = _write(tmp_path, name, "stage: 1\n")
    expected = f"ZeRO config file {str(path)!r} must end in .yaml, .yml or .json, got {suffix!r}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig.from_file(path)


def test_from_file_missing(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"ZeRO config file {str(path)!r} does not exist")
    ):
        ZeroConfig.from_file(path)


def test_from_file_directory_is_not_a_file(tmp_path):
    path = tmp_path / "dir.yaml"
    path.mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ZeroConfig.from_file(path)


def test_from_file_unparsable_yaml(tmp_path):
    path = _write(tmp_path, "c.yaml", "stage: [1, 2\n")
    with pytest.raises(ValueError, match=re.escape(f"cannot parse YAML config {str(path)!r}: ")):
        ZeroConfig.from_file(path)


def test_from_file_unparsable_json(tmp_path):
    path = _write(tmp_path, "c.json", '{"stage": 1,}')
    with pytest.raises(ValueError, match=re.escape(f"cannot parse JSON config {str(path)!r}: ")):
        ZeroConfig.from_file(path)


def test_from_file_not_a_mapping(tmp_path):
    path = _write(tmp_path, "c.yaml", "- stage\n- 2\n")
    expected = f"config file {str(path)!r} must be a mapping of field: value, got list"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ZeroConfig.from_file(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("c.yaml", "zero:\n  stage: 3\n  mixed_precision: fp16\n"),
        ("c.json", '{"zero": {"stage": 3, "mixed_precision": "fp16"}}'),
    ],
)
def test_from_file_zero_nesting(tmp_path, name, text):
    cfg = ZeroConfig.from_file(_write(tmp_path, name, text))
    assert (cfg.stage, cfg.mixed_precision) == (3, "fp16")


def test_from_file_zero_nesting_unknown_key(tmp_path):
    path = _write(tmp_path, "c.yaml", "zero:\n  stage: 3\n  prefetsh: false\n")
    with pytest.raises(ValueError, match=re.escape("unknown key 'prefetsh' in config file")):
        ZeroConfig.from_file(path)


def test_from_file_zero_nesting_not_a_mapping(tmp_path):
    path = _write(tmp_path, "c.yaml", "zero: 3\n")
    with pytest.raises(ValueError, match="must be a mapping of field: value, got int"):
        ZeroConfig.from_file(path)


def test_from_file_zero_nesting_beside_other_tools(tmp_path):
    path = _write(tmp_path, "c.yaml", "zero:\n  stage: 3\naccelerate:\n  num_processes: 2\n")
    assert ZeroConfig.from_file(path).stage == 3


# ---------------------------------------------------------------------------------------------
# The shipped configs/


def test_shipped_configs_exist():
    names = {p.name for p in CONFIG_FILES}
    assert {f"zero{s}.yaml" for s in STAGES} | {"zero3-bf16.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = ZeroConfig.from_file(path)
    stem = path.stem  # zero2, zero3-bf16, ...
    assert cfg.stage == int(stem[len("zero")])
    assert cfg.mixed_precision == ("bf16" if stem.endswith("-bf16") else "no")
    # Every field is written out (with its comment), so the file documents the whole config.
    data = yaml.safe_load(path.read_text())
    assert list(data) == FIELDS
    text = path.read_text()
    for field in FIELDS:
        before = text.split(f"\n{field}:")[0]
        assert before.rstrip("\n").splitlines()[-1].startswith("#"), f"{field} has no comment"
