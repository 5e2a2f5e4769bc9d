"""Accelerate integration: `ZeroAccelerator`, an `accelerate.Accelerator` whose model and
optimizer are one hf_zero engine.

A script written for Accelerate works after one changed line,
`Accelerator(...)` -> `hf_zero.ZeroAccelerator(zero_config=..., ...)`. Each method below names
the engine call it stands for; everything else is Accelerate's own, unchanged (dataloaders,
schedulers, `accumulate`, `gather_for_metrics`, `reduce`, `print`, trackers, ...).

| Accelerate                           | hf_zero                                                  |
|--------------------------------------|----------------------------------------------------------|
| `prepare(model, optimizer, ...)`     | `hf_zero.initialize(model, optimizer, config)`; the rest |
|                                      | goes to Accelerate, schedulers over `engine.optimizer`   |
| `backward(loss)`                     | `engine.backward(loss / gradient_accumulation_steps)`    |
| `accumulate(model)`, `no_sync(model)`| Accelerate's, entering `engine.no_sync()`                |
| `optimizer.step()` / `zero_grad()`   | `engine.step()` / `engine.zero_grad()` at the boundary   |
| `optimizer.step_was_skipped`         | `engine.step_was_skipped` (fp16 overflow)                |
| `clip_grad_norm_(params, max_norm)`  | `engine.clip_grad_norm_(max_norm)`: global over shards   |
| `unwrap_model(model)`                | `engine.module`                                          |
| `get_state_dict(model)`              | `engine.full_state_dict()` (collective; main process)    |
| `save_model(model, dir)`             | `engine.export(dir)` (collective; standard HF folder)    |
| `save_state(dir)` / `load_state(dir)`| `engine.save_checkpoint` / `load_checkpoint` of          |
|                                      | `<dir>/zero_checkpoint`; Accelerate saves the rest       |

Checkpoints: `save_state` and `load_state` run Accelerate's own, with the engine's model and
optimizer hidden from it (Accelerate would write rank 0's optimizer shard as if it were the
whole optimizer), and the engine saving or loading its sharded checkpoint from a pre-hook, the
extension point Accelerate gives for saving models another way. Accelerate keeps what it owns:
schedulers, dataloader and sampler states, the step counter, the GradScaler of other models,
`register_for_checkpointing` objects and the RNG states (`random_states_<i>.pkl`). The RNG is
Accelerate's to restore, so the engine loads with `restore_rng=False`. The engine's checkpoint
loads at any world size and stage; Accelerate's files at another world size load as Accelerate
loads them (a process without its own `random_states_<i>.pkl` keeps its RNG).

One engine per ZeroAccelerator: the model and its optimizer are passed to the same `prepare`
call. Models without an optimizer (frozen, eval-only) are prepared by Accelerate as usual.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from ..config import ZeroConfig
from ..engine import ZeroEngine, initialize
from .common import guard_world, install_exit_teardown, resolve_zero_config

__all__ = ["ZeroAccelerator", "ZeroOptimizer", "CHECKPOINT_DIR"]

# The engine's sharded checkpoint inside a `save_state` folder (`hf-zero consolidate` reads it).
CHECKPOINT_DIR = "zero_checkpoint"
_OTHER_ENGINES = (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM)
_OTHER_PLUGINS = ("deepspeed_plugin", "deepspeed_plugins", "fsdp_plugin", "megatron_lm_plugin")


class ZeroOptimizer(AcceleratedOptimizer):
    """Accelerate's optimizer wrapper around `engine.optimizer`, whose `step()` and
    `zero_grad()` are the engine's (hf_zero routes them), called at the accumulation boundary
    as Accelerate calls them."""

    def __init__(self, engine: ZeroEngine):
        super().__init__(engine.optimizer, device_placement=False, scaler=None)
        self.engine = engine

    @property
    def step_was_skipped(self) -> bool:
        """Whether the last optimizer step was skipped (fp16 overflow)."""
        return self.engine.step_was_skipped


class ZeroAccelerator(Accelerator):
    """An `accelerate.Accelerator` that trains its model with hf_zero's ZeRO engine.

    Args:
        zero_config: a `hf_zero.ZeroConfig`, a path to a YAML/JSON ZeroConfig file
            (`configs/zero2.yaml`), or None for the defaults (stage 2). Mixed precision comes
            from Accelerate's setting (`mixed_precision=`, `accelerate launch --mixed_precision`)
            when the ZeroConfig leaves it at "no", from the ZeroConfig when Accelerate says "no".
        **kwargs: `accelerate.Accelerator`'s arguments.

    Raises:
        WorldMismatchError: torch.distributed or the launcher counts more processes than
            Accelerate (for example `accelerate launch --multi_gpu` on CPU without
            `ACCELERATE_USE_CPU=1`); the message names both numbers and the fix.
        ValueError: the ZeroConfig and Accelerate's mixed precision disagree, or Accelerate is
            set up for DeepSpeed, FSDP or Megatron-LM.
    """

    def __init__(self, *, zero_config: ZeroConfig | str | None = None, **kwargs):
        # Before super(): Accelerate would set up the other engine (and its environment).
        plugins = sorted(k for k in _OTHER_PLUGINS if kwargs.get(k) is not None)
        if plugins:
            _refuse_other_engine(plugins)
        super().__init__(**kwargs)
        install_exit_teardown()
        guard_world(self.num_processes, host="Accelerate")
        if self.distributed_type in _OTHER_ENGINES:
            _refuse_other_engine(self.distributed_type.value)
        self.zero_config = resolve_zero_config(
            zero_config, host_mixed_precision=self.mixed_precision
        )
        self.zero_engine: ZeroEngine | None = None

    # ---- prepare -------------------------------------------------------------------------

    def prepare(self, *args, device_placement=None):
        """Accelerate's `prepare`: a model with its optimizer becomes the engine and its
        `ZeroOptimizer`; everything else is prepared by Accelerate, in the same call."""
        places = list(device_placement) if device_placement is not None else [None] * len(args)
        if len(places) != len(args):
            return super().prepare(*args, device_placement=device_placement)
        result = list(args)
        for mi, oi in _pair_model_and_optimizer(args).items():
            result[mi], result[oi] = self._prepare_engine(args[mi], args[oi], places[mi])
        rest = [i for i, obj in enumerate(result) if obj is args[i]]
        if rest:
            done = super().prepare(
                *(args[i] for i in rest), device_placement=[places[i] for i in rest]
            )
            for i, obj in zip(rest, done if len(rest) > 1 else (done,)):
                result[i] = obj
        return tuple(result) if len(result) > 1 else result[0]

    def _prepare_engine(self, model, optimizer, placement):
        if self.zero_engine is not None:
            raise ValueError(
                f"this ZeroAccelerator already trains a {type(self.zero_engine.module).__name__} "
                f"with hf_zero; a second model with an optimizer ({type(model).__name__}) needs "
                "its own ZeroAccelerator"
            )
        if placement if placement is not None else self.device_placement:
            model.to(self.device)
        engine = initialize(model, optimizer, config=self.zero_config)
        zero_optimizer = ZeroOptimizer(engine)
        engine._is_accelerate_prepared = True
        zero_optimizer._is_accelerate_prepared = True
        self._models.append(engine)
        self._optimizers.append(zero_optimizer)
        self.zero_engine = engine
        self.scaler = None  # the engine scales fp16 losses itself
        return engine, zero_optimizer

    def _engine_of(self, model) -> ZeroEngine | None:
        e = self.zero_engine
        return e if e is not None and (model is e or model is e.module) else None

    # ---- the training loop ---------------------------------------------------------------

    def backward(self, loss, **kwargs):
        """`engine.backward(loss / gradient_accumulation_steps)`."""
        if self.zero_engine is None:
            return super().backward(loss, **kwargs)
        if kwargs:
            raise TypeError(
                f"ZeroAccelerator.backward takes only the loss, got {sorted(kwargs)}; the engine "
                "runs the backward pass itself"
            )
        self.zero_engine.backward(loss / self.gradient_accumulation_steps)

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        """`engine.clip_grad_norm_(max_norm)`: clips by the global norm over all shards and
        returns it (pre-clip). Off the accumulation boundary nothing is clipped and the last
        step's norm is returned, as Accelerate does for DeepSpeed."""
        params = list(parameters)
        engine = self.zero_engine
        own = {id(p) for p in engine.parameters()} if engine is not None else set()
        if not any(id(p) in own for p in params):
            return super().clip_grad_norm_(params, max_norm, norm_type=norm_type)
        if norm_type != 2 or {id(p) for p in params} != own:
            raise ValueError(
                "hf_zero clips the L2 norm of all of the model's gradients at once: pass "
                f"model.parameters() and norm_type=2 (got {len({id(p) for p in params})} of "
                f"{len(own)} parameters, norm_type={norm_type!r})"
            )
        if not self.sync_gradients:
            return engine.grad_norm
        return engine.clip_grad_norm_(max_norm)

    # ---- weights ---------------------------------------------------------------------------

    def unwrap_model(self, model, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True):
        """`engine.module` for the engine; Accelerate's unwrap for anything else."""
        engine = self._engine_of(model)
        if engine is None:
            return super().unwrap_model(model, keep_fp32_wrapper, keep_torch_compile)
        return engine.module

    def get_state_dict(self, model, unwrap=True):
        """`engine.full_state_dict()`: the full fp32 weights on the main process, {} on the
        others. Collective: every process calls it."""
        engine = self._engine_of(model)
        if engine is None:
            return super().get_state_dict(model, unwrap=unwrap)
        state = engine.full_state_dict()
        return state if unwrap else {f"module.{k}": v for k, v in state.items()}

    def save_model(self, model, save_directory, max_shard_size="10GB", safe_serialization=True):
        """`engine.export(save_directory)`: the folder `save_pretrained` writes (safetensors,
        config, tied weights once), loadable by `from_pretrained` without hf_zero.
        Collective: every process calls it."""
        engine = self._engine_of(model)
        if engine is None:
            return super().save_model(model, save_directory, max_shard_size, safe_serialization)
        if not safe_serialization:
            raise ValueError(
                "hf_zero exports safetensors only; call save_model with safe_serialization=True"
            )
        engine.export(save_directory, max_shard_size=max_shard_size, overwrite=True)

    # ---- state -----------------------------------------------------------------------------

    def save_state(self, output_dir=None, safe_serialization=True, **save_model_func_kwargs):
        """Accelerate's `save_state`, with the engine's sharded checkpoint (every rank writes
        its own shards) in `<output_dir>/zero_checkpoint`. Collective."""
        engine = self.zero_engine
        if engine is None:
            return super().save_state(output_dir, safe_serialization, **save_model_func_kwargs)
        if save_model_func_kwargs:
            raise TypeError(
                f"ZeroAccelerator.save_state takes no model-saving options, got "
                f"{sorted(save_model_func_kwargs)}"
            )

        def save_engine(models, weights, folder):
            engine.save_checkpoint(Path(folder) / CHECKPOINT_DIR)

        with self._engine_hidden(self.register_save_state_pre_hook(save_engine)):
            return super().save_state(output_dir, safe_serialization)

    def load_state(self, input_dir=None, load_kwargs=None, **load_model_func_kwargs):
        """Accelerate's `load_state`, with the engine loading `<input_dir>/zero_checkpoint` at
        this run's world size and stage. Collective."""
        engine = self.zero_engine
        if engine is None:
            return super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)

        def load_engine(models, folder):
            engine.load_checkpoint(Path(folder) / CHECKPOINT_DIR, restore_rng=False)

        with self._engine_hidden(self.register_load_state_pre_hook(load_engine)):
            return super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)

    @contextlib.contextmanager
    def _engine_hidden(self, hook_handle):
        """Accelerate's save/load without the engine's model and optimizer, `hook_handle`
        (the engine's own save or load) removed afterwards."""
        models, optimizers = self._models, self._optimizers
        self._models = [m for m in models if m is not self.zero_engine]
        self._optimizers = [o for o in optimizers if not isinstance(o, ZeroOptimizer)]
        try:
            yield
        finally:
            self._models, self._optimizers = models, optimizers
            hook_handle.remove()

    def free_memory(self, *objects):
        self.zero_engine = None
        return super().free_memory(*objects)


def _refuse_other_engine(what) -> None:
    raise ValueError(
        f"Accelerate is set up for {what}, but ZeroAccelerator runs hf_zero's own ZeRO engine; "
        "drop the DeepSpeed / FSDP / Megatron-LM plugin and launch settings"
    )


def _pair_model_and_optimizer(args) -> dict[int, int]:
    """{model index: optimizer index} for the raw optimizers in `args`, each with the model
    whose parameters it holds.

    Raises:
        ValueError: an optimizer whose model is not in `args`, or two for one model.
    """
    models = [
        i
        for i, a in enumerate(args)
        if isinstance(a, torch.nn.Module) and not getattr(a, "_is_accelerate_prepared", False)
    ]
    pairs: dict[int, int] = {}
    for oi, opt in enumerate(args):
        if not isinstance(opt, torch.optim.Optimizer) or isinstance(opt, AcceleratedOptimizer):
            continue
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        owner = [mi for mi in models if held & {id(p) for p in args[mi].parameters()}]
        if not owner:
            raise ValueError(
                f"ZeroAccelerator.prepare builds the engine from a model and its optimizer "
                f"together, but the {type(opt).__name__} at position {oi} came without the "
                "model whose parameters it holds; pass both to one call: "
                "accelerator.prepare(model, optimizer, ...)"
            )
        if owner[0] in pairs:
            raise ValueError(
                f"two optimizers (positions {pairs[owner[0]]} and {oi}) hold the parameters of "
                f"the {type(args[owner[0]]).__name__} at position {owner[0]}; hf_zero shards one "
                "optimizer per model: put both into one optimizer's param groups"
            )
        pairs[owner[0]] = oi
    return pairs
