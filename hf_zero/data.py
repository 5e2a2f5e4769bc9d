"""What a fine-tune needs between a data set and the Trainer.

A fine-tune reads text (and, for classification, labels) from a Hub data set, local json / jsonl /
csv / txt files, or an embedded data set (`hf_zero.presets`), and gives the Trainer tokenized
train and eval sets plus a collator. Every step is a function that tests reach without a process
group:

1. `load_raw_dataset`: the raw `DatasetDict` ("train", and "validation" when the source has
   one). A Hub name while the Hub cannot be reached is a `DataError` that says so at once and
   how to point at local files, instead of a minute of retries.
2. `check_columns`: the text column (and the label column for "cls") exist in every split; an
   absent one names the columns that do. `class_names` reads the classes of the label column.
3. `infer_task` / `check_task`: "clm" for decoder models, "cls" or "mlm" for encoders (cls when
   the data set has a label column), from the model config alone.
4. `split_train_eval`: the source's validation split, or a seeded fraction of train, split before
   tokenizing so that no document straddles the two.
5. `tokenize_dataset`: "clm" and "mlm" tokenize every document and cut the concatenation into
   blocks of `block_size` tokens (`group_texts`, a pure function); "cls" truncates each text to
   `max_length` tokens and maps labels to class ids.
6. `build_collator`: fixed blocks for "clm", dynamic padding for "cls", random masking for "mlm".

`prepare_datasets` runs 4-6. Nothing here is imported by `import hf_zero`; datasets and
transformers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import models, presets

__all__ = [
    "TASKS",
    "DATA_EXTENSIONS",
    "Columns",
    "DataError",
    "PreparedData",
    "build_collator",
    "check_columns",
    "check_eval_fraction",
    "check_task",
    "class_names",
    "group_texts",
    "infer_task",
    "load_raw_dataset",
    "prepare_datasets",
    "resolve_block_size",
    "split_train_eval",
    "tokenize_dataset",
]

TASKS = ("clm", "cls", "mlm")
TASK_NAMES = {"clm": "causal LM", "cls": "sequence classification", "mlm": "masked LM"}
# Local file extension -> the `datasets` builder that reads it.
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
# Positions a model can attend to, by config attribute name (first found wins).
_MAX_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")
DEFAULT_MAX_TOKENS = 1024  # block_size / max_length when neither the user nor the model bounds it


class DataError(ValueError):
    """A data set, column or task that cannot work: the message names it and the fix."""


# ---- 1. loading --------------------------------------------------------------------------------


def _extension_list() -> str:
    return ", ".join(sorted({e.lstrip(".") for e in DATA_EXTENSIONS}))


def _looks_like_file(name: str) -> bool:
    return (
        Path(name).suffix.lower() in DATA_EXTENSIONS
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
    )


def _builder_for(files: Sequence[Path]) -> str:
    builders = set()
    for f in files:
        ext = f.suffix.lower()
        if ext not in DATA_EXTENSIONS:
            raise DataError(
                f"--dataset file {str(f)!r} has the extension {ext or '(none)'!r}; local data "
                f"files must be {_extension_list()}"
            )
        builders.add(DATA_EXTENSIONS[ext])
    if len(builders) > 1:
        raise DataError(
            f"--dataset files mix formats ({', '.join(str(f) for f in files)}); pass files of "
            "one format (json/jsonl, csv or txt)"
        )
    return builders.pop()


def _check_files(files: Sequence[str], flag: str) -> list[Path]:
    paths = [Path(f).expanduser() for f in files]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DataError(
            f"{flag} file not found: {', '.join(repr(m) for m in missing)}; pass existing "
            f"{_extension_list()} files (or a Hub data set name)"
        )
    return paths


def load_raw_dataset(
    dataset: str | Sequence[str],
    *,
    config_name: str | None = None,
    validation_file: str | None = None,
    cache_dir: str | None = None,
):
    """The raw data set as a `datasets.DatasetDict` with a "train" split (and "validation" when
    the source has one or `validation_file` is given).

    Args:
        dataset: an embedded data set ("embedded:docstrings", "embedded:docstring-topics"),
            one or more local json / jsonl / csv / txt files of one format, a local folder that
            `datasets.load_dataset` reads, or a Hub data set name.
        config_name: the Hub data set's configuration ("wikitext-2-raw-v1", ...).
        validation_file: a local file of the same format for the "validation" split.
        cache_dir: the `datasets` cache (default ~/.cache/huggingface/datasets).

    Raises:
        DataError: a file that does not exist, an unsupported or mixed extension, a data set
            without a "train" split, a Hub name while the Hub cannot be reached, or one the Hub
            does not have.
    """
    import datasets

    names = [dataset] if isinstance(dataset, str) else list(dataset)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"--dataset must name a data set or files, got {dataset!r}")
    first = names[0]
    if first.startswith(presets.EMBEDDED_PREFIX):
        if len(names) > 1 or validation_file or config_name:
            raise DataError(
                f"--dataset {first} is embedded: it takes no further files, --validation_file "
                "or --dataset_config"
            )
        try:
            return presets.embedded_dataset(first)
        except presets.SourceError as e:
            raise DataError(str(e)) from None
    local = len(names) > 1 or Path(first).expanduser().exists() or _looks_like_file(first)
    if local:
        paths = _check_files(names, "--dataset")
        if len(paths) == 1 and paths[0].is_dir():
            if validation_file:
                raise DataError("--validation_file goes with --dataset files, not a folder")
            raw = _load(datasets.load_dataset, str(paths[0]), cache_dir=cache_dir)
        else:
            data_files: dict[str, list[str]] = {"train": [str(p) for p in paths]}
            if validation_file:
                val = _check_files([validation_file], "--validation_file")
                data_files["validation"] = [str(val[0])]
                paths = [*paths, *val]
            builder = _builder_for(paths)
            raw = _load(datasets.load_dataset, builder, data_files=data_files, cache_dir=cache_dir)
    else:
        if validation_file:
            raise DataError(
                "--validation_file goes with local --dataset files; a Hub data set brings its "
                "own validation split"
            )
        reason = models.hub_unreachable()
        if reason is not None and reason != "HF_HUB_OFFLINE is set":
            raise DataError(
                f"--dataset {first!r} is not a local file, and this machine is offline "
                f"({reason}): the Hugging Face Hub cannot be reached. Point --dataset at local "
                f"files ({_extension_list()}; e.g. --dataset train.jsonl), use an embedded data "
                f"set ({', '.join(presets.DATASET_PRESETS)}), or, if the data set is in the "
                "local Hugging Face cache, set HF_HUB_OFFLINE=1"
            )
        try:
            raw = datasets.load_dataset(first, config_name, cache_dir=cache_dir)
        except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
            offline = " (offline: HF_HUB_OFFLINE is set and it is not cached)" if reason else ""
            raise DataError(
                f"cannot load the Hub data set {first!r}"
                + (f" (config {config_name!r})" if config_name else "")
                + f"{offline}: {e}. Check the name, or point --dataset at local files "
                f"({_extension_list()})"
            ) from None
    if not isinstance(raw, datasets.DatasetDict) or "train" not in raw:
        splits = ", ".join(raw) if isinstance(raw, datasets.DatasetDict) else "none"
        raise DataError(f"--dataset {first!r} has no 'train' split (splits: {splits})")
    return raw


def _load(load: Callable[..., Any], *args: Any, **kwargs: Any):
    try:
        return load(*args, **kwargs)
    except Exception as e:  # the builders raise many types for one cause: an unreadable file
        raise DataError(f"cannot read the --dataset files: {type(e).__name__}: {e}") from None


# ---- 2. columns and classes --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Columns:
    """The columns a fine-tune reads."""

    text: str
    label: str | None = None


def check_columns(
    raw, *, task: str, text_column: str | None = None, label_column: str | None = None
) -> Columns:
    """Check that every split of `raw` has the columns `task` reads.

    Args:
        raw: a DatasetDict.
        task: "clm", "cls" or "mlm".
        text_column: default "text".
        label_column: "cls" only; default "label".

    Raises:
        DataError: a column is absent (the message names the columns that exist), or `task`
            is "cls" and there is no label column.
    """
    _check_task_name(task)
    text = text_column or "text"
    for split, ds in raw.items():
        columns = ", ".join(ds.column_names) or "none"
        if text not in ds.column_names:
            how = "pass --text_column NAME" if text_column is None else "pick one of them"
            raise DataError(
                f"text column {text!r} is not in the {split!r} split (columns: {columns}); {how}"
            )
        if task != "cls":
            continue
        label = label_column or "label"
        if label not in ds.column_names:
            raise DataError(
                f"--task cls needs a label column, and {label!r} is not in the {split!r} split "
                f"(columns: {columns}); pass --label_column NAME, or use --task mlm/clm to "
                "train on the text alone"
            )
    return Columns(text=text, label=(label_column or "label") if task == "cls" else None)


def class_names(raw, label_column: str) -> list[str]:
    """The class names of `label_column` across all splits, index = class id.

    A `ClassLabel` column keeps its names; integer or string labels are sorted (integers
    0..K-1 keep their ids).

    Raises:
        DataError: fewer than 2 classes, missing labels, or non-class values (floats, lists).
    """
    import datasets

    first = next(iter(raw.values()))
    feature = first.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values: set[Any] = set()
    for ds in raw.values():
        values.update(ds.unique(label_column))
    if None in values:
        raise DataError(f"label column {label_column!r} has empty values; every row needs a label")
    kinds = {type(v) for v in values}
    if not (kinds <= {int, bool} or kinds <= {str}):
        shown = ", ".join(sorted(k.__name__ for k in kinds))
        raise DataError(
            f"label column {label_column!r} holds {shown} values; --task cls needs class "
            "labels (integers or strings)"
        )
    names = [str(v) for v in sorted(values)]
    if len(names) < 2:
        raise DataError(
            f"label column {label_column!r} has only one class ({', '.join(names)}); "
            "classification needs at least 2"
        )
    return names


# ---- 3. task -----------------------------------------------------------------------------------


def _check_task_name(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")


def _auto_mappings() -> dict[str, Any]:
    from transformers.models.auto import modeling_auto as m

    return {
        "clm": m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "cls": m.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "mlm": m.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    }


# Architecture name suffix -> task, for configs saved from a model with a head.
_ARCH_TASKS = (
    ("ForCausalLM", "clm"),
    ("LMHeadModel", "clm"),
    ("ForSequenceClassification", "cls"),
    ("ForMaskedLM", "mlm"),
)


def infer_task(config, *, has_label_column: bool) -> str:
    """The task to fine-tune `config`'s model for when --task is not given.

    A config saved from a model with a head (`architectures`) says it. Otherwise an encoder
    (a model type with a masked-LM class, BERT-style) does "cls" when the data set has a label
    column and "mlm" when not, and a decoder (GPT-style) does "clm".

    Raises:
        DataError: the model type has none of the three heads.
    """
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCH_TASKS:
            if arch.endswith(suffix):
                return task
    maps = _auto_mappings()
    model_type = getattr(config, "model_type", None)
    if model_type in maps["mlm"]:
        return "cls" if has_label_column else "mlm"
    if model_type in maps["clm"]:
        return "clm"
    raise DataError(
        f"cannot infer --task for a {model_type!r} model: it has no causal-LM, classification "
        f"or masked-LM class in transformers; pass --task {'/'.join(TASKS)}"
    )


def check_task(config, task: str) -> None:
    """Check that transformers has a `task` head for `config`'s model type.

    Raises:
        DataError: it has none (the message names the tasks that fit).
    """
    _check_task_name(task)
    maps = _auto_mappings()
    model_type = getattr(config, "model_type", None)
    if model_type not in maps[task]:
        fits = [t for t in TASKS if model_type in maps[t]]
        raise DataError(
            f"--task {task} ({TASK_NAMES[task]}) does not fit a {model_type!r} model: "
            f"transformers has no such head for it; "
            + (f"use --task {' or '.join(fits)}" if fits else "pick another model")
        )


def resolve_block_size(value: int | None, tokenizer, config, *, flag: str = "--block_size") -> int:
    """The sequence length to use: `value`, checked against what the model can attend to, or
    by default the smaller of the model's limit, the tokenizer's and DEFAULT_MAX_TOKENS.

    Raises:
        DataError: `value` is not positive, or longer than the model's position embeddings.
    """
    limit = next(
        (int(getattr(config, a)) for a in _MAX_POSITION_ATTRS if getattr(config, a, None)), None
    )
    tok_limit = getattr(tokenizer, "model_max_length", None)
    bounds = [b for b in (limit, tok_limit, DEFAULT_MAX_TOKENS) if b]
    if value is None:
        return min(bounds)
    if type(value) is not int or value < 1:
        raise DataError(f"{flag} must be a positive number of tokens, got {value!r}")
    if limit is not None and value > limit:
        raise DataError(
            f"{flag} {value} is longer than the model's {limit} positions; pass {flag} {limit} "
            "or less"
        )
    return value


# ---- 4. split ----------------------------------------------------------------------------------


def check_eval_fraction(eval_fraction: float) -> None:
    """Raises DataError unless `eval_fraction` is in [0, 1)."""
    ok = isinstance(eval_fraction, int | float) and not isinstance(eval_fraction, bool)
    if not (ok and 0 <= eval_fraction < 1):
        raise DataError(f"--eval_fraction must be in [0, 1), got {eval_fraction!r}")


def split_train_eval(raw, *, eval_fraction: float = 0.05, seed: int = 0):
    """(train, eval) raw splits: the source's "validation" split if it has one, otherwise a
    seeded `eval_fraction` of "train" (0: no eval set, None returned).

    Raises:
        DataError: `eval_fraction` outside [0, 1), or too few rows to split.
    """
    check_eval_fraction(eval_fraction)
    train = raw["train"]
    if "validation" in raw:
        return train, raw["validation"]
    if eval_fraction == 0:
        return train, None
    n_eval = int(round(len(train) * eval_fraction))
    if n_eval < 1 or n_eval >= len(train):
        raise DataError(
            f"--eval_fraction {eval_fraction} of {len(train)} rows leaves "
            f"{n_eval} eval rows; pass a validation split (--validation_file) or another "
            "fraction (0 for no eval)"
        )
    parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# ---- 5. tokenize -------------------------------------------------------------------------------


def group_texts(
    examples: dict[str, list[list[Any]]], block_size: int
) -> dict[str, list[list[Any]]]:
    """Concatenate every column's token lists and cut them into blocks of `block_size`; the
    tail shorter than a block is dropped. Pure (a batched `datasets.map` function).

    >>> group_texts({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8]]}, 3)
    {'input_ids': [[1, 2, 3], [4, 5, 6]]}
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    concatenated = {k: [x for row in rows for x in row] for k, rows in examples.items()}
    lengths = {len(v) for v in concatenated.values()}
    assert len(lengths) <= 1, f"columns of unequal token counts: {lengths}"
    total = (lengths.pop() if lengths else 0) // block_size * block_size
    return {
        k: [v[i : i + block_size] for i in range(0, total, block_size)]
        for k, v in concatenated.items()
    }


@contextlib.contextmanager
def _no_sequence_length_warning() -> Iterator[None]:
    """Documents longer than the model are tokenized whole and then cut into blocks, so
    transformers' "Token indices sequence length is longer than ..." warning does not apply."""
    logger = logging.getLogger("transformers.tokenization_utils_base")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def tokenize_dataset(
    ds,
    tokenizer,
    *,
    task: str,
    text_column: str = "text",
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    block_size: int = 128,
    max_length: int = 128,
    desc: str = "",
):
    """Tokenize one split for `task`.

    - "clm": every document, an eos token appended when the tokenizer adds none, is
      concatenated and cut into `block_size` blocks with labels = input_ids.
    - "mlm": the same blocks (with the tokenizer's own [CLS]/[SEP]) and a special-tokens mask,
      no labels (the collator masks).
    - "cls": each text truncated to `max_length` tokens, "labels" the class id of
      `label_column` among `class_names`.

    Raises:
        DataError: the split gives not one full block, or a label outside `class_names`.
    """
    import datasets

    _check_task_name(task)
    columns = ds.column_names
    if task == "cls":
        if label_column is None or class_names is None:
            raise ValueError("task 'cls' needs label_column and class_names")
        feature = ds.features[label_column]
        is_class_label = isinstance(feature, datasets.ClassLabel)
        index = {name: i for i, name in enumerate(class_names)}

        def encode(batch):
            enc = tokenizer(batch[text_column], truncation=True, max_length=max_length)
            labels = batch[label_column]
            if not is_class_label:
                unknown = {str(v) for v in labels} - index.keys()
                if unknown:
                    raise DataError(
                        f"labels {sorted(unknown)} of {label_column!r} are not among the "
                        f"classes {list(class_names)}"
                    )
                labels = [index[str(v)] for v in labels]
            enc["labels"] = list(labels)
            return enc

        return ds.map(encode, batched=True, remove_columns=columns, desc=f"tokenize {desc}".strip())

    eos = tokenizer.eos_token_id if task == "clm" else None
    adds_eos = eos is not None and tokenizer("a")["input_ids"][-1:] == [eos]

    def encode(batch):
        enc = tokenizer(batch[text_column], return_special_tokens_mask=task == "mlm")
        if eos is not None and not adds_eos:
            for key in enc:
                fill = {"input_ids": eos, "attention_mask": 1, "special_tokens_mask": 1}.get(key, 0)
                enc[key] = [row + [fill] for row in enc[key]]
        return dict(enc)

    with _no_sequence_length_warning():
        tokens = ds.map(
            encode, batched=True, remove_columns=columns, desc=f"tokenize {desc}".strip()
        )
    blocks = tokens.map(
        _group_for_task,
        batched=True,
        fn_kwargs={"block_size": block_size, "labels": task == "clm"},
        desc=f"blocks of {block_size} tokens {desc}".strip(),
    )
    if len(blocks) == 0:
        n = sum(len(r) for r in tokens["input_ids"])
        raise DataError(
            f"the {desc or 'data'} split gives {n} tokens, fewer than one block of "
            f"{block_size}; pass a smaller --block_size or more text"
        )
    return blocks


def _group_for_task(batch: dict[str, list], block_size: int, labels: bool) -> dict[str, list]:
    blocks = group_texts(batch, block_size)
    if labels:  # causal LM: the labels are the inputs, the model shifts them by one itself
        blocks["labels"] = [list(row) for row in blocks["input_ids"]]
    return blocks


# ---- 6. collate --------------------------------------------------------------------------------


def build_collator(task: str, tokenizer, *, mlm_probability: float = 0.15) -> Callable:
    """The batch collator for `task`: stacking of equal blocks ("clm"), dynamic padding
    ("cls"), random masking of `mlm_probability` of the tokens ("mlm").

    Raises:
        DataError: "mlm" with a tokenizer that has no mask token, or a bad probability;
            "cls" with a tokenizer that has no pad token.
    """
    import transformers

    _check_task_name(task)
    if task == "clm":
        return transformers.default_data_collator
    if task == "cls":
        if tokenizer.pad_token is None:
            raise DataError(
                f"--task cls pads batches, and the tokenizer {type(tokenizer).__name__} has no "
                "pad token"
            )
        return transformers.DataCollatorWithPadding(tokenizer)
    if tokenizer.mask_token is None:
        raise DataError(
            f"--task mlm masks tokens, and the tokenizer {type(tokenizer).__name__} has no mask "
            "token; use --task clm for a GPT-style model"
        )
    if not (isinstance(mlm_probability, int | float) and 0 < mlm_probability < 1):
        raise DataError(f"--mlm_probability must be in (0, 1), got {mlm_probability!r}")
    return transformers.DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=mlm_probability
    )


# ---- all of it ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PreparedData:
    """What the Trainer gets: tokenized splits and the collator."""

    train: Any
    """The tokenized train split (`datasets.Dataset`)."""

    eval: Any | None
    """The tokenized eval split, or None."""

    collator: Callable
    """`data_collator` for the Trainer."""

    task: str
    class_names: list[str] | None = None
    """"cls": the class names, index = class id."""


def prepare_datasets(
    raw,
    tokenizer,
    *,
    task: str,
    columns: Columns,
    class_names: Sequence[str] | None = None,
    block_size: int = 128,
    max_length: int = 128,
    eval_fraction: float = 0.05,
    seed: int = 0,
    mlm_probability: float = 0.15,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> PreparedData:
    """Split, tokenize and collate: steps 4-6 of the module docstring.

    `max_train_samples` / `max_eval_samples` keep the first N examples (blocks for "clm" and
    "mlm") after tokenizing, for quick runs.
    """
    collator = build_collator(task, tokenizer, mlm_probability=mlm_probability)
    train_raw, eval_raw = split_train_eval(raw, eval_fraction=eval_fraction, seed=seed)
    common = dict(
        task=task,
        text_column=columns.text,
        label_column=columns.label,
        class_names=class_names,
        block_size=block_size,
        max_length=max_length,
    )
    train = tokenize_dataset(train_raw, tokenizer, desc="train", **common)
    evals = (
        None if eval_raw is None else tokenize_dataset(eval_raw, tokenizer, desc="eval", **common)
    )
    for name, n in (
        ("max_train_samples", max_train_samples),
        ("max_eval_samples", max_eval_samples),
    ):
        if n is not None and (type(n) is not int or n < 1):
            raise DataError(f"--{name} must be a positive number of examples, got {n!r}")
    if max_train_samples is not None:
        train = train.select(range(min(max_train_samples, len(train))))
    if evals is not None and max_eval_samples is not None:
        evals = evals.select(range(min(max_eval_samples, len(evals))))
    return PreparedData(
        train=train,
        eval=evals,
        collator=collator,
        task=task,
        class_names=list(class_names) if class_names is not None else None,
    )
