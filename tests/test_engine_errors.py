"""Every user-facing error of `hf_zero.initialize` (and `engine.clip_grad_norm_`), matched by text.

World size 1 in this process (torch.distributed not initialised runs as a group of one), except
where a real process group is needed to build the bad input (torch DDP): those go through
`run_distributed(..., 1)`. Each error is checked for what came, what was expected and the fix.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import hf_zero
from scripts.harness.cases import global_batch, make_model, param_groups
from scripts.harness.dist import run_distributed


@pytest.fixture(autouse=True)
def _no_process_group():
    # The in-process cases rely on "no process group = world size 1".
    assert not dist.is_initialized(), "a test left torch.distributed initialised in pytest"


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model), lr=1e-3)


# ---- config ---------------------------------------------------------------------------------


def test_config_of_the_wrong_type_is_a_type_error():
    model = make_model("gpt2")
    with pytest.raises(TypeError, match=r"^config must be a hf_zero\.ZeroConfig, got dict$"):
        hf_zero.initialize(model, _adamw(model), config={"stage": 2})


def test_config_file_path_is_a_type_error():
    model = make_model("gpt2")
    with pytest.raises(TypeError, match=r"config must be a hf_zero\.ZeroConfig, got str"):
        hf_zero.initialize(model, _adamw(model), config="configs/zero2.yaml")


# ---- model ----------------------------------------------------------------------------------


def _initialize_ddp_wrapped(rank: int, world_size: int) -> str:
    model = make_model("gpt2")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = _adamw(model)
    with pytest.raises(TypeError) as info:
        hf_zero.initialize(ddp, opt, config=hf_zero.ZeroConfig(stage=1))
    return str(info.value)


def test_ddp_wrapped_model_says_pass_model_module():
    # Wrapping in torch DDP needs a process group, hence the one-rank run.
    (message,) = run_distributed(_initialize_ddp_wrapped, 1)
    assert re.search(r"^model must be a bare nn\.Module, got DistributedDataParallel;", message)
    assert "pass the unwrapped model (model.module)" in message


def test_data_parallel_wrapped_model_is_refused():
    model = make_model("gpt2")
    with pytest.raises(TypeError, match=r"got DataParallel;.*\(model\.module\)"):
        hf_zero.initialize(torch.nn.DataParallel(model), _adamw(model))


def test_engine_passed_as_model_is_refused():
    model = make_model("gpt2")
    engine = hf_zero.initialize(model, _adamw(model), config=hf_zero.ZeroConfig(stage=1))
    with pytest.raises(TypeError, match=r"model must be a bare nn\.Module, got ZeroEngine;"):
        hf_zero.initialize(engine, _adamw(make_model("gpt2")))


def test_model_that_is_not_a_module_is_refused():
    model = make_model("gpt2")
    with pytest.raises(TypeError, match=r"model must be a bare nn\.Module, got OrderedDict"):
        hf_zero.initialize(model.state_dict(), _adamw(model))


def test_model_on_several_devices_names_them():
    model = make_model("gpt2")
    model.transformer.ln_f.to("meta")  # the rest stays on cpu
    opt = _adamw(model)  # after the move: .to() may replace the parameter objects
    with pytest.raises(
        ValueError,
        match=re.escape("the model's parameters are on several devices ['cpu', 'meta']")
        + r".*model\.to\(device\)",
    ):
        hf_zero.initialize(model, opt)


# ---- optimizer vs model ---------------------------------------------------------------------


def test_optimizer_over_frozen_parameters_has_no_trainable_parameters():
    model = make_model("gpt2")
    model.requires_grad_(False)
    n = len(list(model.parameters()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"the optimizer has no trainable parameters of the model ({n} tensors in 1 param "
            "groups, none of them a parameter with requires_grad=True)"
        )
        + r".*built over the parameters to train",
    ):
        hf_zero.initialize(model, opt)


def test_optimizer_over_another_models_tensors_is_not_a_parameter_of_the_model():
    model, other = make_model("gpt2"), make_model("gpt2", seed=1)
    first_shape = tuple(next(other.parameters()).shape)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"optimizer param group 0 holds a tensor of shape {first_shape} that is not a "
            "parameter of GPT2LMHeadModel"
        )
        + r".*model\.parameters\(\)",
    ):
        hf_zero.initialize(model, torch.optim.AdamW(other.parameters(), lr=1e-3))


def test_foreign_tensor_in_a_later_group_names_that_group():
    model = make_model("gpt2")
    stray = torch.nn.Parameter(torch.zeros(5, 7))
    opt = torch.optim.AdamW([{"params": list(model.parameters())}, {"params": [stray]}], lr=1e-3)
    with pytest.raises(
        ValueError, match=re.escape("optimizer param group 1 holds a tensor of shape (5, 7) that")
    ):
        hf_zero.initialize(model, opt)


def test_trainable_parameter_missing_from_the_optimizer_is_named():
    model = make_model("gpt2")
    params = [p for n, p in model.named_parameters() if n != "transformer.ln_f.bias"]
    opt = torch.optim.AdamW(params, lr=1e-3)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "parameter 'transformer.ln_f.bias' requires grad but is in no optimizer param group; "
            "add it to the optimizer or freeze it with requires_grad_(False)"
        ),
    ):
        hf_zero.initialize(model, opt)


def test_frozen_parameter_missing_from_the_optimizer_is_fine():
    # The counterpart of the error above: the fix it suggests must work.
    model = make_model("gpt2")
    model.transformer.ln_f.bias.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n != "transformer.ln_f.bias"]
    engine = hf_zero.initialize(model, torch.optim.AdamW(params, lr=1e-3))
    frozen = model.transformer.ln_f.bias.numel()
    assert engine.num_parameters(only_trainable=True) == engine.num_parameters() - frozen


# ---- optimizer class and state --------------------------------------------------------------


class Shampoo(torch.optim.Optimizer):
    """Stands in for any optimizer whose update depends on the parameter's shape."""

    def __init__(self, params, lr: float = 1e-3):
        super().__init__(params, {"lr": lr})

    def step(self, closure=None):
        return None


def _check_unsupported_message(message: str) -> None:
    supported = message.split("Supported: ", 1)[1].split(", ")
    for name in ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop"):
        assert name in supported, (name, message)
    assert "Adafactor" not in supported and "Shampoo" not in supported, message


def test_adafactor_is_refused_with_the_supported_list():
    model = make_model("gpt2")
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    with pytest.raises(
        TypeError, match=r"^torch\.optim\.\S*Adafactor is not a supported optimizer: .*elementwise"
    ) as info:
        hf_zero.initialize(model, opt)
    _check_unsupported_message(str(info.value))


def test_custom_optimizer_subclass_is_refused_with_the_supported_list():
    model = make_model("gpt2")
    with pytest.raises(
        TypeError, match=rf"^{re.escape(__name__)}\.Shampoo is not a supported optimizer: "
    ) as info:
        hf_zero.initialize(model, Shampoo(model.parameters()))
    _check_unsupported_message(str(info.value))


def test_optimizer_that_is_not_an_optimizer_is_refused():
    model = make_model("gpt2")
    with pytest.raises(TypeError, match=r"^optimizer must be a torch\.optim\.Optimizer, got list$"):
        hf_zero.initialize(model, list(model.parameters()))


def test_optimizer_that_already_stepped_is_refused():
    model = make_model("gpt2")
    opt = _adamw(model)
    model(**global_batch("gpt2", 0, 0, 1)).loss.backward()
    opt.step()
    assert opt.state, "the optimizer should hold state after one step"
    with pytest.raises(
        ValueError,
        match=re.escape("the optimizer already has state (it has stepped or loaded a state dict)")
        + r".*engine\.load_checkpoint",
    ):
        hf_zero.initialize(model, opt)


# ---- unit_modules ---------------------------------------------------------------------------


@pytest.mark.parametrize("units", [["NoSuchBlock"], ["GPT2Block", "NoSuchBlock"]])
def test_unknown_unit_module_lists_the_models_classes(units):
    model = make_model("gpt2")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "unit_modules names ['NoSuchBlock'] but GPT2LMHeadModel has no module of that class; "
            "its module classes are: "
        ),
    ) as info:
        hf_zero.initialize(
            model, _adamw(model), config=hf_zero.ZeroConfig(stage=3, unit_modules=units)
        )
    classes = str(info.value).split("its module classes are: ", 1)[1].split(", ")
    assert {"GPT2Block", "GPT2Attention", "GPT2LMHeadModel", "LayerNorm"} <= set(classes), classes


# ---- clip_grad_norm_ ------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0, -1, 0.0, float("nan")])
def test_clip_grad_norm_needs_a_positive_max_norm(max_norm):
    model = make_model("gpt2")
    engine = hf_zero.initialize(model, _adamw(model), config=hf_zero.ZeroConfig(stage=2))
    engine.backward(engine(**global_batch("gpt2", 0, 0, 1)).loss)
    with pytest.raises(ValueError, match=re.escape(f"max_norm must be > 0, got {max_norm!r}")):
        engine.clip_grad_norm_(max_norm)
    # Refusing must not consume the gradients: a valid clip still works afterwards.
    assert torch.isfinite(engine.clip_grad_norm_(1.0))
