"""Whether a checkpoint fits the engine loading it: the same model, and an optimizer whose
state and hyperparameters mean the same thing here as they did when it was saved.

- The model: the same parameter names and shapes (any world size, stage or unit grouping).
- The optimizer (skipped by a weights-only load): the same class, and every parameter in the
  same param group, trainable or frozen as it was. Param groups given in another order would
  apply each group's hyperparameters and state to the other group's parameters (weight decay on
  norms and biases), and a parameter that changed trainability has no optimizer state, or state
  that belongs to nothing: torch's `load_state_dict` refuses both, and so does this, naming the
  parameters and the way out (`weights_only=True`).
- Each saved hyperparameter must be able to replace this optimizer's value (a number for a
  number, a list as long as the tuple, ...), and a dynamic loss scaler's state must be a
  finite positive scale and a non-negative count.

Every check raises CheckpointError before anything is changed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..optimizer import IMPLEMENTATION_KEYS
from ..partition import FROZEN
from .errors import CheckpointError, show
from .format import Manifest
from .state import RankState

__all__ = [
    "check_same_model",
    "check_optimizer",
    "check_param_groups",
    "check_loss_scaler",
    "restored",
]

_NAMED = 4  # parameters named in a message


def _more(items: list, shown: int = _NAMED) -> str:
    return f" and {len(items) - shown} more" if len(items) > shown else ""


def check_same_model(state: RankState, manifest: Manifest, where: str) -> None:
    """The checkpoint holds this model: the same parameter names and shapes."""
    have = {p.name: tuple(p.shape) for fu in manifest.layout.flat_units for p in fu.params}
    want = {p.name: tuple(p.shape) for fu in state.layout.flat_units for p in fu.params}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"{where} holds another model: parameters missing from it {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, parameters this model does not have {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}"
        )
    for name, shape in want.items():
        if have[name] != shape:
            raise CheckpointError(
                f"{where} holds another model: {name!r} has shape {have[name]} there, {shape} here"
            )


def _group(g: int) -> str:
    return "frozen" if g == FROZEN else f"param group {g}"


def check_optimizer(state: RankState, manifest: Manifest, where: str) -> None:
    """The same optimizer class, and every parameter in the same param group (or frozen) as
    when the checkpoint was saved."""
    want_cls = f"{type(state.optimizer).__module__}.{type(state.optimizer).__qualname__}"
    if manifest.optimizer.cls != want_cls:
        raise CheckpointError(
            f"{where} was saved with optimizer {manifest.optimizer.cls}, this engine uses "
            f"{want_cls}; load the weights alone with load_checkpoint(path, weights_only=True)"
        )
    saved = {p.name: fu.group for fu in manifest.layout.flat_units for p in fu.params}
    moved = [
        (p.name, saved[p.name], fu.group)
        for fu in state.layout.flat_units
        for p in fu.params
        if saved[p.name] != fu.group
    ]
    if moved:
        trainability = [m for m in moved if (m[1] == FROZEN) != (m[2] == FROZEN)]
        kind = (
            "changed trainability (requires_grad) or param group"
            if trainability
            else "are in another param group"
        )
        named = "; ".join(
            f"{n!r}: {_group(there)} in the checkpoint, {_group(here)} here"
            for n, there, here in moved[:_NAMED]
        )
        raise CheckpointError(
            f"{where}: {len(moved)} parameters {kind} since the checkpoint was saved: {named}"
            f"{_more(moved)}. Resuming would apply optimizer state and hyperparameters to the "
            "wrong parameters. Build the optimizer with the param groups of the save (the same "
            "groups in the same order, the same parameters trainable), or load the weights "
            "alone with load_checkpoint(path, weights_only=True), which keeps this engine's "
            "optimizer state (fresh in a new engine)"
        )
    if len(manifest.optimizer.param_groups) != len(state.optimizer.param_groups):
        raise CheckpointError(
            f"{where} has {len(manifest.optimizer.param_groups)} optimizer param groups, "
            f"this optimizer has {len(state.optimizer.param_groups)}; build the optimizer with "
            "the param groups of the save, or load with weights_only=True"
        )


def _fits(current: Any, saved: Any) -> bool:
    """Whether a hyperparameter saved in the manifest can replace this optimizer's value."""
    if isinstance(current, bool):
        return isinstance(saved, bool)
    if isinstance(current, int | float | torch.Tensor):
        return isinstance(saved, int | float) and not isinstance(saved, bool)
    if isinstance(current, tuple | list):
        return (
            isinstance(saved, list)
            and len(saved) == len(current)
            and all(_fits(c, s) for c, s in zip(current, saved))
        )
    if isinstance(current, str):
        return isinstance(saved, str)
    if isinstance(current, dict):
        return isinstance(saved, dict)
    return current is None and not isinstance(saved, list | dict)  # foreach, fused: None or a flag


def restored(g: dict, key: str) -> bool:
    """Whether a saved hyperparameter `key` replaces this param group's on load: the ones the
    group has, except its params and the kernel choice, which stays the loading engine's."""
    return key in g and key != "params" and key not in IMPLEMENTATION_KEYS


def check_param_groups(opt: torch.optim.Optimizer, saved_groups: list, where: str) -> None:
    for i, (g, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        for k, v in saved.items():
            if restored(g, k) and not _fits(g[k], v):
                raise CheckpointError(
                    f"{where}: optimizer param group {i} has {k}={show(v)}, which cannot "
                    f"replace this optimizer's {k}={show(g[k])}"
                )


def check_loss_scaler(state: RankState, manifest: Manifest, where: str) -> dict:
    """The loss scaler state the engine should take: a dynamic loss scaler's saved state,
    checked, or, when the checkpoint was saved without one, the engine's own."""
    if not state.dynamic_loss_scale:
        return dict(manifest.loss_scaler)
    saved = manifest.loss_scaler
    if not saved:
        return dict(state.counters.loss_scaler)
    scale, good = saved.get("scale"), saved.get("good_steps")
    if not (
        isinstance(scale, int | float)
        and not isinstance(scale, bool)
        and math.isfinite(scale)
        and scale > 0
        and type(good) is int
        and good >= 0
    ):
        raise CheckpointError(f"{where}: bad loss_scaler state {show(saved)}")
    return dict(saved)
