"""The `hf-zero` command line.

    hf-zero estimate --model NAME_OR_PATH --world-size N [--stage S] [--mixed-precision P]
                     [--trainable COUNT_OR_FRACTION]
    hf-zero consolidate CKPT OUT [--dtype D] [--max-shard-size 5GB] [--overwrite]
    hf-zero inspect CKPT
    hf-zero push CKPT_OR_EXPORT --repo-id NAME [--private] [--revision R]

`consolidate` writes the folder `save_pretrained` would write from a sharded checkpoint, offline
(`hf_zero.consolidate`). `inspect` prints what a checkpoint holds and checks every file's size
and sha256; it exits 1 when one is bad. `estimate` prints the model-state memory per rank by
stage next to plain data parallelism's (DDP), for a model given by a local folder, a bare
config.json, a Hub id (offline: one in the local cache) or an embedded preset. The model is
built on the meta device, so nothing is allocated or downloaded beyond its config.
`--trainable` counts only part of the model as trained (LoRA adapters, a frozen base): the rest
is frozen, parameter bytes only (`hf_zero.estimate.model_state_bytes`). `push`
uploads a checkpoint's consolidated weights (or an export folder) and its model card to the Hub
(`hf_zero.hub.push_to_hub`): never the per-rank shards.
"""

from __future__ import annotations

import argparse
import sys

from .config import MIXED_PRECISION_CHOICES, STAGES
from .estimate import model_state_bytes

__all__ = ["main"]


def _model_class(config) -> tuple[type, str | None]:
    """The class to count `config`'s parameters with, and a note when it is not the one
    `architectures` names: that class is unknown to transformers, or belongs to another model
    type than the config's (a config.json edited by hand, or copied between models)."""
    import transformers
    from transformers import AutoModel

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is None:
            why = f"names {arch}, which transformers {transformers.__version__} does not have"
        elif getattr(cls, "config_class", None) is not None and not isinstance(
            config, cls.config_class
        ):
            why = (
                f"names {arch}, a {cls.config_class.model_type} model, but its model_type is "
                f"{config.model_type!r}"
            )
        else:
            return cls, None
        try:
            base = AutoModel._model_mapping[type(config)]
        except KeyError:
            raise SystemExit(
                f"hf-zero estimate: the config's architectures {why}, and transformers has no "
                f"model for model_type {config.model_type!r}: fix architectures in config.json"
            ) from None
        return base, (
            f"note: the config's architectures {why}; counted {base.__name__}, the base "
            f"{config.model_type} model (a task head, if any, is not included)"
        )
    return AutoModel._model_mapping[type(config)], None


def count_parameters(model_name_or_path: str) -> tuple[str, int, str | None]:
    """(model class, distinct parameter count, note or None) of a model given by an embedded
    preset, a local folder, a config.json or a Hub id, built on the meta device: nothing is
    allocated, and nothing is downloaded beyond the config.

    Raises:
        SystemExit: the model cannot be found or read (a Hub id while offline says so and how
            to point at a local folder), or its class cannot be built from its config.
    """
    import torch

    from . import models

    try:
        source = models.resolve_model(model_name_or_path, allow_config_file=True)
        config = models.load_config(source)
        cls, note = _model_class(config)
    except (models.SourceError, KeyError) as e:
        if isinstance(e, KeyError):
            e = f"transformers has no model for model_type {e}"
        raise SystemExit(f"hf-zero estimate: {e}") from None
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # a config that does not fit its own class: one line, no traceback
        raise SystemExit(
            f"hf-zero estimate: cannot build {cls.__name__} from the config of "
            f"{model_name_or_path!r}: {type(e).__name__}: {e}"
        ) from None
    return type(model).__name__, sum(p.numel() for p in model.parameters()), note


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    raise AssertionError


def estimate_table(
    numel: int,
    world_size: int,
    stages: list[int],
    mixed_precision: str,
    *,
    exact: bool = False,
    frozen: int = 0,
) -> str:
    """The per-rank model-state bytes of each stage in `stages`, below a DDP row (what plain
    data parallelism holds on every rank: the stage-0 accounting), for `numel` trainable and
    `frozen` frozen parameters. `exact`: whole bytes."""
    fmt = (lambda b: f"{int(b):,}") if exact else _human
    width = 18 if exact else 14
    rows = [
        f"{'stage':<6}{'params':>{width}}{'grads':>{width}}{'optimizer':>{width}}{'total':>{width}}"
    ]
    for label, stage in [("DDP", 0), *((str(s), s) for s in stages)]:
        b = model_state_bytes(
            numel,
            world_size=world_size,
            stage=stage,
            mixed_precision=mixed_precision,
            frozen=frozen,
        )
        rows.append(
            f"{label:<6}{fmt(b['param_bytes']):>{width}}{fmt(b['grad_bytes']):>{width}}"
            f"{fmt(b['optim_bytes']):>{width}}{fmt(b['total_bytes']):>{width}}"
        )
    return "\n".join(rows)


def trainable_count(value: str, total: int) -> int:
    """`--trainable`: a count of parameters (an integer), or a fraction of `total` (a number
    with a decimal point or an exponent, in (0, 1]); rounded to a whole count.

    Raises:
        ValueError: not a number, or out of range; the message names the value and the range.
    """
    try:
        count = int(value)
    except ValueError:
        count = None
    if count is None:
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(
                f"--trainable must be a parameter count (e.g. 294912) or a fraction of the "
                f"model's parameters (e.g. 0.01), got {value!r}"
            ) from None
        if not 0 < fraction <= 1:
            raise ValueError(f"--trainable as a fraction must be in (0, 1], got {value}")
        return max(1, round(fraction * total))
    if not 0 < count <= total:
        raise ValueError(
            f"--trainable must be between 1 and the model's {total:,} parameters, got {count:,}"
        )
    return count


def _consolidate(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .checkpoint.consolidate import consolidate

    try:
        out = consolidate(
            args.checkpoint,
            args.output,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
        )
    except (CheckpointError, OSError, ValueError) as e:  # one line, no traceback
        print(f"hf-zero consolidate: {e}", file=sys.stderr)
        return 1
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0


def _inspect(checkpoint: str) -> int:
    from .checkpoint import CheckpointError
    from .checkpoint.inspect import inspect_checkpoint

    try:
        info = inspect_checkpoint(checkpoint)
    except CheckpointError as e:
        print(f"hf-zero inspect: {e}", file=sys.stderr)
        return 1
    skipped = f" ({info['skipped_steps']} skipped)" if info["skipped_steps"] else ""
    print(f"checkpoint    {info['path']}")
    print(
        f"format        version {info['format_version']}, ZeRO stage {info['stage']}, "
        f"world size {info['world_size']}, mixed precision {info['mixed_precision']}"
    )
    print(f"step          {info['step']}{skipped}")
    print(
        f"model         {info['model_class']}: {info['num_parameters']:,} parameters "
        f"({info['trainable_parameters']:,} trainable), {info['flat_units']} flat units, "
        f"{info['export_keys']} tensors in an HF export"
    )
    if info["frozen_base"] is not None:
        base = info["frozen_base"]
        print(
            f"frozen base   referenced, not stored: {len(base['digests'])} parameters of "
            f"{base['source'] or '(source unknown)'}, verified by digest on load"
        )
    print(f"optimizer     {info['optimizer']['class']}")
    for i, group in enumerate(info["optimizer"]["param_groups"]):
        hyper = " ".join(f"{k}={v}" for k, v in sorted(group.items()))
        print(f"  group {i}     {hyper}")
    print("files")
    bad = []
    for f in info["files"]:
        status = "OK " if f["ok"] else "BAD"
        print(f"  {status} {f['name']:<44}{_human(f['size']):>12}")
        if not f["ok"]:
            print(f"      {f['error']}")
            bad.append(f["name"])
    for name in info["extra_files"]:
        print(f"  ?   {name:<44}not listed in the manifest")
    if bad:
        print(
            f"{len(bad)} of {len(info['files'])} files failed verification: {', '.join(bad)}",
            file=sys.stderr,
        )
        return 1
    print(f"all {len(info['files'])} files match the manifest (size and sha256)")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .hub import PushError, push_to_hub

    try:
        info = push_to_hub(
            args.path,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dtype=args.dtype,
        )
    except (PushError, CheckpointError) as e:
        print(f"hf-zero push: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # the Hub's answer (HfHubHTTPError) or the network's
        if type(e).__module__.split(".")[0] not in ("huggingface_hub", "httpx", "httpx2"):
            raise
        print(f"hf-zero push: the Hub refused the upload to {args.repo_id!r}: {e}", file=sys.stderr)
        return 1
    print(f"pushed {args.path} to {info.commit_url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-zero", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="model-state memory per rank by ZeRO stage")
    est.add_argument(
        "--model",
        required=True,
        help="a local model folder, its config.json, a Hub id, or an embedded preset "
        "(embedded:tiny-gpt2, embedded:minilm)",
    )
    est.add_argument("--world-size", type=int, required=True, help="number of data-parallel ranks")
    est.add_argument("--stage", type=int, choices=STAGES, help="one stage (default: all)")
    est.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default="no")
    est.add_argument(
        "--trainable",
        help="trainable parameters, as a count (294912) or a fraction of the model (0.01); the "
        "rest is frozen, parameter bytes only (default: every parameter trains)",
    )
    est.add_argument("--bytes", action="store_true", help="print whole bytes, not KiB/MiB/GiB")
    con = sub.add_parser("consolidate", help="export a sharded checkpoint as an HF model folder")
    con.add_argument("checkpoint", help="sharded checkpoint folder (with zero/manifest.json)")
    con.add_argument("output", help="folder to write (must not exist or be empty)")
    con.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32"
    )
    con.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    con.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in the output folder (nothing else is ever replaced)",
    )
    ins = sub.add_parser("inspect", help="what a sharded checkpoint holds; verifies every file")
    ins.add_argument("checkpoint", help="sharded checkpoint folder (with zero/manifest.json)")
    push = sub.add_parser("push", help="upload a checkpoint's consolidated weights to the Hub")
    push.add_argument("path", help="sharded checkpoint (consolidated first) or an export folder")
    push.add_argument("--repo-id", required=True, help="namespace/name (or name: your own)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", help="branch to push to (created if missing; default main)")
    push.add_argument("--commit-message", help="default 'Upload NAME trained with hf_zero'")
    push.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        default="float32",
        help="dtype a checkpoint is consolidated to (default float32)",
    )
    args = parser.parse_args(argv)

    if args.command == "consolidate":
        return _consolidate(args)
    if args.command == "inspect":
        return _inspect(args.checkpoint)
    if args.command == "push":
        return _push(args)

    if args.command == "estimate":
        if args.world_size < 1:
            parser.error(f"--world-size must be >= 1, got {args.world_size}")
        arch, numel, note = count_parameters(args.model)
        trainable = numel
        if args.trainable is not None:
            try:
                trainable = trainable_count(args.trainable, numel)
            except ValueError as e:
                parser.error(str(e))
        stages = [args.stage] if args.stage is not None else list(STAGES)
        if note:
            print(note)
        split = "" if trainable == numel else f" ({trainable:,} trainable, the rest frozen)"
        print(
            f"{arch}: {numel:,} parameters{split}, world size {args.world_size}, "
            f"mixed precision {args.mixed_precision}, AdamW (model states only, no activations)"
        )
        print(
            estimate_table(
                trainable,
                args.world_size,
                stages,
                args.mixed_precision,
                exact=args.bytes,
                frozen=numel - trainable,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
