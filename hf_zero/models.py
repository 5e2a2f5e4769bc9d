"""Models by name: where a `--model` name leads, and loading it for a task.

A name is an embedded preset (`embedded:tiny-gpt2`, `embedded:minilm`: `hf_zero.presets`), a
local model folder, a bare config.json (enough for `hf-zero estimate`), or a Hub id. Offline-aware:
a Hub id is tried only when the Hub answers (one TCP connect, 3 s); offline, a model in the local
Hugging Face cache still loads, and anything else is a `SourceError` that says the machine is
offline and how to point at a local folder, at once, instead of a minute of retries.

Loading for a task also fixes what would otherwise warn or mislead on every rank: a pad token
for GPT-style tokenizers, the causal-LM loss type transformers cannot derive from
"GPT2LMHeadModel", and the Trainer's loss scaling for heads whose loss is a local mean.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import presets
from .presets import SourceError

__all__ = [
    "AUTO_CLASSES",
    "ModelSource",
    "SourceError",
    "hub_unreachable",
    "load_config",
    "load_model",
    "resolve_model",
]


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where a `--model` name leads."""

    name: str
    """As the user gave it."""

    kind: Literal["embedded", "folder", "config_file", "hub"]
    """An embedded preset, a local model folder, a bare config.json, or a Hub id."""

    path: str
    """What `from_pretrained` gets: the folder, the file, or the Hub id."""

    local_files_only: bool = False
    """A Hub id found in the local cache while the Hub cannot be reached."""


@functools.cache
def hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, or None when it answers.

    Offline mode (HF_HUB_OFFLINE) counts as unreachable. Otherwise one TCP connect to the
    endpoint (HF_ENDPOINT) decides, within `timeout_s`. Behind an HTTP(S) proxy the direct
    connect says nothing, so the Hub is assumed reachable. Cached for the process.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(constants.ENDPOINT)
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"no network: {host}:{port} cannot be reached ({e.strerror or e})"
    return None


def _presets_line() -> str:
    return ", ".join(presets.MODEL_PRESETS)


def _looks_like_path(name: str) -> bool:
    # A Hub id is "name" or "org/name"; anything else can only be meant as a path.
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith(".json")
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def _is_cached_on_hub(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_model(
    name: str, *, flag: str = "--model", allow_config_file: bool = False
) -> ModelSource:
    """Where `name` leads: an embedded preset, a local folder or config.json, or a Hub id.

    Args:
        name: `embedded:<preset>`, a folder holding config.json, a config.json (only with
            `allow_config_file`), or a Hub id ("gpt2", "org/name").
        flag: the command-line flag that gave it, for the messages.
        allow_config_file: accept a bare config.json (enough for `hf-zero estimate`).

    Raises:
        SourceError: an unknown preset; a path that does not exist, a folder without
            config.json, or a config.json where a model folder is needed; a Hub id while the
            Hub cannot be reached and the model is not in the local cache.
    """
    if not isinstance(name, str) or not name.strip():
        raise SourceError(f"{flag} must name a model, got {name!r}; try {_presets_line()}")
    if name.startswith(presets.EMBEDDED_PREFIX):
        if name not in presets.MODEL_PRESETS:
            raise SourceError(
                f"{flag} {name!r} is not an embedded preset; the embedded models are "
                f"{_presets_line()}"
            )
        return ModelSource(name=name, kind="embedded", path=name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(
                f"{flag} {name!r} is a folder without config.json: point it at a model folder "
                "(what save_pretrained writes: config.json, weights, tokenizer files)"
            )
        return ModelSource(name=name, kind="folder", path=str(path))
    if path.is_file():
        if allow_config_file and path.suffix == ".json":
            return ModelSource(name=name, kind="config_file", path=str(path))
        wanted = "a model folder or its config.json" if allow_config_file else "a model folder"
        raise SourceError(
            f"{flag} {name!r} is a file; it needs {wanted} (config.json, weights and tokenizer "
            "files, as save_pretrained writes them)"
        )
    if _looks_like_path(name):
        raise SourceError(
            f"{flag} {name!r}: no such file or folder; pass a model folder (with config.json)"
            + (" or a config.json" if allow_config_file else "")
            + f", a Hub id, or an embedded preset ({_presets_line()})"
        )
    reason = hub_unreachable()
    if reason is None:
        return ModelSource(name=name, kind="hub", path=name)
    if _is_cached_on_hub(name):
        return ModelSource(name=name, kind="hub", path=name, local_files_only=True)
    local = (
        "a local model folder (with config.json) or its config.json"
        if allow_config_file
        else "a local model folder (config.json, the weights and the tokenizer files)"
    )
    raise SourceError(
        f"{flag} {name!r} is not a local folder, and this machine is offline ({reason}): the "
        f"Hugging Face Hub cannot be reached and {name!r} is not in the local cache. Point "
        f"{flag} at {local}, saved with save_pretrained where the Hub is reachable, or "
        f"use an embedded preset: {_presets_line()}"
    )


def load_config(source: ModelSource):
    """The model's `PretrainedConfig` (nothing else is read or downloaded).

    Raises:
        SourceError: the folder, file or Hub repo has no readable config.
    """
    if source.kind == "embedded":
        return presets.preset_config(source.name)
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(
            source.path, local_files_only=source.local_files_only
        )
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(
            f"cannot read a model config from {source.name!r}: pass a local model folder, a "
            f"config.json, a Hub id, or an embedded preset ({_presets_line()}). ({e})"
        ) from None


AUTO_CLASSES = {
    "clm": "AutoModelForCausalLM",
    "cls": "AutoModelForSequenceClassification",
    "mlm": "AutoModelForMaskedLM",
}


def load_model(
    source: ModelSource,
    task: str,
    *,
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
    seed: int = 0,
):
    """(model, tokenizer) for fine-tuning `source` on `task` ("clm", "cls" or "mlm").

    Embedded presets are built (tiny GPT-2) or loaded from the installed package (MiniLM);
    anything else loads with the task's Auto class and `AutoTokenizer`. A tokenizer without a
    pad token gets its eos token as pad (GPT-style models), as the collators need one.

    Raises:
        SourceError: the preset does not do `task`, or the weights or tokenizer cannot be read.
    """
    import transformers

    head = {}
    if task == "cls":
        if num_labels is None:
            raise ValueError("task 'cls' needs num_labels")
        head = {"num_labels": num_labels}
        if id2label is not None:
            head["id2label"] = dict(id2label)
            head["label2id"] = {v: k for k, v in id2label.items()}
    if source.kind == "embedded":
        preset = presets.MODEL_PRESETS[source.name]
        if task not in preset.tasks:
            raise SourceError(
                f"--task {task} does not fit {source.name}, which does {' and '.join(preset.tasks)}"
            )
        if source.name == "embedded:tiny-gpt2":
            model, tokenizer = presets.build_tiny_gpt2(seed=seed)
        else:
            model, tokenizer = presets.load_minilm(task, **head)
    else:
        kwargs = {"local_files_only": source.local_files_only}
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.path, **kwargs)
            model = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(
                source.path, **kwargs, **head
            )
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot load {source.name!r} for --task {task}: {e}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if task == "clm" and getattr(model, "loss_type", "") is None:
        # transformers picks the loss from the class name, and "...LMHeadModel" names none
        # (it would warn once per rank and then use this same loss).
        model.loss_type = "ForCausalLM"
    if not _loss_uses_num_items(model):
        # The Trainer passes a model that takes **kwargs the global count of label tokens
        # (num_items_in_batch) and multiplies its loss by the world size, assuming the loss is a
        # sum over that count. BERT's heads ignore the count and return their local mean, so
        # the loss would be logged, and its gradient taken, N times too large. Declared here,
        # the Trainer treats the loss as the local mean it is, and the engine averages the
        # gradients over ranks as DDP does.
        model.accepts_loss_kwargs = False
    return model, tokenizer


def _loss_uses_num_items(model) -> bool:
    """Whether the model's forward computes its loss with transformers' loss functions, which
    take `num_items_in_batch` (True when the source cannot be read: the Trainer's default)."""
    import inspect

    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True
    return "self.loss_function(" in source
