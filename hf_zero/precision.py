"""Precision policy and the dynamic loss scaler.

Compute runs in `compute_dtype` (fp32, bf16 or fp16): the model's parameters and gradients are
held in it. The optimizer always steps fp32 master shards. fp16 multiplies the loss by a dynamic
scale before backward; the engine unscales the fp32 master gradients, and if any rank saw an inf
or NaN, every rank skips the step and the scale backs off.

Steps skipped one after another mean gradients that are not finite at any scale (a NaN/inf loss
or input, a diverging run): after `WARN_AFTER_SKIPS` of them in a row, and again each time that
count doubles, the engine warns with the scale; a back-off that would take the scale below
`MIN_LOSS_SCALE` raises instead, before the scale could reach zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "compute_dtype_for",
    "loss_scaler_for",
    "LossScaler",
    "DynamicLossScaler",
    "NoLossScaler",
    "MIN_LOSS_SCALE",
    "WARN_AFTER_SKIPS",
]

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

MIN_LOSS_SCALE = 2.0**-24
"""The smallest positive fp16 number: a loss scaled by less is zero in fp16."""

WARN_AFTER_SKIPS = 5
"""Skipped steps in a row after which the engine warns (and again at 10, 20, 40, ...)."""


def compute_dtype_for(mixed_precision: str) -> torch.dtype:
    return _DTYPES[mixed_precision]


def loss_scaler_for(config) -> LossScaler:
    """A ZeroConfig's loss scaler: dynamic for fp16, none otherwise."""
    if config.mixed_precision != "fp16":
        return NoLossScaler()
    return DynamicLossScaler(
        scale=config.initial_loss_scale,
        growth_interval=config.loss_scale_growth_interval,
        growth_factor=config.loss_scale_growth_factor,
        backoff_factor=config.loss_scale_backoff_factor,
    )


class LossScaler:
    """Interface: `scale` multiplies the loss; `update(overflow)` runs once per optimizer step."""

    scale: float = 1.0
    dynamic: bool = False

    def update(self, overflow: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class NoLossScaler(LossScaler):
    """fp32 and bf16: scale 1, never checks for overflow."""


@dataclass
class DynamicLossScaler(LossScaler):
    """fp16 loss scaling: back off on overflow, grow after `growth_interval` clean steps."""

    scale: float = 2.0**16
    growth_interval: int = 2000
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    good_steps: int = 0
    skipped_in_a_row: int = 0
    dynamic: bool = True

    def update(self, overflow: bool) -> None:
        """Raises:
        FloatingPointError: an overflow would back the scale off below MIN_LOSS_SCALE."""
        if overflow:
            self.skipped_in_a_row += 1
            self.good_steps = 0
            backed_off = self.scale * self.backoff_factor
            if backed_off < MIN_LOSS_SCALE:
                raise FloatingPointError(
                    f"fp16 loss scale {self.scale:g} cannot back off further: "
                    f"{self.skipped_in_a_row} optimizer steps in a row had non-finite gradients, "
                    f"and below {MIN_LOSS_SCALE:g} the scaled loss is zero in fp16, so training "
                    "stopped. Gradients that overflow at every scale come from a NaN/inf loss or "
                    "input, or a diverging run: check the loss and the data, lower the learning "
                    "rate, or use ZeroConfig(mixed_precision='bf16')"
                )
            self.scale = backed_off
            return
        self.skipped_in_a_row = 0
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def should_warn(self) -> bool:
        """Whether the last update made `skipped_in_a_row` 5, 10, 20, 40, ..."""
        k, n = self.skipped_in_a_row, WARN_AFTER_SKIPS
        return k >= n and k % n == 0 and ((k // n) & (k // n - 1)) == 0

    def skip_warning(self) -> str:
        return (
            f"hf_zero: {self.skipped_in_a_row} optimizer steps in a row were skipped for "
            f"non-finite fp16 gradients; the loss scale is now {self.scale:g}. Gradients that "
            "overflow at every scale come from a NaN/inf loss or input, or a diverging run: check "
            "the loss and the data, lower the learning rate, or use "
            "ZeroConfig(mixed_precision='bf16')"
        )

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped_in_a_row = 0
