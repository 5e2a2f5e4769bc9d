"""The stage table as data: what each ZeRO stage shards, when it communicates, and how.

A `StagePlan` is derived from the stage (and, through `from_config`, from the few config fields
that refine it). Pure: no tensors, no process group. The engine composes its pieces from the
plan's named properties and never compares stage numbers; the memory estimate reads the same
plan, so the formula and the engine cannot disagree about what is sharded.

- stage 0 shards nothing; every micro-step, bucketed all-reduces run in backward; the
  parameters are never gathered;
- stage 1 shards the optimizer state and the fp32 master weights; the accumulated full
  gradients are reduce-scattered once per step, bucket by bucket in the backward of the
  accumulation boundary (overlapped with it); the updated shards are gathered after it;
- stage 2 also shards the gradients: every micro-step, bucketed reduce-scatters run in
  backward, each full gradient freed once sent; gathered after the step, as stage 1;
- stage 3 also shards the parameters: reductions as stage 2 (polled, never blocked on); each
  unit gathered around its forward and backward, the next one prefetched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import STAGES

__all__ = ["GradReduction", "ParamGather", "StagePlan"]


class GradReduction(enum.Enum):
    """When and how gradients are communicated."""

    ALL_REDUCE_IN_BACKWARD = "every micro-step, bucketed all-reduce overlapped with backward"
    REDUCE_SCATTER_AT_STEP = (
        "once per optimizer step, at the accumulation boundary: reduce-scatter of the locally "
        "accumulated full grads"
    )
    REDUCE_SCATTER_IN_BACKWARD = (
        "every micro-step, bucketed reduce-scatter overlapped with backward; the full grad of a "
        "bucket is freed as soon as it is reduced"
    )


class ParamGather(enum.Enum):
    """When the full parameters are all-gathered from their shards."""

    NEVER = "never"
    AFTER_STEP = "after step (updated shard -> full params)"
    AROUND_USE = "before each unit's forward and backward, freed after; prefetch next unit"


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """What one ZeRO stage does, as named properties.

    Build it with `StagePlan.for_stage(stage)` or `StagePlan.from_config(config)`.
    """

    stage: int
    shards_optimizer: bool
    """Optimizer state and fp32 master weights are split across ranks (else whole on each)."""
    shards_grads: bool
    """Each rank keeps only its gradient shard (else full local gradients in flat buffers)."""
    shards_params: bool
    """Each rank keeps only its parameter shard; units are gathered around their use."""
    grad_reduction: GradReduction
    param_gather: ParamGather
    bucket_size: int | None = None
    """Elements per gradient bucket (consecutive units packed); None: one flat buffer per unit
    and param group, as the parameter gathers need."""
    keep_grad_shards: bool = False
    """Whether a rank's gradient shard stays allocated from one step to the next."""
    prefetch: bool = False
    """Whether the next unit's gather starts while the current unit computes."""
    defer_param_gather: bool = False
    """Whether the after-step gather is left in flight for the next forward to wait on, unit by
    unit (`ZeroConfig.overlap_param_gather`)."""

    @classmethod
    def for_stage(
        cls,
        stage: int,
        *,
        bucket_size: int = 2**23,
        keep_grad_shards: bool | None = None,
        prefetch: bool = True,
        overlap_param_gather: bool = False,
    ) -> StagePlan:
        """The plan of `stage`. `keep_grad_shards=None` keeps them at stage 2 and frees them at
        stage 3 (the stage that exists to hold the least).

        Raises:
            ValueError: stage not 0, 1, 2 or 3.
        """
        if type(stage) is not int or stage not in STAGES:
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
        shards_grads, shards_params = stage >= 2, stage >= 3
        if keep_grad_shards is None:
            keep_grad_shards = not shards_params
        return cls(
            stage=stage,
            shards_optimizer=stage >= 1,
            shards_grads=shards_grads,
            shards_params=shards_params,
            grad_reduction=(
                GradReduction.ALL_REDUCE_IN_BACKWARD,
                GradReduction.REDUCE_SCATTER_AT_STEP,
                GradReduction.REDUCE_SCATTER_IN_BACKWARD,
                GradReduction.REDUCE_SCATTER_IN_BACKWARD,
            )[stage],
            param_gather=(
                ParamGather.NEVER,
                ParamGather.AFTER_STEP,
                ParamGather.AFTER_STEP,
                ParamGather.AROUND_USE,
            )[stage],
            bucket_size=None if shards_params else bucket_size,
            keep_grad_shards=shards_grads and keep_grad_shards,
            prefetch=shards_params and prefetch,
            defer_param_gather=stage in (1, 2) and overlap_param_gather,
        )

    @classmethod
    def from_config(cls, config) -> StagePlan:
        """The plan of a `ZeroConfig`."""
        return cls.for_stage(
            config.stage,
            bucket_size=config.bucket_size,
            keep_grad_shards=config.keep_grad_shards,
            prefetch=config.prefetch,
            overlap_param_gather=config.overlap_param_gather,
        )

    @property
    def sharded(self) -> tuple[str, ...]:
        """The model states split across ranks, in the order the stages add them."""
        kinds = (
            (self.shards_optimizer, "optimizer state"),
            (self.shards_optimizer, "fp32 master weights"),
            (self.shards_grads, "gradients"),
            (self.shards_params, "parameters"),
        )
        return tuple(name for on, name in kinds if on)

    @property
    def reduce_in_backward(self) -> bool:
        """Gradients are communicated from the gradient hooks, every micro-step."""
        return self.grad_reduction is not GradReduction.REDUCE_SCATTER_AT_STEP

    @property
    def poll_reductions(self) -> bool:
        """Backward never blocks on a gradient reduction; it retires the ones seen complete.
        Stage 3 must not block there: another rank may be waiting for this rank's next
        parameter all-gather before it can launch the reduction this rank would wait on."""
        return self.shards_params

    @property
    def gather_after_step(self) -> bool:
        """The updated shards are all-gathered into the full parameters after the step."""
        return self.param_gather is ParamGather.AFTER_STEP

    def model_state_divisors(self, world_size: int) -> dict[str, int]:
        """By kind of model state ("params", "grads", "optim"), what its per-rank bytes are
        divided by: `world_size` where the kind is sharded, else 1."""
        return {
            "params": world_size if self.shards_params else 1,
            "grads": world_size if self.shards_grads else 1,
            "optim": world_size if self.shards_optimizer else 1,
        }
