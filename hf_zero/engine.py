"""The engine: composes one parameter store, one gradient store and the sharded optimizer.

`plan.StagePlan` says what the configured stage shards and when it communicates; `__init__`
picks one piece of each kind from the plan's named properties and never compares stage numbers:

- parameters: `ShardedParams` where the plan shards them, else `ReplicatedParams` (which
  all-gathers the updated shards after the step where the optimizer is sharded);
- gradients: `ShardedGrads` where the plan shards them (polling its reductions at stage 3),
  else full local gradients, all-reduced in backward (`AllReducedGrads`) or reduce-scattered
  once per step, in the accumulation boundary's backward (`StepReducedGrads`);
- optimizer: `ShardedOptimizer` over this rank's shard of every flat unit, or over the whole
  buffer where the plan does not shard it.

The engine does not know who hosts it (a script, Accelerate, the Trainer).

The training loop is torch's, and so are its mistakes' outcomes (`guards` routes the model's
and optimizer's own calls here): `step()` with no backward since the last step or `zero_grad()`
changes nothing and returns False; a backward after `step()` without `zero_grad()` raises, since
the last step's gradients are still held (scaled and reduced in place); a second
`clip_grad_norm_` in one step returns the norm of the already clipped gradients.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import comm, fingerprint, guards, recompute
from .checkpoint import sharded
from .checkpoint.export import export_model
from .checkpoint.state import Counters, RankState
from .config import ZeroConfig
from .discover import discover_params
from .estimate import model_state_bytes, optimizer_state_bytes
from .grads import AllReducedGrads, BackwardTracker, ShardedGrads, StepReducedGrads
from .optimizer import ShardedOptimizer, check_optimizer
from .params import ReplicatedParams, ShardedParams, flatten_fp32
from .partition import FlatUnit, plan_layout
from .plan import StagePlan
from .precision import compute_dtype_for, loss_scaler_for
from .quantize import QuantSpec
from .report import gather_full_state_dict, held_bytes
from .sparse import SparseRows, lookup_only_embeddings, mark_solo

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
            becomes `engine.optimizer` (the same object, its `step()` and `zero_grad()` now
            `engine.step()` and `engine.zero_grad()`).
        config: a ZeroConfig; default ZeroConfig() (stage 2, fp32).
        group: the process group of the data-parallel ranks; default the world. With
            torch.distributed not initialised, the engine runs as world size 1.

    Raises:
        TypeError: model already wrapped, optimizer not elementwise, config of the wrong type.
        ValueError: the model already has an engine; optimizer and model disagree, or a
            trainable parameter is not fp32/bf16/fp16 (see `discover_params`).
    """
    return ZeroEngine(
        model, optimizer, config=config if config is not None else ZeroConfig(), group=group
    )


class ZeroEngine(nn.Module):
    """A model and optimizer trained with ZeRO. Call it like the model; `engine.module` is the
    model itself.

    Public state: `config`, `grad_norm` (the pre-clip global norm of the last step, or None),
    `global_steps` (applied optimizer steps), `skipped_steps` and `step_was_skipped` (the last
    `step()` call did not apply).
    """

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
        guards.check_not_attached(model)
        check_optimizer(optimizer)
        recompute.check_no_reentrant(model)
        self.config = config
        self.module = model
        plan = self._plan = StagePlan.from_config(config)
        self._group = comm.resolve_group(group)
        self._stats = comm.CommStats()
        self._compute_dtype = compute_dtype_for(config.mixed_precision)
        self._scaler = loss_scaler_for(config)

        found = discover_params(model, optimizer, config.unit_modules)
        self._params = found.params
        self._whole = found.whole  # frozen non-fp32-representable parameters, kept as they are
        # The dtypes the model came with: what an HF export writes by default.
        self._param_dtypes = {
            n: str(p.dtype).removeprefix("torch.") for n, p in found.params.items()
        }
        entries, sparse_embeddings = found.entries, {}
        if config.sparse_embedding_grads:
            sparse_embeddings = lookup_only_embeddings(model, entries)
            entries = mark_solo(entries, set(sparse_embeddings))
        self._layout = plan_layout(
            entries, world_size=self._group.world_size, bucket_size=plan.bucket_size
        )
        rank = self._group.rank
        # The first collectives, after every local check above: all ranks must agree on the
        # config, the model and the optimizer, or the job would hang or train garbage.
        description = fingerprint.describe(
            config, found.entries, model, optimizer, whole=found.whole
        )
        label = "fingerprint exchange at initialize"
        digests = comm.all_gather_object(
            fingerprint.digest(description), group=self._group, label=label
        )
        if len(set(digests)) > 1:
            everyone = comm.all_gather_object(description, group=self._group, label=label)
            raise ValueError(fingerprint.disagreement_message(everyone))
        # The engine's own groups, with its collective timeout: parameters and control, and
        # gradient reductions (see comm.new_group_like).
        timeout = config.collective_timeout_s
        self._reduce_group = comm.new_group_like(self._group, timeout_s=timeout)
        self._group = comm.new_group_like(self._group, timeout_s=timeout)

        def owned(fu: FlatUnit) -> tuple[int, int]:
            return fu.shard_range(rank) if plan.shards_optimizer else (0, fu.padded_numel)

        self._owned = owned  # the flat range [lo, hi) this rank's master and optimizer cover

        self._tracker = BackwardTracker()
        common = dict(group=self._group, stats=self._stats)
        if plan.shards_params:
            self._params_store = ShardedParams(
                self._layout,
                found.params,
                dtype=self._compute_dtype,
                unit_modules=found.unit_modules,
                prefetch=plan.prefetch,
                on_backward_start=self._tracker.enter,
                **common,
            )
        else:
            self._params_store = ReplicatedParams(
                self._layout,
                found.params,
                dtype=self._compute_dtype,
                owned=owned,
                gather_after_step=plan.gather_after_step,
                unit_modules=found.unit_modules,
                defer_gather=plan.defer_param_gather,
                **common,
            )
        self._sharded_optimizer = ShardedOptimizer(
            optimizer, self._layout, owned=owned, sharded=plan.shards_optimizer, **common
        )
        with torch.no_grad():
            for fu in self._layout.flat_units:
                full32 = flatten_fp32(fu, found.params, found.device)
                self._params_store.adopt(fu, full32)
                self._sharded_optimizer.adopt(fu, full32, self._params_store.local(fu))
                del full32
        self._sharded_optimizer.rebuild()

        reduce = dict(group=self._reduce_group, stats=self._stats)
        if plan.shards_grads:
            self._grads = ShardedGrads(
                self._layout,
                found.params,
                dtype=self._compute_dtype,
                tracker=self._tracker,
                max_inflight=config.max_inflight_reductions,
                poll=plan.poll_reductions,
                keep_shards=plan.keep_grad_shards,
                on_unit_grads_done=(
                    self._params_store.on_unit_grads_done if plan.shards_params else None
                ),
                buffers=self._params_store.pool if plan.shards_params else None,
                **reduce,
            )
        else:
            full_grads = AllReducedGrads if plan.reduce_in_backward else StepReducedGrads
            self._grads = full_grads(
                self._layout,
                found.params,
                dtype=self._compute_dtype,
                owned=owned,
                tracker=self._tracker,
                **reduce,
            )
        if sparse_embeddings:
            self._grads.sparse = SparseRows(self._layout, sparse_embeddings, **reduce)
        self._sparse_names = sorted(sparse_embeddings)
        quant = QuantSpec.from_config(config.comm_quantization)
        if quant is not None and quant.grads:
            self._grads.quantize = quant.block_size
        if quant is not None and quant.params:
            self._params_store.quantize = quant.block_size
        self._tracker.starters.append(self._check_backward_allowed)
        self._tracker.finishers.append(self._grads.end_backward)
        if plan.shards_params:
            self._tracker.finishers.append(self._params_store.end_backward)
        self._tracker.finishers.append(self._mark_backward_done)

        self.grad_norm: torch.Tensor | None = None
        self.global_steps = 0
        self.skipped_steps = 0
        self.step_was_skipped = False
        self._grads_ready = False  # master grads set and the norm computed for this step
        self._clipped = False
        self._has_grads = False  # a backward since the last step or zero_grad
        self._needs_zero = False  # a step consumed the gradients; zero_grad must come first

        self._param_ids = frozenset(id(p) for p in (*found.params.values(), *found.whole.values()))
        self._route = guards.OptimizerRoute(optimizer, self.step, self.zero_grad)
        guards.route_model(
            model,
            on_zero_grad=self.zero_grad,
            save_refusal=guards.sharded_save_refusal(model, self.world_size)
            if plan.shards_params
            else None,
        )
        guards.install_clip_guard()
        guards.attach(self)

    # ---- the training loop -----------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The user's optimizer, rebuilt over this rank's master shards; its `step()` and
        `zero_grad()` are this engine's."""
        return self._sharded_optimizer.optimizer

    @property
    def world_size(self) -> int:
        return self._group.world_size

    @property
    def rank(self) -> int:
        return self._group.rank

    def forward(self, *args, **kwargs):
        if self.module.training and torch.is_grad_enabled():
            recompute.check_no_reentrant(self.module)  # may be enabled after initialize
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss` (times the fp16 loss scale); gradients are reduced per stage.

        Raises:
            RuntimeError: `step()` ran since the last `zero_grad()` (its gradients are still
                held): call `zero_grad()` after each step.
        """
        self._check_backward_allowed()
        self.wait_for_params()
        self._grads.before_backward()
        passes = self._tracker.passes
        (loss * self._scaler.scale if self._scaler.dynamic else loss).backward()
        self._tracker.finish_if_missed(passes)

    def _check_backward_allowed(self) -> None:
        if self._needs_zero:
            raise RuntimeError(
                "backward after step() without zero_grad(): the gradients of the last step are "
                "still held (already unscaled, averaged over ranks and clipped in place), so this "
                "backward would add to them. Call engine.zero_grad() (or optimizer.zero_grad() / "
                "model.zero_grad()) after each step()"
            )

    def _mark_backward_done(self) -> None:
        self._has_grads = True

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-steps before the accumulation boundary. Stages 0-1 skip communication and
        accumulate full local gradients; stages 2-3 still reduce into the gradient shard."""
        old = self._grads.sync
        self._grads.sync = False
        try:
            yield
        finally:
            self._grads.sync = old

    def _prepare_grads(self) -> None:
        if self._grads_ready:
            return
        self._grads.reduce_for_step()
        inv = 1.0 / (self._group.world_size * self._scaler.scale)
        opt = self._sharded_optimizer
        local = {fu.index: self._grads.local(fu) for fu in opt.trainable()}
        opt.set_grads(local, inv)
        specs = opt.trainable_specs()
        got = torch.tensor([self._params[spec.name] in self._grads.got_grad for _, spec in specs])
        self.grad_norm, used = opt.grad_norm(got)
        self._untouched = [fs for fs, u in zip(specs, used.tolist()) if not u]
        self._grads_ready = True

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over all shards, each parameter once) to `max_norm`.

        Call at the accumulation boundary, after the last backward and before `step()`.
        Returns the norm before clipping; called again in the same step, the norm of the
        gradients as the first call left them (as torch does). Collective.

        Raises:
            ValueError: `max_norm` not > 0.
        """
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
        if self._clipped:
            norm = self._sharded_optimizer.norm()
        else:
            self._prepare_grads()
            norm = self.grad_norm
        if torch.isfinite(norm):
            self._sharded_optimizer.clip(norm, float(max_norm))
        self._clipped = True
        return norm

    def step(self) -> bool:
        """The optimizer step at the accumulation boundary: unscale, clip (config), update,
        and share the updated weights. Returns False if the step was not applied: an fp16
        overflow, a non-finite gradient with `nonfinite_grads="skip"`, or no backward since the
        last step or `zero_grad()` (which, as in torch, changes and counts nothing).

        Raises:
            FloatingPointError: a NaN/inf gradient norm without a loss scaler and
                `nonfinite_grads="raise"` (the default), or an fp16 loss scale that would fall
                below `precision.MIN_LOSS_SCALE`; on every rank alike.
        """
        self.wait_for_params()  # a unit the last forward skipped: its gather reads the master
        if not self._has_grads:
            self._end_step()
            self.step_was_skipped = True
            return False
        self._prepare_grads()
        # The norm is the same on every rank (all-reduced, or computed from identical
        # all-reduced gradients at stage 0), so every rank takes the same branch.
        overflow = not bool(torch.isfinite(self.grad_norm))
        self.step_was_skipped = overflow
        if overflow and not self._scaler.dynamic:
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
            opt = self._sharded_optimizer
            if self.config.gradient_clipping is not None and not self._clipped:
                opt.clip(self.grad_norm, self.config.gradient_clipping)
            with self._route.applying():
                opt.step(self._untouched)
            self._write_back(opt.trainable(), defer=self._plan.defer_param_gather)
            self.global_steps += 1
        self._end_step()
        self._needs_zero = True
        try:
            self._scaler.update(overflow)
        except FloatingPointError:
            self.zero_grad()
            raise
        if overflow and self._scaler.dynamic and self._scaler.should_warn():
            warnings.warn(self._scaler.skip_warning(), RuntimeWarning, stacklevel=2)
        return not overflow

    def _end_step(self) -> None:
        self._grads.got_grad.clear()
        self._sharded_optimizer.clear_grads()
        self._grads_ready = False
        self._clipped = False
        self._has_grads = False

    @torch.no_grad()
    def _write_back(self, fus: list[FlatUnit], *, defer: bool = False) -> None:
        """Copy masters into the compute parameters they do not alias, and share them (`defer`:
        the gathers land during the next forward, see `wait_for_params`)."""
        for fu in fus:
            master, local = self._sharded_optimizer.masters[fu.index], self._params_store.local(fu)
            if master.data_ptr() != local.data_ptr():
                local.copy_(master)
        self._params_store.publish(fus, defer=defer)

    def wait_for_params(self) -> None:
        """Return once every parameter holds the last step's update. With
        `config.overlap_param_gather` (stages 1-2), `step()` leaves the all-gather of the updated
        parameters in flight and the next forward waits for each unit's; code that reads
        parameters before that forward outside the engine and `state_dict()` (an EMA of
        `param.data`, a weight logger) calls this first. Otherwise a no-op. Not collective: the
        gathers were started on every rank by `step()`."""
        self._params_store.wait_published()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients this rank holds. At stages 2-3, `set_to_none=True` (torch's
        default) empties the gradient shards until the next backward writes them, and frees
        them unless `config.keep_grad_shards` keeps them (the default at stage 2); stages 0-1
        keep their full flat buffers (param.grad are views into them) and zero them.
        `optimizer.zero_grad()` and `model.zero_grad()` do exactly this."""
        self._grads.zero(set_to_none)
        self._end_step()
        self._needs_zero = False

    # ---- state -----------------------------------------------------------------------------

    def save_checkpoint(self, path, *, tokenizer=None):
        """Write a sharded checkpoint: every rank writes its own files, atomically.
        Collective. Returns the checkpoint path."""
        return sharded.save_checkpoint(self._checkpoint_state(), path, tokenizer=tokenizer)

    def load_checkpoint(self, path, *, weights_only=False, restore_rng=True):
        """Load a checkpoint saved at any world size and stage; each rank reads only its byte
        ranges, after checking sizes and checksums. Collective. Returns the manifest
        (`hf_zero.checkpoint.Manifest`).

        `weights_only=True` loads the weights alone and keeps this engine's optimizer state,
        counters and RNG (the optimizer may differ from the saved one). `restore_rng=False`
        leaves the RNG states to the host framework (Accelerate, the Trainer)."""
        return sharded.load_checkpoint(
            self._checkpoint_state(), path, weights_only=weights_only, restore_rng=restore_rng
        )

    def export(
        self,
        output_dir,
        *,
        tokenizer=None,
        dtype="auto",
        max_shard_size="5GB",
        overwrite=False,
        card=None,
        checkpoint=None,
        merge_adapters=False,
    ):
        """Write the folder `save_pretrained` writes for the current weights, plus a model card
        (collective): a sharded checkpoint (or `checkpoint=`, one of this very step) consolidated
        by `hf_zero.consolidate`, so it is byte for byte what `hf-zero consolidate` writes.
        A PEFT model writes its adapter only, as `PeftModel.save_pretrained` does, unless
        `merge_adapters=True` (the adapters merged into the base: a standard HF folder).
        Returns the folder. See `hf_zero.checkpoint.export.export_model`."""
        return export_model(
            self._checkpoint_state(),
            output_dir,
            tokenizer=tokenizer,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            card=card,
            checkpoint=checkpoint,
            merge_adapters=merge_adapters,
        )

    def _checkpoint_state(self) -> RankState:
        """What a checkpoint reads from and restores into this rank."""
        self.wait_for_params()
        return RankState(
            layout=self._layout,
            rank=self.rank,
            world_size=self.world_size,
            stage=self.config.stage,
            mixed_precision=self.config.mixed_precision,
            config=self.config.to_dict(),
            owned={fu.index: self._owned(fu) for fu in self._layout.flat_units},
            masters=dict(self._sharded_optimizer.masters),
            optimizer=self.optimizer,
            module=self.module,
            param_dtypes=dict(self._param_dtypes),
            counters=Counters(
                step=self.global_steps,
                skipped_steps=self.skipped_steps,
                loss_scaler=self._scaler.state_dict(),
            ),
            dynamic_loss_scale=self._scaler.dynamic,
            group=self._group,
            restore=self._restore_after_load,
        )

    def _restore_after_load(self, counters: Counters) -> None:
        """After the masters and optimizer state are loaded: parameters, scaler, counters."""
        self._write_back(list(self._layout.flat_units))
        if self._scaler.dynamic:
            self._scaler.load_state_dict(dict(counters.loss_scaler))
        self.global_steps = counters.step
        self.skipped_steps = counters.skipped_steps
        self.zero_grad()

    def full_state_dict(self, *, all_ranks: bool = False, dtype: torch.dtype | None = None) -> dict:
        """The full model state dict (parameters from the fp32 masters, cast to `dtype` if given,
        tied names sharing one tensor, plus buffers), on rank 0; {} on other ranks unless
        `all_ranks`. Collective: every rank must call it."""
        self.wait_for_params()
        return gather_full_state_dict(
            self._layout,
            self._sharded_optimizer.masters,
            self.module,
            group=self._group,
            stats=self._stats,
            dtype=dtype,
            keep=all_ranks or self._group.rank == 0,
        )

    def memory_stats(self) -> dict[str, int]:
        """Bytes of model states this rank holds now, by kind, each storage counted once:
        param_bytes (compute parameters, incl. stage-3 units gathered at the moment),
        grad_bytes, optim_bytes (fp32 masters that are not the parameters, optimizer state),
        total_bytes (their sum); and, outside the total, pooled_buffer_bytes: idle
        communication buffers kept for reuse (stage 3's gathered-unit blocks, a few units'
        worth; stage 1's reduce-scatter scratch on gloo; stages 2-3's gradient bucket buffers
        between the micro-steps of a no_sync() window; 0 otherwise)."""
        stats = held_bytes(
            params=[p.data for p in (*self._params.values(), *self._whole.values())]
            + self._params_store.held_tensors(),
            grads=self._grads.held_tensors() + [p.grad for p in self._params.values()],
            optim=self._sharded_optimizer.held_tensors(),
        )
        stats["pooled_buffer_bytes"] = (
            self._params_store.pooled_bytes() + self._grads.pooled_bytes()
        )
        return stats

    def comm_stats(self) -> dict[str, int]:
        """Bytes this rank has moved per collective kind since start, plus "total". An
        all-reduce of n bytes counts 2n, a reduce-scatter or all-gather of an n-byte buffer n:
        the ZeRO paper's convention, whatever primitive the backend ran."""
        return self._stats.snapshot()

    def wire_stats(self) -> dict:
        """What this rank really sent since start: "sent_bytes" (the payload handed to
        torch.distributed to send, per collective kind, plus "total"), "reductions" (sparse
        embedding reductions by how they ran: "sparse", "dense" when the touched rows would
        have cost more, "dense_unproven") and "sparse_embeddings" (the embedding weights
        reduced sparsely where exact, see `ZeroConfig.sparse_embedding_grads`)."""
        return {**self._stats.wire(), "sparse_embeddings": list(self._sparse_names)}

    def num_parameters(self, *, only_trainable: bool = False) -> int:
        """True parameter count (each tied parameter once), whatever is sharded."""
        n = sum(fu.numel for fu in self._layout.flat_units if fu.trainable or not only_trainable)
        return n + (0 if only_trainable else sum(p.numel() for p in self._whole.values()))

    def summary(self) -> dict:
        """The training setup and where it stands, for model cards and logs: stage, world_size,
        mixed_precision, global_steps, skipped_steps, num_parameters, trainable_parameters,
        memory_stats (measured now, this rank) and ddp_model_state_bytes (what plain data
        parallelism would hold for the trainable parameters with this optimizer: the stage-0
        formula)."""
        trainable = self.num_parameters(only_trainable=True)
        ddp = model_state_bytes(
            trainable,
            world_size=self.world_size,
            stage=0,
            mixed_precision=self.config.mixed_precision,
            optimizer_state_bytes=optimizer_state_bytes(self.optimizer),
        )
        return {
            "stage": self.config.stage,
            "world_size": self.world_size,
            "mixed_precision": self.config.mixed_precision,
            "global_steps": self.global_steps,
            "skipped_steps": self.skipped_steps,
            "num_parameters": self.num_parameters(),
            "trainable_parameters": trainable,
            "memory_stats": self.memory_stats(),
            "ddp_model_state_bytes": int(ddp["total_bytes"]),
        }
