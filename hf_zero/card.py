"""Model cards: the README.md of an exported folder, with real metadata and the training setup.

`write_card(folder, manifest, info)` renders the card template (packaged with hf_zero as
`hf_zero/templates/modelcard_template.md`, read with importlib.resources so it works from an
installed wheel; `model_cards/modelcard_template.md` in the repository is the same file, for users
to copy and edit) with `huggingface_hub.ModelCard.from_template`.

What goes where:
  - YAML header (`ModelCardData`): base_model, datasets, license, language, tags (always "hf_zero"
    and the ZeRO stage), library_name "transformers", the pipeline tag (given, or known from the
    model class), a model-index entry with the eval loss and metrics when given, and an `hf_zero`
    block with the training setup (stage, world size, precision, steps, parameters, model-state
    bytes per rank), so that a later card for the same export can be written without the
    checkpoint.
  - Body: a usage snippet and the training setup table, from the checkpoint's manifest (stage,
    world size, precision, steps, parameters, optimizer) plus `CardInfo` (losses, metrics, notes).

Model-state bytes per rank are the engine's measured `memory_stats()` when `CardInfo.memory_stats`
gives them, otherwise the ZeRO accounting (`hf_zero.estimate.model_state_bytes`) for Adam-type
optimizers, otherwise left out. Nothing here imports transformers or torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint.format import Manifest

__all__ = ["CardInfo", "write_card", "render_card", "template_text", "TEMPLATE_NAME"]

TEMPLATE_NAME = "modelcard_template.md"
LIBRARY_NAME = "transformers"
# Optimizers whose state is two fp32 moments per parameter: what the ZeRO accounting assumes.
_ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam")
_PRECISION = {
    "no": "no (fp32)",
    "bf16": "bf16 compute, fp32 master weights",
    "fp16": "fp16 compute with loss scaling, fp32 master weights",
}
# Model class suffix -> (pipeline tag, Auto class), checked in this order.
_TASKS = (
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForConditionalGeneration", "text2text-generation", "AutoModelForSeq2SeqLM"),
)


@dataclass(kw_only=True)
class CardInfo:
    """What a model card says beyond what the checkpoint records."""

    base_model: str | None = None
    """Hub id of the model this one was fine-tuned from (e.g. "gpt2")."""

    datasets: list[str] = field(default_factory=list)
    """Hub ids (or names) of the training data sets; the first also names the eval set."""

    license: str | None = None
    """A Hub license id ("apache-2.0", "mit", ...)."""

    tags: list[str] = field(default_factory=list)
    """Extra tags; "hf_zero" and "zero-stage-N" are always added."""

    language: list[str] = field(default_factory=list)
    """ISO 639-1 codes ("en", ...)."""

    model_name: str | None = None
    """Title of the card and name in the model-index (default: the repo or folder name)."""

    repo_id: str | None = None
    """Where the model lives on the Hub, for the usage snippet (set by `push_to_hub`)."""

    pipeline_tag: str | None = None
    """Hub task; by default known from the model class (causal LM: "text-generation", ...)."""

    library_name: str = LIBRARY_NAME
    """The library that loads the folder ("peft" for an adapter export)."""

    train_loss: float | None = None
    """Final training loss."""

    eval_loss: float | None = None
    """Final eval loss: goes into the model-index."""

    metrics: dict[str, float] = field(default_factory=dict)
    """Further eval metrics by name ("accuracy": 0.91, ...): the table and the model-index."""

    memory_stats: Mapping[str, float] | None = None
    """Measured model-state bytes of one rank (`engine.memory_stats()`); without it the card
    gives the ZeRO accounting for Adam-type optimizers."""

    notes: str | None = None
    """Free text (markdown) for a Notes section."""

    template: str | os.PathLike | None = None
    """A card template of your own (Jinja2, like model_cards/modelcard_template.md); default the
    packaged one."""

    def __post_init__(self) -> None:
        for name in ("datasets", "tags", "language"):
            value = getattr(self, name)
            if isinstance(value, str):  # a lone string, not split into characters
                setattr(self, name, [value])
            elif not all(isinstance(v, str) for v in value):
                raise TypeError(f"CardInfo.{name} must be a list of strings, got {value!r}")
        for name in ("train_loss", "eval_loss"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int | float):
                raise TypeError(f"CardInfo.{name} must be a number or None, got {value!r}")


def template_text() -> str:
    """The packaged card template."""
    return resources.files("hf_zero").joinpath("templates", TEMPLATE_NAME).read_text("utf-8")


def _setup_from_manifest(manifest: Manifest) -> dict[str, Any]:
    """The training setup a checkpoint records, as plain JSON values."""
    groups = manifest.optimizer.param_groups
    setup = {
        "zero_stage": manifest.stage,
        "world_size": manifest.world_size,
        "mixed_precision": manifest.mixed_precision,
        "steps": manifest.step,
        "skipped_steps": manifest.skipped_steps,
        "model_class": manifest.model_class or None,
        "num_parameters": manifest.layout.numel,
        "trainable_parameters": manifest.layout.trainable_numel(),
        "optimizer": manifest.optimizer.cls.rsplit(".", 1)[-1],  # "torch.optim.adamw.AdamW"
    }
    if groups:
        hyper = {k: groups[0][k] for k in ("lr", "weight_decay") if k in groups[0]}
        setup["optimizer_hyperparameters"] = hyper
    return setup


def _setup_from_card(folder: Path) -> dict[str, Any]:
    """The training setup an earlier hf_zero card in `folder` recorded in its metadata."""
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    setup = None
    if readme.is_file():
        setup = ModelCard.load(readme).data.to_dict().get("hf_zero")
    if not isinstance(setup, dict) or "zero_stage" not in setup:
        raise ValueError(
            f"{folder} has no README.md with hf_zero's training setup in its metadata; pass the "
            "checkpoint's manifest (hf_zero.checkpoint.Manifest.read(checkpoint_dir))"
        )
    return setup


def _task(model_class: str | None) -> tuple[str | None, str]:
    for suffix, tag, auto in _TASKS:
        if model_class and model_class.endswith(suffix):
            return tag, auto
    return None, "AutoModel"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def _model_state_bytes(setup: dict, info: CardInfo) -> tuple[int | None, int | None, str]:
    """(this run's bytes per rank, plain data parallelism's, how the first was obtained)."""
    from .estimate import model_state_bytes

    kwargs = {"mixed_precision": setup["mixed_precision"]}
    adam = setup.get("optimizer") in _ADAM_LIKE
    numel = setup["trainable_parameters"]
    ddp = model_state_bytes(numel, world_size=setup["world_size"], stage=0, **kwargs)
    ddp_total = int(ddp["total_bytes"]) if adam else None
    if info.memory_stats is not None:
        return int(info.memory_stats["total_bytes"]), ddp_total, "measured"
    if setup.get("model_state_bytes_source") == "measured":  # recorded by an earlier card
        return setup["model_state_bytes_per_rank"], ddp_total, "measured"
    if not adam:
        return None, None, ""
    ours = model_state_bytes(
        numel, world_size=setup["world_size"], stage=setup["zero_stage"], **kwargs
    )
    return int(ours["total_bytes"]), ddp_total, "ZeRO accounting"


def _fmt_loss(x: float | None) -> str | None:
    return None if x is None else f"{x:.4f}"


def _fmt_optimizer(setup: dict) -> str | None:
    if not setup.get("optimizer"):
        return None
    hyper = setup.get("optimizer_hyperparameters") or {}
    inner = ", ".join(
        f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in hyper.items()
    )
    return f"{setup['optimizer']} ({inner})" if inner else setup["optimizer"]


def _model_name(folder: Path, info: CardInfo) -> str:
    if info.model_name:
        return info.model_name
    if info.repo_id:
        return info.repo_id.split("/")[-1]
    # consolidate writes the card into `<out>.tmp-<hex>` before renaming it to `<out>`
    return re.sub(r"\.tmp-[0-9a-f]+$", "", folder.resolve().name)


def render_card(folder: str | os.PathLike, manifest: Manifest | None, info: CardInfo | None = None):
    """The `huggingface_hub.ModelCard` that `write_card` writes (not saved)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder, info = Path(folder), info or CardInfo()
    setup = _setup_from_card(folder) if manifest is None else _setup_from_manifest(manifest)
    ours, ddp, how = _model_state_bytes(setup, info)
    setup["model_state_bytes_per_rank"] = ours
    setup["model_state_bytes_source"] = how or None
    pipeline_tag, auto_class = _task(setup.get("model_class"))
    pipeline_tag = info.pipeline_tag or pipeline_tag
    name = _model_name(folder, info)
    eval_metrics = {"loss": info.eval_loss} if info.eval_loss is not None else {}
    eval_metrics.update(info.metrics)
    dataset = info.datasets[0] if info.datasets else "custom"
    eval_results = [
        EvalResult(
            task_type=pipeline_tag or "other",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=metric,
            metric_value=value,
        )
        for metric, value in eval_metrics.items()
    ]
    tags = ["hf_zero", f"zero-stage-{setup['zero_stage']}", *info.tags]
    data = ModelCardData(
        base_model=info.base_model,
        datasets=info.datasets or None,
        license=info.license,
        language=info.language or None,
        library_name=info.library_name,
        pipeline_tag=pipeline_tag,
        tags=tags,
        model_name=name,
        eval_results=eval_results or None,
        hf_zero={k: v for k, v in setup.items() if v is not None},
    )
    template = Path(info.template).read_text("utf-8") if info.template else template_text()
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=name,
        repo_id=info.repo_id,
        auto_class=auto_class,
        base_model=info.base_model,
        datasets=info.datasets,
        zero_stage=setup["zero_stage"],
        world_size=setup["world_size"],
        mixed_precision=_PRECISION.get(setup["mixed_precision"], setup["mixed_precision"]),
        steps=setup["steps"],
        skipped_steps=setup.get("skipped_steps"),
        model_class=setup.get("model_class"),
        num_parameters=f"{setup['num_parameters']:,}",
        trainable_parameters=f"{setup['trainable_parameters']:,}",
        optimizer=_fmt_optimizer(setup),
        model_state_bytes=None if ours is None else f"{_human(ours)} ({how})",
        ddp_model_state_bytes=None if ddp is None else f"{_human(ddp)} (ZeRO accounting)",
        train_loss=_fmt_loss(info.train_loss),
        eval_loss=_fmt_loss(info.eval_loss),
        extra_metrics=[(k, f"{v:.4g}") for k, v in info.metrics.items()],
        notes=info.notes,
    )


def write_card(
    folder: str | os.PathLike, manifest: Manifest | None, info: CardInfo | None = None
) -> Path:
    """Write `folder/README.md`: the model card of an export.

    Args:
        folder: the export folder (or the temporary folder an export is written into).
        manifest: the checkpoint's manifest (`hf_zero.checkpoint.Manifest`), for the training
            setup; None takes the setup from the hf_zero card already in
            `folder` (to re-write a card with other `info`).
        info: what the checkpoint does not record (base model, datasets, losses, ...).

    Returns:
        The path of the README.md written.

    Raises:
        ValueError: `manifest` is None and `folder` has no card written by hf_zero.
        FileNotFoundError: `info.template` does not exist.
    """
    card = render_card(folder, manifest, info)
    path = Path(folder) / "README.md"
    path.write_text(str(card), encoding="utf-8")
    return path


def with_repo_id(info: CardInfo | None, repo_id: str) -> CardInfo:
    """`info` (or an empty CardInfo) naming `repo_id` for the usage snippet."""
    return dataclasses.replace(info or CardInfo(), repo_id=repo_id)
