"""The `hf-zero` command line.

    hf-zero estimate --model NAME_OR_PATH --world-size N [--stage S] [--mixed-precision P]

`estimate` prints the model-state memory per rank by stage (DESIGN.md §1), for a model given by
a local folder or config.json, or a Hub name already in the local cache. The model is built on
the meta device, so nothing is allocated or downloaded beyond its config.
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
    args = parser.parse_args(argv)

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
