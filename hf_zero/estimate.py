"""Model-state memory per rank by stage: the ZeRO paper's accounting (DESIGN.md §1).

Pure arithmetic. The engine's `memory_stats()` measures the bytes it actually holds; the tests
check that the two agree, padding aside.
"""

from __future__ import annotations

from .config import MIXED_PRECISION_CHOICES, STAGES

__all__ = ["model_state_bytes"]


def model_state_bytes(
    numel: int,
    *,
    world_size: int,
    stage: int,
    mixed_precision: str = "no",
    optimizer_state_bytes: int = 8,
) -> dict[str, float]:
    """Bytes of model states one rank holds for `numel` trainable parameters.

    Args:
        numel: Ψ, the number of distinct trainable parameters.
        world_size: N, the number of data-parallel ranks.
        stage: ZeRO stage 0-3.
        mixed_precision: "no", "bf16" or "fp16". Mixed precision keeps 2-byte params and grads
            plus a 4-byte fp32 master, counted with the optimizer state.
        optimizer_state_bytes: optimizer state per parameter (AdamW: 8, SGD with momentum: 4).

    Returns:
        {"param_bytes", "grad_bytes", "optim_bytes", "total_bytes"}.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
            f"got {mixed_precision!r}"
        )
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    low = 4 if mixed_precision == "no" else 2
    master = 0 if mixed_precision == "no" else 4
    n = world_size
    param = numel * low / (n if stage >= 3 else 1)
    grad = numel * low / (n if stage >= 2 else 1)
    optim = numel * (master + optimizer_state_bytes) / (n if stage >= 1 else 1)
    return {
        "param_bytes": param,
        "grad_bytes": grad,
        "optim_bytes": optim,
        "total_bytes": param + grad + optim,
    }
