"""Model-state memory per rank by stage: the ZeRO paper's accounting.

Pure arithmetic over the stage plan (`plan.StagePlan`): a kind of model state that the stage
shards is divided by the world size. The engine's `memory_stats()` measures the bytes it
actually holds; the tests check that the two agree, padding aside.

Frozen parameters (`requires_grad=False`, e.g. a base model under LoRA adapters) are parameter
bytes only: no gradient, no optimizer state. Their compute copy is whole at stages 0-2 and 1/N
at stage 3; with mixed precision their fp32 value (what an export writes, bit-exact) is kept
with the masters, 1/N where the optimizer is sharded. For Ψ trainable and Φ frozen parameters,
c the compute bytes (4, or 2 with bf16/fp16), m the master bytes (0 in fp32, else 4) and K the
optimizer state bytes (AdamW 8):
    params = (Ψ + Φ)·c / Dp,   grads = Ψ·c / Dg,   optim = Ψ·(m + K) / Do + Φ·m / Do
with Dp, Dg, Do = N where the stage shards that kind, else 1.
"""

from __future__ import annotations

import torch

from .config import MIXED_PRECISION_CHOICES
from .plan import StagePlan

__all__ = ["model_state_bytes", "optimizer_state_bytes"]

# fp32 bytes of optimizer state per parameter element, by class (the tensors torch keeps).
_STATE_BYTES = {
    torch.optim.Adam: 8,
    torch.optim.AdamW: 8,
    torch.optim.NAdam: 8,
    torch.optim.RAdam: 8,
    torch.optim.Adamax: 8,
    torch.optim.Adadelta: 8,
    torch.optim.Rprop: 8,
    torch.optim.Adagrad: 4,
    torch.optim.ASGD: 4,
}


def model_state_bytes(
    numel: int,
    *,
    world_size: int,
    stage: int,
    mixed_precision: str = "no",
    optimizer_state_bytes: int = 8,
    frozen: int = 0,
) -> dict[str, float]:
    """Bytes of model states one rank holds for `numel` trainable and `frozen` frozen parameters.

    Args:
        numel: Ψ, the number of distinct trainable parameters.
        world_size: N, the number of data-parallel ranks.
        stage: ZeRO stage 0-3.
        mixed_precision: "no", "bf16" or "fp16". Mixed precision keeps 2-byte params and grads
            plus a 4-byte fp32 master, counted with the optimizer state.
        optimizer_state_bytes: optimizer state per parameter (AdamW: 8, SGD with momentum: 4).
        frozen: Φ, the number of distinct frozen parameters (parameter bytes only, plus their
            fp32 value with mixed precision).

    Returns:
        {"param_bytes", "grad_bytes", "optim_bytes", "total_bytes"}.

    Raises:
        ValueError: a stage, precision or world size out of range.
    """
    plan = StagePlan.for_stage(stage)
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
            f"got {mixed_precision!r}"
        )
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if numel < 0 or frozen < 0:
        raise ValueError(f"parameter counts must be >= 0, got {numel} trainable, {frozen} frozen")
    low = 4 if mixed_precision == "no" else 2
    master = 0 if mixed_precision == "no" else 4
    div = plan.model_state_divisors(world_size)
    param = (numel + frozen) * low / div["params"]
    grad = numel * low / div["grads"]
    optim = (numel * (master + optimizer_state_bytes) + frozen * master) / div["optim"]
    return {
        "param_bytes": param,
        "grad_bytes": grad,
        "optim_bytes": optim,
        "total_bytes": param + grad + optim,
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """fp32 bytes of state per parameter element that `optimizer` keeps once it has stepped
    (AdamW: 8; SGD: 4 with momentum, else 0; RMSprop: 4, plus 4 each for momentum and centered),
    read off its class and its first param group's hyperparameters."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    if isinstance(optimizer, torch.optim.SGD):
        return 4 if group.get("momentum", 0) else 0
    if isinstance(optimizer, torch.optim.RMSprop):
        return 4 + 4 * bool(group.get("momentum", 0)) + 4 * bool(group.get("centered", False))
    for cls, nbytes in _STATE_BYTES.items():
        if type(optimizer) is cls:
            return nbytes
    return 8
