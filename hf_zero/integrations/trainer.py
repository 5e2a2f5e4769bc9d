"""hf_zero for `transformers.Trainer`: `ZeroTrainer` and `ZeroTrainingArguments`.

A Trainer script switches to ZeRO with `Trainer` -> `ZeroTrainer`, `TrainingArguments` ->
`ZeroTrainingArguments` and `zero_stage=N` (or `zero_config="zero3.yaml"`). The usual arguments
keep their meaning; the engine does the sharding. This module translates the Trainer's calls
into engine calls and delegates: it never opens checkpoint files, computes a norm, calls
torch.distributed or asks which stage runs.

Seams (the Trainer has no hook for a custom engine; these are the methods it calls):

| Trainer calls                     | here                                                    |
|-----------------------------------|---------------------------------------------------------|
| `Accelerator(mixed_precision=)`   | "no": the engine computes in bf16/fp16 itself           |
| `create_optimizer()`              | the Trainer's (`optim`, weight decay): the prototype    |
| `_wrap_model(model)`              | `hf_zero.initialize(model, optimizer)`: the engine      |
| `accelerator.backward(loss)`      | `engine.backward(loss)`: loss scale, reduction by stage |
| `_clip_grad_norm`, `_get_grad_norm` | `engine.clip_grad_norm_`: the global pre-clip norm    |
| `optimizer.step()`, `zero_grad()` | `engine.step()`, `engine.zero_grad()`; skipped: no LR step |
| `save_model(dir)`                 | `engine.export`: what `save_pretrained` writes          |
| `_save_checkpoint`                | `engine.save_checkpoint` (sharded, per rank)            |
| `_save_optimizer_and_scheduler`   | the scheduler only (the optimizer is in the engine's)   |
| `_load_from_checkpoint`           | checks it is this model's checkpoint, before any step   |
| `_load_optimizer_and_scheduler`   | `engine.load_checkpoint(restore_rng=False)`, scheduler  |
| `_load_best_model`                | `engine.load_checkpoint(best, weights_only=True)`       |
| `push_to_hub`, `_push_from_checkpoint` | export and card, uploaded by `hf_zero.hub`         |

A `checkpoint-N/` folder holds the engine's sharded checkpoint (`zero/`, config, tokenizer) and
what the Trainer keeps itself: `trainer_state.json`, `scheduler.pt`, `rng_state_R.pth` and
`training_args.bin`. It resumes at any world size and stage (the engine reshards). The Trainer
owns the RNG on resume: it restores `rng_state_R.pth` at the right point of its batch skipping,
so the engine's load leaves the RNG alone. With `save_only_model=True` a checkpoint is the
export instead (it cannot be resumed, as with the Trainer).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainingArguments
from transformers.trainer import SCHEDULER_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils.hub import PushInProgress

from .. import hub
from ..card import CardInfo
from ..checkpoint import CheckpointError, Manifest, latest_checkpoint
from ..config import ZeroConfig
from ..engine import ZeroEngine, initialize
from .common import WorldMismatchError, guard_world, install_exit_teardown, resolve_zero_config

__all__ = ["SHARDABLE_OPTIMS", "ZeroTrainer", "ZeroTrainingArguments"]

logger = logging.getLogger(__name__)

# `optim` values whose optimizer is elementwise, so it runs on flat 1D shards.
SHARDABLE_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd", "adagrad", "rmsprop")
# Where an export is assembled before its files join the output folder (see `_export_into`);
# the Trainer's own uploads skip "_*" names.
EXPORT_STAGING = "_hf_zero_export"
PUSH_STAGING = "_hf_zero_push"
_FIX_WORLD = "with the Trainer on CPU, pass use_cpu=True (--use_cpu) to ZeroTrainingArguments"


@dataclass
class ZeroTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the ZeRO engine's settings. Every other argument keeps its
    meaning: batch sizes, accumulation, `max_grad_norm` (global norm over all shards), the LR
    schedule, `optim`, `bf16`/`fp16` (the engine's mixed precision, fp32 master weights),
    logging, evaluation, saving, resuming and pushing."""

    zero_stage: int | None = field(
        default=None,
        metadata={
            "help": "ZeRO stage: 0 (replicated, DDP semantics), 1 (shard optimizer state), 2 (+ "
            "gradients), 3 (+ parameters). Default: zero_config's stage, else 2."
        },
    )
    zero_config: str | None = field(
        default=None,
        metadata={
            "help": "Path to an hf_zero ZeroConfig YAML or JSON file (see configs/). Precision "
            "and clipping come from bf16/fp16 and max_grad_norm."
        },
    )

    def __post_init__(self) -> None:
        # Before super(): it would start building a DeepSpeed or FSDP setup.
        _refuse_other_engines(self)
        super().__post_init__()
        _refuse_unsupported(self)
        self.zero_engine_config()  # a bad stage, file or precision fails here, not at train()

    def zero_engine_config(self) -> ZeroConfig:
        """The engine's ZeroConfig: `zero_config`'s file (or the defaults), `zero_stage`, and
        the precision of `bf16`/`fp16`.

        Raises:
            ValueError: the stage or precision disagree between the file and the arguments,
                or the file sets `gradient_clipping` (the Trainer clips by `max_grad_norm`).
            FileNotFoundError: `zero_config` does not exist.
        """
        config = resolve_zero_config(
            self.zero_config,
            stage=self.zero_stage,
            host_mixed_precision=self.mixed_precision,
            host_setting="TrainingArguments' bf16/fp16 (mixed_precision)",
        )
        if config.gradient_clipping is not None:
            raise ValueError(
                f"zero_config {self.zero_config!r} sets gradient_clipping="
                f"{config.gradient_clipping}; with the Trainer, clipping is max_grad_norm: set "
                f"max_grad_norm={config.gradient_clipping} and remove gradient_clipping from "
                "the file"
            )
        return config


def _refuse_other_engines(args: TrainingArguments) -> None:
    env_engine = [
        var
        for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")
        if os.environ.get(var, "false").lower() in ("1", "true", "yes")
    ]
    for name, value in (("deepspeed", args.deepspeed), ("fsdp", args.fsdp)):
        if value:
            raise ValueError(
                f"ZeroTrainingArguments got {name}={value!r} (with zero_stage={args.zero_stage}): "
                f"hf_zero is the ZeRO engine here and shards the model itself, so {name} must "
                f"not also wrap it. Remove the {name} argument, or use transformers' "
                "TrainingArguments and Trainer for DeepSpeed/FSDP"
            )
    if env_engine:
        raise ValueError(
            f"{env_engine[0]} is set in the environment (accelerate launch with a "
            f"{'DeepSpeed' if 'DEEPSPEED' in env_engine[0] else 'FSDP'} config), but "
            "ZeroTrainer shards the model with hf_zero: launch without that config (torchrun, "
            "or `accelerate launch --multi_gpu`)"
        )


def _refuse_unsupported(args: TrainingArguments) -> None:
    """The arguments whose meaning the engine does not (yet) keep: each is a clear error."""
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in SHARDABLE_OPTIMS:
        raise ValueError(
            f"optim={optim!r} cannot be sharded: hf_zero steps flat 1D shards that mix many "
            "parameters, so the optimizer must be elementwise in full fp32 (no factored second "
            "moments like Adafactor, no 8-bit/paged or low-rank state). Use one of: "
            f"{', '.join(SHARDABLE_OPTIMS)}"
        )
    if args.push_to_hub and args.hub_strategy in (
        HubStrategy.CHECKPOINT,
        HubStrategy.ALL_CHECKPOINTS,
    ):
        raise ValueError(
            f"hub_strategy={args.hub_strategy.value!r} uploads resumable checkpoints, whose "
            "model and optimizer state are per-rank shards; ZeroTrainer uploads only the "
            "consolidated export and its model card. Use hub_strategy='every_save' or 'end'"
        )
    if args.save_only_model and args.load_best_model_at_end:
        raise ValueError(
            "save_only_model=True with load_best_model_at_end=True: under ZeroTrainer a "
            "save_only_model checkpoint is the consolidated export, which the sharded engine "
            "cannot load back. Drop save_only_model (checkpoints are then sharded and resumable)"
        )
    refused = {
        "auto_find_batch_size": "it rebuilds the model wrapper on a model the engine owns",
        "torch_compile": "the engine's hooks are not compiled yet",
        "fp16_full_eval": "it casts the sharded parameters in place",
        "bf16_full_eval": "it casts the sharded parameters in place",
    }
    for name, why in refused.items():
        if getattr(args, name, False):
            raise ValueError(f"{name}=True is not supported by ZeroTrainer ({why}); set it False")


class EngineOptimizer(AcceleratedOptimizer):
    """Accelerate's optimizer wrapper over the engine: `step()` is the engine's step at the
    accumulation boundary, `zero_grad()` the engine's, and `step_was_skipped` says whether the
    engine skipped the step (fp16 overflow, a non-finite gradient with nonfinite_grads="skip"),
    so the Trainer holds the LR schedule back as it does for a skipped GradScaler step."""

    def __init__(self, engine: ZeroEngine):
        super().__init__(engine.optimizer, device_placement=False, scaler=None)
        self.engine = engine
        # accelerator.prepare(optimizer) hands it back as it is.
        self._is_accelerate_prepared = True

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ZeroTrainer's optimizer step takes no closure")
        if self.gradient_state.sync_gradients:
            self.engine.step()

    def zero_grad(self, set_to_none=None):
        if self.gradient_state.sync_gradients:
            self.engine.zero_grad(True if set_to_none is None else set_to_none)

    @property
    def step_was_skipped(self) -> bool:
        return self.engine.step_was_skipped


class ZeroTrainer(Trainer):
    """`transformers.Trainer` training with the hf_zero engine (ZeRO stages 0-3).

    Takes the Trainer's arguments, with `args` a `ZeroTrainingArguments`. After `train()`,
    `trainer.model` is still the model (under stage 3 its parameters are shards, gathered
    around each use by the engine's hooks, so `evaluate()`, `predict()` and
    `model.generate(..., synced_gpus=True)` work), `trainer.model_wrapped` is the engine.

    Raises:
        TypeError: `args` is not a ZeroTrainingArguments.
        WorldMismatchError: torch.distributed (or the launcher) has more processes than the
            Trainer sees, so each would train alone.
    """

    def __init__(self, model=None, args: ZeroTrainingArguments | None = None, *a, **kw):
        if not isinstance(args, ZeroTrainingArguments):
            raise TypeError(
                "ZeroTrainer needs args=hf_zero.ZeroTrainingArguments(...) (it adds zero_stage "
                f"and zero_config), got {type(args).__name__}"
            )
        try:
            guard_world(args.world_size, host="the Trainer (TrainingArguments.world_size)")
        except WorldMismatchError as e:
            raise WorldMismatchError(f"{e}; {_FIX_WORLD}") from None
        install_exit_teardown()
        self.zero_config = args.zero_engine_config()
        self.engine: ZeroEngine | None = None
        self._saving_checkpoint = False
        super().__init__(model, args, *a, **kw)

    # ---- building the engine ---------------------------------------------------------------

    def _build_accelerator_args(self, **kwargs) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)
        # The engine holds the low-precision copies and the loss scaler; Accelerate's autocast
        # and GradScaler would compute and scale a second time.
        args["mixed_precision"] = "no"
        return args

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # training_step ends in accelerator.backward(loss): the engine's backward stands for it.
        self.accelerator.backward = self._engine_backward

    def _engine_backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.engine is None:
            raise RuntimeError("ZeroTrainer: backward before the engine was built by train()")
        self.engine.backward(loss)

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        """The engine, built on the first call for training (again for a model from
        `model_init`). Evaluation before training uses the model as it is (nothing is sharded
        yet); afterwards, the engine."""
        if self.engine is not None and model in (self.engine, self.engine.module):
            return self.engine
        if not training:
            return model
        if self.optimizer is None:
            self.create_optimizer()
        self.engine = initialize(model, self.optimizer, config=self.zero_config)
        self.optimizer = EngineOptimizer(self.engine)
        return self.engine

    # ---- the step ----------------------------------------------------------------------------

    def _clip_grad_norm(self, model) -> torch.Tensor:
        return self.engine.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:
            # max_grad_norm=0: the norm is still logged; an infinite bound leaves grads as they
            # are (they are multiplied by exactly 1).
            grad_norm = self.engine.clip_grad_norm_(float("inf"))
        return grad_norm

    # ---- saving ------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial) -> None:
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the folder `model.save_pretrained` would write (weights, config, generation
        config, tokenizer, model card) into `output_dir`, at every stage. Other files there
        are left alone. Collective: every rank calls it, as with the Trainer.

        Within a checkpoint save, writes the engine's sharded checkpoint instead (the
        export with `save_only_model=True`)."""
        if self.engine is None:  # nothing sharded yet: the model saves itself
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._saving_checkpoint and not self.args.save_only_model:
            self.engine.save_checkpoint(output_dir, tokenizer=self._tokenizer())
        else:
            self._export_into(output_dir, card=self._card_info())
        if self.args.should_save:
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The optimizer state is in the engine's checkpoint (one shard file per rank).
        if self.args.should_save:
            with warnings.catch_warnings(record=True) as caught:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            reissue_pt_warnings(caught)

    def _tokenizer(self):
        if self.processing_class is not None:
            return self.processing_class
        return getattr(self.data_collator, "tokenizer", None)

    def _export(self, folder: Path, *, card: CardInfo, checkpoint: str | None = None) -> Path:
        """The export of the current weights (or of `checkpoint`, a sharded checkpoint of this
        step) into the fresh folder `folder`. Collective."""
        if self.is_world_process_zero():
            shutil.rmtree(folder, ignore_errors=True)  # our own staging, left by a crash
        return Path(
            self.engine.export(
                folder,
                tokenizer=self._tokenizer(),
                card=card,
                checkpoint=checkpoint,
                overwrite=True,
            )
        )

    def _export_into(self, output_dir: str, *, card: CardInfo, checkpoint=None) -> list[str]:
        """Export into `output_dir` as `save_pretrained` does: its files are written there,
        weights of an earlier save that this one does not rewrite are removed, anything else
        in the folder (checkpoints, logs) stays. Collective. Returns the file names."""
        out = Path(output_dir)
        staging = self._export(out / EXPORT_STAGING, card=card, checkpoint=checkpoint)
        names: list[str] = []
        if self.is_world_process_zero():
            names = _move_export(staging, out)
        self.accelerator.wait_for_everyone()
        return names

    # ---- resuming ----------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # train() calls this before the engine exists: check the checkpoint now (before any
        # step); the engine loads it in _load_optimizer_and_scheduler, once built.
        manifest = _read_resumable(resume_from_checkpoint)
        model = model if model is not None else self.model
        want = type(model).__name__
        if manifest.model_class != want:
            raise CheckpointError(
                f"resume_from_checkpoint={resume_from_checkpoint!r} holds a "
                f"{manifest.model_class} (saved by {manifest.world_size} ranks at ZeRO stage "
                f"{manifest.stage}) but this Trainer trains a {want}; resume from a checkpoint "
                "of this model, or drop resume_from_checkpoint to start afresh"
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        _engine_load(self.engine, checkpoint, weights_only=False)
        path = os.path.join(checkpoint, SCHEDULER_NAME)
        if os.path.isfile(path):
            with warnings.catch_warnings(record=True) as caught:
                self.lr_scheduler.load_state_dict(torch.load(path, weights_only=True))
            reissue_pt_warnings(caught)
        else:
            logger.warning(
                "%s has no %s: the learning-rate schedule restarts from its first step",
                checkpoint,
                SCHEDULER_NAME,
            )

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        _engine_load(self.engine, best, weights_only=True)

    # ---- the Hub -----------------------------------------------------------------------------

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Export into `output_dir` with a model card and upload the export, nothing else
        (no per-rank shard, no checkpoint, no log). Collective. `kwargs` are the card's, as
        for `Trainer.create_model_card` (language, license, tags, model_name, finetuned_from,
        tasks, dataset_tags, dataset, dataset_args)."""
        if self.engine is None:  # nothing sharded yet: the Trainer's own push
            return super().push_to_hub(commit_message, blocking, token, revision, private, **kwargs)
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._export_into(self.args.output_dir, card=self._card_info(**kwargs))
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        push = functools.partial(
            self._upload,
            self.args.output_dir,
            commit_message=commit_message,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            private=private,
        )
        if blocking:
            return push()
        return _hf_api(token).run_as_future(push)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """hub_strategy="every_save": upload the export of the checkpoint just saved (made from
        its files, no second gather), in the background as the Trainer does."""
        if self.args.hub_strategy == HubStrategy.END:
            return
        staging = self._export(
            Path(self.args.output_dir) / f"{PUSH_STAGING}-{self.state.global_step}",
            card=self._card_info(),
            checkpoint=None if self.args.save_only_model else checkpoint_folder,
        )
        if not self.is_world_process_zero():
            return
        busy = self.push_in_progress is not None and not self.push_in_progress.is_done()
        if busy and not self.args.hub_always_push:
            shutil.rmtree(staging, ignore_errors=True)
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        job = _hf_api(self.args.hub_token).run_as_future(
            self._upload, staging, commit_message=message, remove=True
        )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    def _upload(
        self, folder, *, commit_message, token=None, revision=None, private=None, remove=False
    ):
        try:
            return hub.push_to_hub(
                folder,
                self.hub_model_id,
                private=bool(self.args.hub_private_repo if private is None else private),
                revision=revision if revision is not None else self.args.hub_revision,
                token=token if token is not None else self.args.hub_token,
                commit_message=commit_message,
            )
        finally:
            if remove:
                shutil.rmtree(folder, ignore_errors=True)

    def _card_info(
        self,
        *,
        language: str | list[str] | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> CardInfo:
        """The model card's facts: `create_model_card`'s arguments, the base model, and the
        final train/eval losses and eval metrics of the log history."""
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None)
        if finetuned_from is None and name_or_path and not os.path.isdir(name_or_path):
            finetuned_from = name_or_path
        all_tags = _as_list(tags) + [
            t for t in (getattr(self.model, "model_tags", None) or []) if t not in _as_list(tags)
        ]
        repo_id = self.hub_model_id or self.args.hub_model_id
        if repo_id is None and self.args.push_to_hub:
            repo_id = Path(self.args.output_dir).absolute().name
        train_loss = _last(self.state.log_history, "loss")
        if train_loss is None:
            train_loss = _last(self.state.log_history, "train_loss")
        evals = [h for h in self.state.log_history if "eval_loss" in h]
        metrics = {}
        if evals:
            skip = ("eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
            metrics = {
                k: float(v)
                for k, v in evals[-1].items()
                if k.startswith("eval_") and k not in skip and isinstance(v, int | float)
            }
        return CardInfo(
            base_model=finetuned_from,
            datasets=_as_list(dataset) or _as_list(dataset_tags),
            license=license,
            tags=all_tags,
            language=_as_list(language),
            model_name=model_name
            or (repo_id.split("/")[-1] if repo_id else Path(self.args.output_dir).name),
            repo_id=repo_id,
            pipeline_tag=tasks if isinstance(tasks, str) else None,
            train_loss=train_loss,
            eval_loss=evals[-1]["eval_loss"] if evals else None,
            metrics=metrics,
            memory_stats=self.engine.memory_stats() if self.engine is not None else None,
            notes=self._card_notes(),
        )

    def _card_notes(self) -> str:
        """The Trainer's side of the training setup, which the checkpoint does not record."""
        a = self.args
        per_step = a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps
        schedule = getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)
        optim = getattr(a.optim, "value", a.optim)
        return (
            "Trained with transformers' Trainer through hf_zero's ZeroTrainer: "
            f"learning_rate {a.learning_rate:g} ({schedule} schedule, {a.warmup_steps} warmup "
            f"steps), optim {optim}, weight_decay {a.weight_decay:g}, max_grad_norm "
            f"{a.max_grad_norm:g}; {a.per_device_train_batch_size} examples per device x "
            f"{a.world_size} ranks x {a.gradient_accumulation_steps} accumulation steps = "
            f"{per_step} per optimizer step; {self.state.global_step} optimizer steps, epoch "
            f"{self.state.epoch or 0:.2f}."
        )


# ---- helpers ---------------------------------------------------------------------------------


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _last(history: list[dict], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def _hf_api(token):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _move_export(staging: Path, out: Path) -> list[str]:
    """Move the export in `staging` into `out` (rank 0): weight files of an earlier export that
    this one does not rewrite go (from_pretrained would read them), the rest of `out` stays."""
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    for pattern in hub.STALE_WEIGHT_PATTERNS:
        for old in out.glob(pattern):
            if old.name not in names and old.is_file():
                old.unlink()
    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    staging.rmdir()
    return names


def _read_resumable(path: str):
    """The typed manifest of a checkpoint ZeroTrainer can resume from."""
    try:
        return Manifest.read(path)
    except CheckpointError as e:
        export = os.path.isfile(os.path.join(path, "model.safetensors")) or os.path.isfile(
            os.path.join(path, "model.safetensors.index.json")
        )
        newest = latest_checkpoint(path) if os.path.isdir(path) else None
        if newest is not None:
            why = (
                f"it is a folder of checkpoints (the newest is {newest}); pass that one, or "
                "resume_from_checkpoint=True with output_dir set to this folder"
            )
        elif export:
            why = (
                "it holds a model export (saved with save_only_model=True, or by transformers' "
                "Trainer), which has no optimizer state"
            )
        else:
            why = str(e)
        raise CheckpointError(
            f"resume_from_checkpoint={path!r} is not a checkpoint ZeroTrainer can resume from: "
            f"{why}. Resume from a checkpoint-N folder saved by ZeroTrainer with "
            "save_only_model=False"
        ) from None


def _engine_load(engine: ZeroEngine, path: str, *, weights_only: bool) -> None:
    """`engine.load_checkpoint` without its RNG restore: the Trainer restores its own RNG
    (rng_state_R.pth) at the right point of its batch skipping."""
    engine.load_checkpoint(path, weights_only=weights_only, restore_rng=False)
