"""The engine: composes one parameter store, one gradient store and the sharded optimizer.

| stage | parameters          | gradients                          | optimizer (masters + state) |
|-------|---------------------|------------------------------------|-----------------------------|
| 0     | ReplicatedParams    | LocalGrads, all-reduce in backward | whole buffer on every rank  |
| 1     | ReplicatedParams    | LocalGrads, reduce-scatter at step | shard                       |
| 2     | ReplicatedParams    | ShardedGrads                       | shard                       |
| 3     | ShardedParams       | ShardedGrads                       | shard                       |

The engine never branches on the stage after `__init__` picks the pieces; it does not know who
hosts it (a script, Accelerate, the Trainer).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import comm, fingerprint
from .checkpoint import sharded
from .checkpoint.state import Counters, RankState
from .config import ZeroConfig
from .discover import discover_params
from .grads import BackwardTracker, LocalGrads, ShardedGrads
from .optimizer import ShardedOptimizer, check_optimizer
from .params import ReplicatedParams, ShardedParams, flatten_fp32
from .partition import FlatUnit, plan_layout
from .precision import DynamicLossScaler, NoLossScaler, compute_dtype_for

__all__ = ["ZeroEngine", "initialize"]

_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "DataParallel", "ZeroEngine")


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    config: ZeroConfig | None = None,
    group: torch.distributed.ProcessGroup | None = None,
) -> ZeroEngine:
    """Wrap `model` and `optimizer` in a ZeRO engine.

    Args:
        model: the bare model, on its device; every rank builds the same model.
        optimizer: built over the model's parameters; it is rebuilt over this rank's shards and
            becomes `engine.optimizer` (the same object).
        config: a ZeroConfig; default ZeroConfig() (stage 2, fp32).
        group: the process group of the data-parallel ranks; default the world. With
            torch.distributed not initialised, the engine runs as world size 1.

    Raises:
        TypeError: model already wrapped, optimizer not elementwise, config of the wrong type.
        ValueError: optimizer and model disagree (see `discover_params`).
    """
    return ZeroEngine(
        model, optimizer, config=config if config is not None else ZeroConfig(), group=group
    )


class ZeroEngine(nn.Module):
    """A model and optimizer trained with ZeRO. Call it like the model; `engine.module` is the
    model itself."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        config: ZeroConfig,
        group: torch.distributed.ProcessGroup | None = None,
    ):
        super().__init__()
        if not isinstance(config, ZeroConfig):
            raise TypeError(f"config must be a hf_zero.ZeroConfig, got {type(config).__name__}")
        if type(model).__name__ in _WRAPPERS or not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a bare nn.Module, got {type(model).__name__}; hf_zero does its own "
                "gradient reduction, so pass the unwrapped model (model.module)"
            )
        check_optimizer(optimizer)
        self.config = config
        self.module = model
        self.group = comm.resolve_group(group)
        self.stats = comm.CommStats()
        self.compute_dtype = compute_dtype_for(config.mixed_precision)
        if config.mixed_precision == "fp16":
            self.scaler = DynamicLossScaler(
                scale=config.initial_loss_scale,
                growth_interval=config.loss_scale_growth_interval,
                growth_factor=config.loss_scale_growth_factor,
                backoff_factor=config.loss_scale_backoff_factor,
            )
        else:
            self.scaler = NoLossScaler()

        found = discover_params(model, optimizer, config.unit_modules)
        self.params_by_name = found.params
        # The dtypes the model came with: what an HF export writes by default.
        self.param_dtypes = {
            n: str(p.dtype).removeprefix("torch.") for n, p in found.params.items()
        }
        stage = config.stage
        self.layout = plan_layout(
            found.entries,
            world_size=self.group.world_size,
            bucket_size=None if stage == 3 else config.bucket_size,
        )
        rank = self.group.rank
        # The first collectives, after every local check above: all ranks must agree on the
        # config, the model and the optimizer, or the job would hang or train garbage.
        description = fingerprint.describe(config, found.entries, model, optimizer)
        label = "fingerprint exchange at initialize"
        digests = comm.all_gather_object(
            fingerprint.digest(description), group=self.group, label=label
        )
        if len(set(digests)) > 1:
            everyone = comm.all_gather_object(description, group=self.group, label=label)
            raise ValueError(fingerprint.disagreement_message(everyone))
        # The engine's own groups, with its collective timeout: parameters and control, and
        # gradient reductions (see comm.new_group_like).
        timeout = config.collective_timeout_s
        self.reduce_group = comm.new_group_like(self.group, timeout_s=timeout)
        self.group = comm.new_group_like(self.group, timeout_s=timeout)

        def owned(fu: FlatUnit) -> tuple[int, int]:
            return (0, fu.padded_numel) if stage == 0 else fu.shard_range(rank)

        self.owned = owned  # the flat range [lo, hi) this rank's master and optimizer cover

        self.tracker = BackwardTracker()
        common = dict(group=self.group, stats=self.stats)
        if stage == 3:
            self.params_store = ShardedParams(
                self.layout,
                found.params,
                dtype=self.compute_dtype,
                unit_modules=found.unit_modules,
                prefetch=config.prefetch,
                on_backward_start=self.tracker.enter,
                **common,
            )
        else:
            self.params_store = ReplicatedParams(
                self.layout,
                found.params,
                dtype=self.compute_dtype,
                owned=owned,
                sharded_optimizer=stage > 0,
                **common,
            )
        self.sharded_optimizer = ShardedOptimizer(
            optimizer, self.layout, owned=owned, sharded=stage > 0, **common
        )
        with torch.no_grad():
            for fu in self.layout.flat_units:
                full32 = flatten_fp32(fu, found.params, found.device)
                self.params_store.adopt(fu, full32)
                self.sharded_optimizer.adopt(fu, full32, self.params_store.local(fu))
                del full32
        self.sharded_optimizer.rebuild()

        reduce = dict(group=self.reduce_group, stats=self.stats)
        if stage >= 2:
            self.grads = ShardedGrads(
                self.layout,
                found.params,
                dtype=self.compute_dtype,
                tracker=self.tracker,
                max_inflight=config.max_inflight_reductions,
                block_on_inflight=stage != 3,
                keep_shards=(
                    stage == 2 if config.keep_grad_shards is None else config.keep_grad_shards
                ),
                on_unit_grads_done=self.params_store.on_unit_grads_done if stage == 3 else None,
                **reduce,
            )
        else:
            self.grads = LocalGrads(
                self.layout,
                found.params,
                dtype=self.compute_dtype,
                owned=owned,
                tracker=self.tracker,
                reduce_in_backward=stage == 0,
                **reduce,
            )
        self.tracker.finishers.append(self.grads.end_backward)
        if stage == 3:
            self.tracker.finishers.append(self.params_store.end_backward)
        self.grad_norm: torch.Tensor | None = None
        self.global_steps = 0
        self.skipped_steps = 0
        self._grads_ready = False
        self._clipped = False

    # ---- the training loop -----------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The user's optimizer, rebuilt over this rank's master shards."""
        return self.sharded_optimizer.optimizer

    @property
    def stage(self) -> int:
        return self.config.stage

    @property
    def world_size(self) -> int:
        return self.group.world_size

    @property
    def rank(self) -> int:
        return self.group.rank

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss` (times the fp16 loss scale); gradients are reduced per stage."""
        passes = self.tracker.passes
        (loss * self.scaler.scale if self.scaler.dynamic else loss).backward()
        self.tracker.finish_if_missed(passes)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-steps before the accumulation boundary. Stages 0-1 skip communication and
        accumulate full local gradients; stages 2-3 still reduce into the gradient shard."""
        old = self.grads.sync
        self.grads.sync = False
        try:
            yield
        finally:
            self.grads.sync = old

    def _prepare_grads(self) -> None:
        if self._grads_ready:
            return
        self.grads.reduce_for_step()
        inv = 1.0 / (self.group.world_size * self.scaler.scale)
        local = {fu.index: self.grads.local(fu) for fu in self.sharded_optimizer.trainable()}
        self.sharded_optimizer.set_grads(local, inv)
        specs = self.sharded_optimizer.trainable_specs()
        got = torch.tensor(
            [self.params_by_name[spec.name] in self.grads.got_grad for _, spec in specs]
        )
        self.grad_norm, used = self.sharded_optimizer.grad_norm(got)
        self._untouched = [fs for fs, u in zip(specs, used.tolist()) if not u]
        self._grads_ready = True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over all shards, each parameter once) to `max_norm`.

        Call at the accumulation boundary, after the last backward and before `step()`.
        Returns the norm before clipping.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        self._prepare_grads()
        if torch.isfinite(self.grad_norm):
            self.sharded_optimizer.clip(self.grad_norm, float(max_norm))
        self._clipped = True
        return self.grad_norm

    def step(self) -> bool:
        """The optimizer step at the accumulation boundary: unscale, clip (config), update,
        and share the updated weights. Returns False if the step was skipped: an fp16 overflow,
        or a non-finite gradient with `nonfinite_grads="skip"`.

        Raises:
            FloatingPointError: a NaN/inf gradient norm without a loss scaler and
                `nonfinite_grads="raise"` (the default), on every rank alike.
        """
        self._prepare_grads()
        # The norm is the same on every rank (all-reduced, or computed from identical
        # all-reduced gradients at stage 0), so every rank takes the same branch.
        overflow = not bool(torch.isfinite(self.grad_norm))
        if overflow and not self.scaler.dynamic:
            step = self.global_steps + self.skipped_steps + 1
            if self.config.nonfinite_grads == "raise":
                self.zero_grad()
                raise FloatingPointError(
                    f"non-finite gradient norm ({self.grad_norm.item()}) at optimizer step {step} "
                    "(a NaN/inf loss or gradient on some rank); the step was not applied. Set "
                    "ZeroConfig(nonfinite_grads='skip') to skip such steps with a warning instead"
                )
            warnings.warn(
                f"hf_zero: non-finite gradient norm ({self.grad_norm.item()}) at optimizer step "
                f"{step}; skipping the step on every rank",
                RuntimeWarning,
                stacklevel=2,
            )
        if overflow:
            self.skipped_steps += 1
        else:
            if self.config.gradient_clipping is not None and not self._clipped:
                self.sharded_optimizer.clip(self.grad_norm, self.config.gradient_clipping)
            self.sharded_optimizer.step(self._untouched)
            self._write_back(self.sharded_optimizer.trainable())
            self.global_steps += 1
        self.scaler.update(overflow)
        self.grads.got_grad.clear()
        self.sharded_optimizer.clear_grads()
        self._grads_ready = False
        self._clipped = False
        return not overflow

    @torch.no_grad()
    def _write_back(self, fus: list[FlatUnit]) -> None:
        """Copy masters into the compute parameters they do not alias, and share them."""
        for fu in fus:
            master, local = self.sharded_optimizer.masters[fu.index], self.params_store.local(fu)
            if master.data_ptr() != local.data_ptr():
                local.copy_(master)
        self.params_store.publish(fus)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients this rank holds. At stages 2-3, `set_to_none=True` (torch's
        default) empties the gradient shards until the next backward writes them, and frees
        them unless `config.keep_grad_shards` keeps them (the default at stage 2); stages 0-1
        keep their full flat buffers (param.grad are views into them) and zero them."""
        self.grads.zero(set_to_none)
        self.sharded_optimizer.clear_grads()
        self._grads_ready = False
        self._clipped = False

    # ---- state -----------------------------------------------------------------------------

    def save_checkpoint(self, path, *, tokenizer=None):
        """Write a sharded checkpoint: every rank writes its own files, atomically.
        Collective. Returns the checkpoint path."""
        return sharded.save_checkpoint(self._checkpoint_state(), path, tokenizer=tokenizer)

    def load_checkpoint(self, path) -> dict:
        """Load a checkpoint saved at any world size and stage; each rank reads only its byte
        ranges, after checking sizes and checksums. Collective. Returns the manifest."""
        return sharded.load_checkpoint(self._checkpoint_state(), path)

    def _checkpoint_state(self) -> RankState:
        """What a checkpoint reads from and restores into this rank."""
        return RankState(
            layout=self.layout,
            rank=self.rank,
            world_size=self.world_size,
            stage=self.stage,
            mixed_precision=self.config.mixed_precision,
            config=self.config.to_dict(),
            owned={fu.index: self.owned(fu) for fu in self.layout.flat_units},
            masters=dict(self.sharded_optimizer.masters),
            optimizer=self.optimizer,
            module=self.module,
            param_dtypes=dict(self.param_dtypes),
            counters=Counters(
                step=self.global_steps,
                skipped_steps=self.skipped_steps,
                loss_scaler=self.scaler.state_dict(),
            ),
            dynamic_loss_scale=self.scaler.dynamic,
            group=self.group,
            restore=self._restore_after_load,
        )

    def _restore_after_load(self, counters: Counters) -> None:
        """After the masters and optimizer state are loaded: parameters, scaler, counters."""
        self._write_back(list(self.layout.flat_units))
        if self.scaler.dynamic:
            self.scaler.load_state_dict(dict(counters.loss_scaler))
        self.global_steps = counters.step
        self.skipped_steps = counters.skipped_steps
        self.zero_grad()

    @torch.no_grad()
    def full_state_dict(self, *, all_ranks: bool = False, dtype: torch.dtype | None = None) -> dict:
        """The full model state dict (parameters from the fp32 masters, cast to `dtype` if given,
        tied names sharing one tensor, plus buffers), on rank 0; {} on other ranks unless
        `all_ranks`. Collective: every rank must call it."""
        full_of: dict[str, torch.Tensor] = {}
        for fu in self.layout.flat_units:
            master = self.sharded_optimizer.masters[fu.index]
            if master.numel() == fu.padded_numel:
                full = master
            else:
                full = torch.empty(fu.padded_numel, dtype=master.dtype, device=master.device)
                comm.all_gather(
                    full,
                    master,
                    group=self.group,
                    stats=self.stats,
                    label="all-gather for full_state_dict",
                )
            for spec in fu.params:
                t = full[spec.offset : spec.offset + spec.numel].view(spec.shape).clone()
                t = t.to(dtype) if dtype is not None else t
                for name in (spec.name, *spec.aliases):
                    full_of[name] = t
        if self.group.rank != 0 and not all_ranks:
            return {}
        out = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            out[key] = full_of[key] if key in full_of else value.detach().clone()
        return out

    def memory_stats(self) -> dict[str, int]:
        """Bytes of model states this rank holds now, by kind, each storage counted once:
        param_bytes (compute parameters, incl. stage-3 units gathered at the moment),
        grad_bytes, optim_bytes (fp32 masters that are not the parameters, optimizer state)."""
        seen: set[int] = set()

        def count(tensors) -> int:
            total = 0
            for t in tensors:
                if t is None:
                    continue
                storage = t.untyped_storage()
                if storage.nbytes() == 0 or storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return total

        param = count(
            [p.data for p in self.params_by_name.values()] + self.params_store.held_tensors()
        )
        grad = count(self.grads.held_tensors() + [p.grad for p in self.params_by_name.values()])
        optim = count(self.sharded_optimizer.held_tensors())
        return {
            "param_bytes": param,
            "grad_bytes": grad,
            "optim_bytes": optim,
            "total_bytes": param + grad + optim,
        }

    def comm_stats(self) -> dict[str, int]:
        """Bytes this rank has moved per collective kind since start (DESIGN.md §1 convention),
        plus "total"."""
        return self.stats.snapshot()

    def num_parameters(self, *, only_trainable: bool = False) -> int:
        """True parameter count (each tied parameter once), whatever is sharded."""
        return sum(fu.numel for fu in self.layout.flat_units if fu.trainable or not only_trainable)
