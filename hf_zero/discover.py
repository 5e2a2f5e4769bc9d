"""What a model holds: its units, its distinct parameters, their aliases and param groups.

This is where the engine reads the user's model and optimizer, once, at `initialize`. It turns
them into the plain `ParamEntry` list that `partition.plan_layout` places, and checks everything
a user can get wrong about the pair before any buffer is allocated.

Rules:
- A unit is a module whose class name is in `unit_modules` (default: `model._no_split_modules`)
  and that is not inside another unit. Everything else belongs to the root unit.
- A parameter reachable under several names (tied weights) is one parameter; its first name in
  registration order is its name, the rest are aliases. If its names fall in different units it
  belongs to the root unit, which is gathered for the whole forward and backward of stage 3.
- Trainable parameters (requires_grad) must each be in exactly one optimizer param group; frozen
  ones form the FROZEN group and get no gradient, master update or optimizer state.
- The flat buffers hold fp32 values (the masters), which represent fp32, bf16 and fp16 exactly.
  A frozen parameter of any other dtype (float64, integers, bool, complex) is kept whole, out of
  the layout, on every rank, like a buffer, so its value stays bit-exact. A trainable one of
  such a dtype is refused: it would be trained at fp32 precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .partition import FROZEN, ROOT_UNIT, ParamEntry

__all__ = ["FLAT_DTYPES", "ModelParams", "discover_params"]

FLAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Parameter dtypes whose values the fp32 flat buffers hold exactly."""


@dataclass
class ModelParams:
    entries: list[ParamEntry]
    params: dict[str, nn.Parameter]
    """Primary name -> the parameter object."""
    unit_modules: dict[str, nn.Module]
    """Unit name -> module; the root unit ("") is the model itself."""
    device: torch.device
    whole: dict[str, nn.Parameter]
    """Primary name -> frozen parameter kept whole (a dtype outside FLAT_DTYPES)."""


def _unit_modules(
    model: nn.Module, unit_classes: list[str], explicit: bool
) -> dict[str, nn.Module]:
    units: dict[str, nn.Module] = {ROOT_UNIT: model}
    wanted = set(unit_classes)
    found: set[str] = set()
    for name, module in model.named_modules():
        if not name or type(module).__name__ not in wanted:
            continue
        found.add(type(module).__name__)
        if any(name.startswith(u + ".") for u in units if u):
            continue  # nested in a unit already
        units[name] = module
    missing = sorted(wanted - found)
    if explicit and missing:
        classes = sorted({type(m).__name__ for _, m in model.named_modules()})
        raise ValueError(
            f"unit_modules names {missing} but {type(model).__name__} has no module of that class; "
            f"its module classes are: {', '.join(classes)}"
        )
    return units


def _unit_of(name: str, unit_names: list[str]) -> str:
    for u in unit_names:
        if u and name.startswith(u + "."):
            return u
    return ROOT_UNIT


def discover_params(
    model: nn.Module, optimizer: torch.optim.Optimizer, unit_modules: list[str] | None
) -> ModelParams:
    """Read units, distinct parameters, aliases and groups off `model` and `optimizer`.

    Raises:
        ValueError: the optimizer holds no trainable parameter of the model, holds a tensor that
            is not a parameter of the model, misses a trainable parameter, a trainable parameter
            is not fp32, bf16 or fp16, or the model's parameters are on several devices.
    """
    explicit = unit_modules is not None
    classes = (
        list(unit_modules) if explicit else list(getattr(model, "_no_split_modules", None) or [])
    )
    units = _unit_modules(model, classes, explicit)
    unit_names = [u for u in units if u]

    names_of: dict[int, list[str]] = {}
    param_of: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        param_of[id(p)] = p

    group_of: dict[int, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in param_of:
                raise ValueError(
                    f"optimizer param group {gi} holds a tensor of shape {tuple(p.shape)} that is "
                    f"not a parameter of {type(model).__name__}; build the optimizer from "
                    "model.parameters() (or named groups of them)"
                )
            group_of[id(p)] = gi

    trainable = [pid for pid, p in param_of.items() if p.requires_grad]
    if not any(pid in group_of for pid in trainable):
        n_opt = sum(len(g["params"]) for g in optimizer.param_groups)
        raise ValueError(
            f"the optimizer has no trainable parameters of the model ({n_opt} tensors in "
            f"{len(optimizer.param_groups)} param groups, none of them a parameter with "
            "requires_grad=True); pass an optimizer built over the parameters to train"
        )
    for pid in trainable:
        if pid not in group_of:
            raise ValueError(
                f"parameter {names_of[pid][0]!r} requires grad but is in no optimizer param group; "
                "add it to the optimizer or freeze it with requires_grad_(False)"
            )
        dtype = param_of[pid].dtype
        if dtype not in FLAT_DTYPES:
            name, short = names_of[pid][0], str(dtype).removeprefix("torch.")
            raise ValueError(
                f"parameter {name!r} is {short} and requires grad: hf_zero trains fp32 master "
                "weights (bf16/fp16 compute with ZeroConfig.mixed_precision), which would round "
                "it. Cast the model before initialize (model.float() or model.to(torch.float32)), "
                f"or freeze it ({name}.requires_grad_(False)) to keep it whole, bit-exact, in "
                f"{short}"
            )

    devices = {p.device for p in param_of.values()}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are on several devices {sorted(map(str, devices))}; move the "
            "model to one device (model.to(device)) before initialize"
        )

    entries, params, whole = [], {}, {}
    for pid, names in names_of.items():
        p = param_of[pid]
        if p.dtype not in FLAT_DTYPES:  # frozen: checked above for the trainable ones
            whole[names[0]] = p
            continue
        owners = {_unit_of(n, unit_names) for n in names}
        unit = owners.pop() if len(owners) == 1 else ROOT_UNIT
        group = group_of[pid] if p.requires_grad and pid in group_of else FROZEN
        entries.append(ParamEntry(names[0], tuple(p.shape), unit, group, tuple(names[1:])))
        params[names[0]] = p
    device = devices.pop() if devices else torch.device("cpu")
    return ModelParams(entries, params, units, device, whole)
