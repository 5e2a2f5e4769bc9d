"""Engine configuration.

`ZeroConfig` is the one object that says how the engine shards and computes. It validates
itself on construction, so a bad value fails at `ZeroConfig(...)` or `from_file(...)`, naming the
field, the value and what is allowed, before any process group or model is touched. It is frozen:
assigning a field raises (it would skip that validation); `dataclasses.replace(config, ...)`
builds a changed copy, validated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ZeroConfig", "MIXED_PRECISION_CHOICES", "STAGES"]

STAGES = (0, 1, 2, 3)
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
TIMEOUT_RANGE_S = (1.0, 7 * 24 * 3600.0)
"""The collective timeouts accepted, in seconds: from 1 s to 7 days."""


@dataclass(kw_only=True, frozen=True)
class ZeroConfig:
    """How the ZeRO engine partitions model states and computes.

    Stages: 0 = replicated (DDP semantics), 1 = shard optimizer state and fp32 master weights,
    2 = also shard gradients, 3 = also shard parameters (`plan.StagePlan` has the details).
    """

    stage: int = 2
    """ZeRO stage: 0, 1, 2 or 3."""

    mixed_precision: str = "no"
    """Compute precision: "no" (fp32), "bf16" or "fp16". An fp32 master shard is always kept."""

    bucket_size: int = 2**23
    """Stages 0-2: consecutive units of one param group are packed into one flat gradient bucket
    until it holds this many elements. A unit is never split, so a unit larger than this is a
    bucket of its own. Stage 3 always uses one flat buffer per unit and param group."""

    unit_modules: list[str] | None = None
    """Class names of the modules that form units (stage 3 gathers one unit at a time). Default:
    the model's `_no_split_modules` (GPT2Block, BertLayer, ...). The rest is the root unit."""

    gradient_clipping: float | None = None
    """Clip gradients to this global L2 norm in `step()`. None: no clipping (the norm is still
    computed and reported as `engine.grad_norm`)."""

    prefetch: bool = True
    """Stage 3: start the all-gather of the next unit while the current one computes."""

    overlap_param_gather: bool = False
    """Stages 1-2, opt-in: `step()` starts the all-gather of the updated parameters and returns;
    the next forward waits for each unit's parameters in the unit's forward pre-hook (the root
    unit's at the start of the model's forward), so the gathers of later units run while
    earlier ones compute, as stage 3's prefetch does. Until then the parameters of a unit whose
    gather has not landed hold the previous step's values. The engine's own readers wait first
    (`state_dict()` of any module of the model, checkpoints, `export`, `full_state_dict`, the
    next `step()` and `backward()`); code that reads parameters between `step()` and the next
    forward some other way (an EMA of `param.data`, a weight logger) calls
    `engine.wait_for_params()` first. False (default): `step()` returns with every parameter
    updated."""

    max_inflight_reductions: int = 2
    """Stages 2-3: how many gradient buckets may be in flight before the oldest is waited for.
    Bounds the transient full-gradient memory while keeping communication overlapped. At stage 3
    the bound is soft (finished buckets are freed as soon as they are seen complete, but backward
    never blocks on one), because blocking could deadlock against another rank's all-gather."""

    keep_grad_shards: bool | None = None
    """Stages 2-3: whether each rank's gradient shard (1/N of the gradients, as the ZeRO formula
    counts them) stays allocated from one step to the next. `zero_grad()` then marks it empty
    and the next backward writes it without a zeroing pass. False: `zero_grad()` (set_to_none)
    frees it, so forward holds no gradient memory, and every step allocates it afresh; on
    CPU, writing fresh pages every step costs time (README, Performance). None (default): kept
    at stage 2, freed at stage 3, the stage that exists to hold the least."""

    collective_timeout_s: float = 600.0
    """Seconds any collective of the engine may wait for the other ranks (1 to 604800, 7 days).
    A rank that died or stopped (hung, stuck in I/O) makes the others fail after this long, with
    a CollectiveError naming the collective and the phase, instead of hanging for torch's
    default 30 minutes."""

    nonfinite_grads: str = "raise"
    """Without a loss scaler (fp32, bf16), what a NaN/inf gradient norm on any rank does:
    "raise" (every rank raises FloatingPointError naming the step) or "skip" (every rank skips
    the step with a warning). fp16 always skips and backs off its loss scale."""

    initial_loss_scale: float = 2.0**16
    """fp16: the dynamic loss scaler's starting scale (finite, > 0)."""

    loss_scale_growth_interval: int = 2000
    """fp16: steps without overflow before the scale grows by `loss_scale_growth_factor`."""

    loss_scale_growth_factor: float = 2.0
    """fp16: factor the scale grows by after `loss_scale_growth_interval` good steps."""

    loss_scale_backoff_factor: float = 0.5
    """fp16: factor the scale is multiplied by when a step overflows (and is skipped)."""

    sparse_embedding_grads: bool = True
    """Reduce the gradient of a lookup-only `nn.Embedding` as the rows some rank touched,
    every stage. Exact: every other row's gradient is zero on every rank (checked each
    reduction). An embedding tied to an output layer (GPT-2's wte) stays dense. Each reduction
    falls back to dense when the touched rows would cost more; `engine.wire_stats()` counts both.
    The optimizer still updates every row."""

    comm_quantization: dict | None = None
    """Opt-in, lossy: blockwise int8 on the wire, e.g. {"params": "int8", "grads": "int8",
    "block_size": 256}. "params": the stage-3 parameter all-gather; "grads": the gradient
    reduce-scatter of stages 2-3 (each rank's contribution quantized once and summed in fp32 by
    its owner). block_size: elements per fp32 scale (8 to 1048576, default 256). fp32 master
    weights, optimizer state and checkpoints are never quantized. None (default): exact."""

    def __post_init__(self) -> None:
        if type(self.stage) is not int or self.stage not in STAGES:
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if (
            not isinstance(self.mixed_precision, str)
            or self.mixed_precision not in MIXED_PRECISION_CHOICES
        ):
            hint = (
                ' (YAML reads an unquoted no as false: write "no")'
                if self.mixed_precision is False
                else ""
            )
            raise ValueError(
                "mixed_precision must be one of "
                f"{', '.join(repr(c) for c in MIXED_PRECISION_CHOICES)}, "
                f"got {self.mixed_precision!r}{hint}"
            )
        lo, hi = TIMEOUT_RANGE_S
        if not (_is_number(self.collective_timeout_s) and lo <= self.collective_timeout_s <= hi):
            raise ValueError(
                f"collective_timeout_s must be a number of seconds from {lo:g} to {hi:g} "
                f"(7 days), got {self.collective_timeout_s!r}"
            )
        if self.nonfinite_grads not in ("raise", "skip"):
            raise ValueError(
                f"nonfinite_grads must be 'raise' or 'skip', got {self.nonfinite_grads!r}"
            )
        _require_positive_int("bucket_size", self.bucket_size, "elements per gradient bucket")
        _require_positive_int("max_inflight_reductions", self.max_inflight_reductions, "buckets")
        _require_positive_int(
            "loss_scale_growth_interval", self.loss_scale_growth_interval, "steps"
        )
        if self.unit_modules is not None:
            if not isinstance(self.unit_modules, (list, tuple)) or not all(
                isinstance(n, str) and n for n in self.unit_modules
            ):
                raise ValueError(
                    "unit_modules must be a list of module class names such as ['GPT2Block'], "
                    f"got {self.unit_modules!r}"
                )
            object.__setattr__(self, "unit_modules", list(self.unit_modules))
        if self.gradient_clipping is not None and not (
            _is_number(self.gradient_clipping) and self.gradient_clipping > 0
        ):
            raise ValueError(
                "gradient_clipping must be a positive max global grad norm or None, "
                f"got {self.gradient_clipping!r}"
            )
        if not (
            _is_number(self.initial_loss_scale)
            and math.isfinite(self.initial_loss_scale)
            and self.initial_loss_scale > 0
        ):
            raise ValueError(
                f"initial_loss_scale must be finite and > 0, got {self.initial_loss_scale!r}"
            )
        if not (_is_number(self.loss_scale_growth_factor) and self.loss_scale_growth_factor > 1):
            raise ValueError(
                f"loss_scale_growth_factor must be > 1, got {self.loss_scale_growth_factor!r}"
            )
        if not (
            _is_number(self.loss_scale_backoff_factor) and 0 < self.loss_scale_backoff_factor < 1
        ):
            raise ValueError(
                "loss_scale_backoff_factor must be in (0, 1), "
                f"got {self.loss_scale_backoff_factor!r}"
            )
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"prefetch must be true or false, got {self.prefetch!r}")
        if not isinstance(self.overlap_param_gather, bool):
            raise ValueError(
                f"overlap_param_gather must be true or false, got {self.overlap_param_gather!r}"
            )
        if self.overlap_param_gather and self.stage not in (1, 2):
            raise ValueError(
                f"overlap_param_gather applies to stages 1 and 2, got stage={self.stage}: "
                + (
                    "stage 0 gathers nothing after the step"
                    if self.stage == 0
                    else "stage 3 gathers each unit before its forward already (prefetch)"
                )
                + "; leave it false"
            )
        if not isinstance(self.sparse_embedding_grads, bool):
            raise ValueError(
                f"sparse_embedding_grads must be true or false, got {self.sparse_embedding_grads!r}"
            )
        if self.comm_quantization is not None:
            object.__setattr__(
                self, "comm_quantization", _check_quantization(self.comm_quantization, self.stage)
            )
        if self.keep_grad_shards is not None and not isinstance(self.keep_grad_shards, bool):
            raise ValueError(
                "keep_grad_shards must be true, false or null (kept at stage 2, freed at "
                f"stage 3), got {self.keep_grad_shards!r}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ZeroConfig:
        """Build a config from a mapping, rejecting unknown keys by name."""
        if not isinstance(data, dict):
            raise ValueError(
                f"{source} must be a mapping of field: value, got {type(data).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            raise ValueError(
                f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in "
                f"{source}; allowed keys are: {', '.join(known)}"
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ZeroConfig:
        """Load a config from a YAML (.yaml/.yml) or JSON (.json) file.

        The file holds the fields at top level, or under a `zero:` key (so one file can also
        carry other tools' settings).

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: unknown extension, unparsable content, unknown keys or bad values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ZeRO config file {str(path)!r} does not exist")
        text = path.read_text()
        suffix = path.suffix.lower()
        if suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"cannot parse YAML config {str(path)!r}: {e}") from None
        elif suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"cannot parse JSON config {str(path)!r}: {e}") from None
        else:
            raise ValueError(
                f"ZeRO config file {str(path)!r} must end in .yaml, .yml or .json, got {suffix!r}"
            )
        if data is None:
            data = {}
        if isinstance(data, dict) and "zero" in data:
            data = data["zero"]
        return cls.from_dict(data, source=f"config file {str(path)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _refuse_assignment(self: ZeroConfig, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(
        f"ZeroConfig is frozen: cannot assign {name}={value!r} (it would skip validation); "
        f"build a changed copy with dataclasses.replace(config, {name}={value!r})"
    )


def _refuse_deletion(self: ZeroConfig, name: str) -> None:
    raise dataclasses.FrozenInstanceError(f"ZeroConfig is frozen: cannot delete {name!r}")


# The dataclass's own frozen __setattr__ says only "cannot assign to field"; this one names the
# fix. (Its __init__ sets fields with object.__setattr__, so construction is unaffected.)
ZeroConfig.__setattr__ = _refuse_assignment
ZeroConfig.__delattr__ = _refuse_deletion


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_positive_int(field: str, value: Any, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive integer ({unit}), got {value!r}")


QUANT_KEYS = ("params", "grads", "block_size")
QUANT_FORMATS = (None, "int8")
QUANT_BLOCK_RANGE = (8, 2**20)


def _check_quantization(value: Any, stage: int) -> dict:
    """comm_quantization, completed with its defaults; refused by name when it cannot apply."""
    example = '{"params": "int8", "grads": "int8", "block_size": 256}'
    if not isinstance(value, dict):
        raise ValueError(
            f"comm_quantization must be null or a mapping such as {example}, got {value!r}"
        )
    unknown = sorted(str(k) for k in value if k not in QUANT_KEYS)
    if unknown:
        raise ValueError(
            f"unknown comm_quantization key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; allowed keys are: {', '.join(QUANT_KEYS)}"
        )
    out = {"params": value.get("params"), "grads": value.get("grads")}
    for key in ("params", "grads"):
        if out[key] not in QUANT_FORMATS:
            raise ValueError(
                f"comm_quantization {key} must be 'int8' or null (exact), got {out[key]!r}"
            )
    block = value.get("block_size", 256)
    lo, hi = QUANT_BLOCK_RANGE
    if isinstance(block, bool) or not isinstance(block, int) or not lo <= block <= hi:
        raise ValueError(
            f"comm_quantization block_size must be an integer from {lo} to {hi} (elements per "
            f"fp32 scale), got {block!r}"
        )
    out["block_size"] = block
    if out["params"] is None and out["grads"] is None:
        raise ValueError(
            "comm_quantization quantizes nothing (params and grads are both null); set one of "
            "them to 'int8', or set comm_quantization to null"
        )
    if out["params"] is not None and stage != 3:
        raise ValueError(
            f"comm_quantization params={out['params']!r} quantizes the stage-3 parameter "
            f"all-gather, and stage {stage} has none: use stage 3, or set params to null"
        )
    if out["grads"] is not None and stage < 2:
        raise ValueError(
            f"comm_quantization grads={out['grads']!r} quantizes the gradient reduce-scatter of "
            f"stages 2 and 3, and stage {stage} has none: use stage 2 or 3, or set grads to null"
        )
    return out
