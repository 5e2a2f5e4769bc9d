"""Precision policy and the dynamic loss scaler (DESIGN.md §4).

Compute runs in `compute_dtype` (fp32, bf16 or fp16): the model's parameters and gradients are
held in it. The optimizer always steps fp32 master shards. fp16 multiplies the loss by a dynamic
scale before backward; the engine unscales the fp32 master gradients, and if any rank saw an inf
or NaN, every rank skips the step and the scale backs off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["compute_dtype_for", "LossScaler", "DynamicLossScaler", "NoLossScaler"]

_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype_for(mixed_precision: str) -> torch.dtype:
    return _DTYPES[mixed_precision]


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
    dynamic: bool = True

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
