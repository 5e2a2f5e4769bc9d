"""The `hf-zero` command line.

    hf-zero estimate --model NAME_OR_PATH --world-size N [--stage S] [--mixed-precision P]
    hf-zero consolidate CKPT OUT [--dtype D] [--max-shard-size 5GB] [--overwrite]
    hf-zero inspect CKPT

`consolidate` writes the folder `save_pretrained` would write from a sharded checkpoint, offline
(`hf_zero.consolidate`). `inspect` prints what a checkpoint holds and checks every file's size
and sha256; it exits 1 when one is bad. `estimate` prints the model-state memory per rank by
stage (DESIGN.md §1), for a model given by a local folder or config.json, or a Hub name already
in the local cache. The model is built on the meta device, so nothing is allocated or downloaded
beyond its config.
"""

from __future__ import annotations

import argparse
import sys

from .config import MIXED_PRECISION_CHOICES, STAGES
from .estimate import model_state_bytes

__all__ = ["main"]


def count_parameters(model_name_or_path: str) -> tuple[str, int]:
    """(architecture, distinct parameter count) of a model, built on the meta device."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"hf-zero estimate: cannot read a model config from {model_name_or_path!r}: pass a "
            f"local model folder, a config.json, or a Hub name in the local cache ({e})"
        ) from None
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        model = model_cls(config) if model_cls else transformers.AutoModel.from_config(config)
    return type(model).__name__, sum(p.numel() for p in model.parameters())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{n:,.0f} B"
        n /= 1024
    raise AssertionError


def estimate_table(numel: int, world_size: int, stages: list[int], mixed_precision: str) -> str:
    rows = [f"{'stage':<6}{'params':>14}{'grads':>14}{'optimizer':>14}{'total':>14}"]
    for stage in stages:
        b = model_state_bytes(
            numel, world_size=world_size, stage=stage, mixed_precision=mixed_precision
        )
        rows.append(
            f"{stage:<6}{_human(b['param_bytes']):>14}{_human(b['grad_bytes']):>14}"
            f"{_human(b['optim_bytes']):>14}{_human(b['total_bytes']):>14}"
        )
    return "\n".join(rows)


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
    except (CheckpointError, FileExistsError, ValueError) as e:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-zero", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="model-state memory per rank by ZeRO stage")
    est.add_argument(
        "--model", required=True, help="local model folder, config.json, or cached Hub name"
    )
    est.add_argument("--world-size", type=int, required=True, help="number of data-parallel ranks")
    est.add_argument("--stage", type=int, choices=STAGES, help="one stage (default: all)")
    est.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default="no")
    con = sub.add_parser("consolidate", help="export a sharded checkpoint as an HF model folder")
    con.add_argument("checkpoint", help="sharded checkpoint folder (with zero/manifest.json)")
    con.add_argument("output", help="folder to write (must not exist or be empty)")
    con.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32"
    )
    con.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default 5GB)")
    con.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    ins = sub.add_parser("inspect", help="what a sharded checkpoint holds; verifies every file")
    ins.add_argument("checkpoint", help="sharded checkpoint folder (with zero/manifest.json)")
    args = parser.parse_args(argv)

    if args.command == "consolidate":
        return _consolidate(args)
    if args.command == "inspect":
        return _inspect(args.checkpoint)

    if args.command == "estimate":
        if args.world_size < 1:
            parser.error(f"--world-size must be >= 1, got {args.world_size}")
        arch, numel = count_parameters(args.model)
        stages = [args.stage] if args.stage is not None else list(STAGES)
        print(
            f"{arch}: {numel:,} parameters, world size {args.world_size}, "
            f"mixed precision {args.mixed_precision}, AdamW (model states only, no activations)"
        )
        print(estimate_table(numel, args.world_size, stages, args.mixed_precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
