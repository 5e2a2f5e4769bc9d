"""Pushing a model to the Hugging Face Hub: the consolidated export and its card, nothing else.

`push_to_hub(path, repo_id)` takes either
  - a sharded hf_zero checkpoint (it has `zero/manifest.json`): it is consolidated first, offline
    and streaming (`hf_zero.consolidate`, no process group), into a temporary folder, and the card
    is written there from the checkpoint's manifest; or
  - an export (what `consolidate`, `engine.export` or `ZeroTrainer.save_model` wrote: config.json
    plus model.safetensors, or an index and its shards; or a PEFT adapter): it is pushed as it is,
    with a fresh card when `card` is given.
Anything else is refused, naming what the folder holds.

Phases:
  1. Classify `path`; consolidate a checkpoint into a temporary export.
  2. `create_repo(repo_id, exist_ok=True)` (and `create_branch` for a `revision` other than main).
  3. `upload_folder` with the export's files as explicit allow patterns: weights, index, config,
     generation config, tokenizer files, README.md. Per-rank shards (`zero/`), optimizer or RNG
     state and any other file in the folder are never uploaded. Weight files already in the repo
     that this export does not have (an older export with other shards) are deleted in the same
     commit, so `from_pretrained` cannot pick up stale weights.

Everything goes through huggingface_hub's own client, so HF_ENDPOINT, HF_TOKEN and the usual
login apply.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .card import CardInfo, render_card, with_repo_id

__all__ = ["push_to_hub", "export_files", "PushError", "STALE_WEIGHT_PATTERNS"]

logger = logging.getLogger(__name__)

ZERO_DIR = "zero"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
_SHARD_RE = re.compile(r"[A-Za-z0-9_.-]+\.safetensors")
# Weight files of an earlier push that this one replaces: deleted unless re-uploaded.
STALE_WEIGHT_PATTERNS = [
    WEIGHTS,
    INDEX,
    "model-*-of-*.safetensors",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    ADAPTER_WEIGHTS,
    "adapter_model.bin",
]


class PushError(ValueError):
    """`push_to_hub` was given something it cannot push."""


def _copied_files() -> tuple[str, ...]:
    from .checkpoint.consolidate import COPIED_FILES

    return COPIED_FILES


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def export_files(folder: str | os.PathLike) -> list[str]:
    """The files of an HF export folder that a push uploads, in upload order.

    Args:
        folder: a folder written by `consolidate` / `engine.export` / `save_pretrained`.

    Returns:
        File names relative to `folder`: the weights (model.safetensors, or the index and every
        shard it names; or adapter_model.safetensors with adapter_config.json), config.json,
        generation_config.json, the tokenizer files present and README.md when present.

    Raises:
        PushError: the folder is not such an export (no config, no weights, an index naming a
            shard that is missing); the message says what was found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "a file" if folder.exists() else "missing"
        raise PushError(f"{folder} is {what}; pass an hf_zero checkpoint or export folder")
    files: list[str] = []
    if (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file():
        files += [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    elif (folder / WEIGHTS).is_file():
        files.append(WEIGHTS)
    elif (folder / INDEX).is_file():
        files += [INDEX, *_index_shards(folder)]
    if not files or not (folder / "config.json").is_file() and ADAPTER_CONFIG not in files:
        missing = "config.json" if files else f"{WEIGHTS} or {INDEX}"
        raise PushError(
            f"{folder} is neither an hf_zero checkpoint (no {ZERO_DIR}/{MANIFEST}) nor an HF "
            f"export (no {missing}); {_listing(folder)}. Pass a checkpoint saved by "
            "engine.save_checkpoint or a folder written by hf_zero.consolidate / engine.export"
        )
    for name in (*_copied_files(), CARD):
        if name not in files and (folder / name).is_file():
            files.append(name)
    return files


def _index_shards(folder: Path) -> list[str]:
    try:
        index = json.loads((folder / INDEX).read_text("utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PushError(f"{folder / INDEX}: not a safetensors index ({e})") from None
    bad = [s for s in shards if not isinstance(s, str) or not _SHARD_RE.fullmatch(s)]
    if bad:
        raise PushError(f"{folder / INDEX}: weight_map names files outside the folder: {bad}")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise PushError(
            f"{folder / INDEX} names shards that are missing: {', '.join(missing)}; "
            "write the export again"
        )
    return shards


def _kind(path: Path) -> str:
    """ "checkpoint" (it has a manifest, or a zero/ folder and no export to push) or "export"."""
    if (path / ZERO_DIR / MANIFEST).is_file():
        return "checkpoint"
    try:
        export_files(path)
    except PushError as e:
        if (path / ZERO_DIR).is_dir():
            return "checkpoint"  # an unfinished save: consolidate says what is missing
        from .checkpoint import latest_checkpoint

        newest = latest_checkpoint(path) if path.is_dir() else None
        if newest is None:
            raise
        raise PushError(f"{e}. It holds checkpoints: the newest is {newest}; pass that") from None
    return "export"


@contextmanager
def _prepared(
    path: Path,
    kind: str,
    repo_id: str,
    card: CardInfo | None,
    *,
    dtype: Any,
    max_shard_size: int | str,
    work_dir: str | os.PathLike | None,
) -> Iterator[Path]:
    """The folder to upload: `path` itself, or a temporary one (a consolidated checkpoint, or
    links to the export's files next to a new card)."""
    if kind == "export" and card is None:
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="hf_zero-push-", dir=work_dir))
    try:
        if kind == "checkpoint":
            from .checkpoint.consolidate import consolidate

            out = consolidate(
                path,
                tmp / "export",
                dtype=dtype,
                max_shard_size=max_shard_size,
                progress=False,
                card=with_repo_id(card, repo_id),
            )
        else:
            out = tmp / "export"
            out.mkdir()
            try:
                rendered = render_card(path, None, with_repo_id(card, repo_id))
            except ValueError as e:
                raise PushError(
                    f"cannot write a new card for the export {path}: {e}. Push the checkpoint "
                    "instead (its card is written from its manifest), or push without card="
                ) from None
            for name in export_files(path):
                if name != CARD:
                    (out / name).symlink_to((path / name).resolve())
            (out / CARD).write_text(str(rendered), encoding="utf-8")
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def push_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    card: CardInfo | None = None,
    dtype: Any = "float32",
    max_shard_size: int | str = "5GB",
    work_dir: str | os.PathLike | None = None,
):
    """Upload a checkpoint's consolidated weights, or an export, to a Hub model repo.

    Args:
        path: a sharded hf_zero checkpoint (consolidated first, no process group) or an export.
        repo_id: "namespace/name" (or "name": the token's own namespace).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to push to, created from main if missing; default main.
        token: Hub token; default the usual login (HF_TOKEN, `hf auth login`).
        commit_message: default "Upload <model> trained with hf_zero".
        card: what the model card says beyond the checkpoint (CardInfo). A checkpoint always
            gets a card; an export keeps its README.md unless `card` is given.
        dtype, max_shard_size: how a checkpoint is consolidated (as `hf_zero.consolidate`).
        work_dir: where a checkpoint's temporary export is written (default the system temp
            folder); it needs room for the model's weights.

    Returns:
        huggingface_hub's CommitInfo of the upload.

    Raises:
        PushError: `path` is neither a checkpoint nor an export (the message names what it holds).
        CheckpointError: the checkpoint is incomplete or damaged (naming the file).
        huggingface_hub.errors.HfHubHTTPError: the Hub refused the upload.
    """
    from huggingface_hub import HfApi

    path = Path(path)
    kind = _kind(path)  # a bad path is refused before anything is asked of the Hub
    api = HfApi(token=token)
    if "/" not in repo_id:  # the card's usage snippet names the full id
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    with _prepared(
        path, kind, repo_id, card, dtype=dtype, max_shard_size=max_shard_size, work_dir=work_dir
    ) as folder:
        files = export_files(folder)
        left_out = sorted(
            p.name for p in folder.iterdir() if p.name not in files and p.name != ZERO_DIR
        )
        if left_out:
            logger.info("not uploading %s (not part of the export)", ", ".join(left_out))
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, "main"):
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {repo.repo_id} trained with hf_zero",
            allow_patterns=files,
            ignore_patterns=[f"{ZERO_DIR}/*", "*.tmp-*"],
            delete_patterns=STALE_WEIGHT_PATTERNS,
        )
