"""What keeps an engine's model and optimizer from being used around it by mistake.

An engine owns its model's parameters and gradients: it reduces and shards them itself, so the
usual torch calls on the model and optimizer would read or write the wrong tensors. Each such
call either reaches the engine or stops with an error that names the engine call to use:

- `optimizer.step()` and `optimizer.zero_grad()` are routed to `engine.step()` and
  `engine.zero_grad()` (`OptimizerRoute`), so Accelerate's optimizer wrapper and LR schedulers
  (built before or after `initialize`) drive the engine unchanged. The engine's own update
  still goes through `optimizer.step`, so a scheduler's tracking wrapper sees every step.
- `model.zero_grad()` is routed to `engine.zero_grad()`; at stage 3 `model.save_pretrained`
  (whose parameters are empty shards there) raises, pointing at `engine.export`
  (`route_model`).
- `torch.nn.utils.clip_grad_norm_` / `clip_grad_value_` on an engine's parameters raise,
  pointing at `engine.clip_grad_norm_` (`install_clip_guard`): their `.grad` is not the global
  gradient (None at stages 2-3, the local or unaveraged sum at stages 0-1). The guard wraps
  torch's functions once, at the first `initialize`; other parameters pass through untouched.
- A model (or a parameter) that already belongs to a live engine is refused at `initialize`
  (`check_not_attached`).
"""

from __future__ import annotations

import contextlib
import functools
import types
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "OptimizerRoute",
    "attach",
    "check_not_attached",
    "install_clip_guard",
    "route_model",
    "sharded_save_refusal",
]

# Live engines, each with `_param_ids` (ids of the parameters it owns; it holds them, so the
# ids stay theirs while it lives).
_ENGINES: weakref.WeakSet = weakref.WeakSet()

CLIP_HINT = (
    "Call engine.clip_grad_norm_(max_norm) (with Accelerate: accelerator.clip_grad_norm_ of "
    "hf_zero's ZeroAccelerator), or set ZeroConfig(gradient_clipping=max_norm)"
)


def attach(engine) -> None:
    """Record `engine` as the owner of its parameters."""
    _ENGINES.add(engine)


def _owner(params) -> tuple[object, str] | None:
    engines = list(_ENGINES)
    if not engines:
        return None
    for name, p in params:
        for engine in engines:
            if id(p) in engine._param_ids:
                return engine, name
    return None


def check_not_attached(model: nn.Module) -> None:
    """Raises ValueError if a parameter of `model` already belongs to a live engine."""
    found = _owner(model.named_parameters())
    if found is not None:
        engine, name = found
        what = "" if engine.module is model else f" (through {type(engine.module).__name__})"
        raise ValueError(
            f"{type(model).__name__} already has a hf_zero engine{what}: hf_zero.initialize was "
            f"called on it before, and that engine owns its parameters and gradients (parameter "
            f"{name!r}). Keep using the first engine (engine.module is this model), or build a "
            "fresh model for a second engine"
        )


def _refuse(function: str, parameters: list) -> None:
    found = _owner((f"#{i}", p) for i, p in enumerate(parameters))
    if found is not None:
        engine, _ = found
        raise RuntimeError(
            f"{function} was given the parameters of a hf_zero engine (stage "
            f"{engine.config.stage}): their .grad does not hold the global gradient (the engine "
            "reduces and shards gradients itself: at stages 2-3 .grad is None after backward, at "
            "stages 0-1 it holds the unaveraged sum), so it would compute a wrong norm and clip "
            f"nothing, or the wrong amount. {CLIP_HINT}"
        )


def install_clip_guard() -> None:
    """Wrap torch.nn.utils.clip_grad_norm_ and clip_grad_value_ (once) so that they refuse an
    engine's parameters. Every other call runs torch's function unchanged."""
    from torch.nn.utils import clip_grad

    for name in ("clip_grad_norm_", "clip_grad_value_"):
        original = getattr(clip_grad, name)
        if getattr(original, "_hf_zero_guard", False):
            continue
        guarded = _guarded(original, f"torch.nn.utils.{name}")
        setattr(clip_grad, name, guarded)
        setattr(torch.nn.utils, name, guarded)


def _guarded(original: Callable, label: str) -> Callable:
    @functools.wraps(original)
    def guarded(parameters, *args, **kwargs):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        else:
            parameters = list(parameters)
        _refuse(label, parameters)
        return original(parameters, *args, **kwargs)

    guarded._hf_zero_guard = True
    return guarded


class OptimizerRoute:
    """Routes `optimizer.step()` to `on_step()` and `optimizer.zero_grad()` to `on_zero_grad`.

    Inside `applying()`, `optimizer.step()` is the optimizer's own update: the engine's call goes
    through whatever wraps `optimizer.step` (an LR scheduler's tracking wrapper) and ends in
    the method it had before routing.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        on_step: Callable[[], bool],
        on_zero_grad: Callable[[bool], None],
    ):
        self._update = optimizer.step  # the class's step, or a scheduler's wrapper of it
        self._applying = False
        route = self

        def step(opt, closure=None):
            if route._applying:
                return route._update()
            if closure is not None:
                raise TypeError(
                    "engine.optimizer.step(closure) is not supported: the engine reduces "
                    "gradients in backward. Call engine.backward(loss) for each micro-step, "
                    "then engine.optimizer.step() (or engine.step()) without a closure"
                )
            return on_step()

        def zero_grad(opt, set_to_none: bool = True):
            on_zero_grad(set_to_none)

        # A scheduler built before initialize already tracks the calls underneath; a later one
        # must not warn that the step was overridden after it.
        if getattr(optimizer.step, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True
        optimizer.step = types.MethodType(step, optimizer)
        optimizer.zero_grad = types.MethodType(zero_grad, optimizer)

    @contextlib.contextmanager
    def applying(self) -> Iterator[None]:
        self._applying = True
        try:
            yield
        finally:
            self._applying = False


def sharded_save_refusal(model: nn.Module, world_size: int) -> str:
    """What `model.save_pretrained` says at stage 3."""
    return (
        f"{type(model).__name__}.save_pretrained cannot write a stage-3 model: its parameters "
        f"are sharded across the {world_size} ranks and the full tensors are empty outside "
        "forward and backward. Write the HF folder with engine.export(output_dir) (collective: "
        "call it on every rank), or take engine.full_state_dict() on rank 0"
    )


def route_model(
    model: nn.Module, *, on_zero_grad: Callable[[bool], None], save_refusal: str | None
) -> None:
    """Route `model.zero_grad()` to `on_zero_grad`; with `save_refusal`, make
    `model.save_pretrained` raise RuntimeError with that message."""

    def zero_grad(m, set_to_none: bool = True):
        on_zero_grad(set_to_none)

    model.zero_grad = types.MethodType(zero_grad, model)
    if save_refusal is not None and hasattr(model, "save_pretrained"):

        def save_pretrained(m, *args, **kwargs):
            raise RuntimeError(save_refusal)

        model.save_pretrained = types.MethodType(save_pretrained, model)
