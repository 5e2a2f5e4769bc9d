"""What gradient checkpointing saves at stage 3: GPT-2 small, sequence 512, with and without.

    python scripts/recompute_report.py [--world-size 2] [--seq 512] [--steps 2] [--out FILE]

Each configuration trains GPT-2 small (124M parameters, built from its config: random weights,
dropout off) at stage 3 on `--world-size` gloo ranks, one sequence of `--seq` tokens per rank,
AdamW. After one warm-up step (past `initialize`, whose peak holds the whole model once before
it is partitioned, and past the optimizer state's creation) the peak RSS is reset
(`/proc/self/clear_refs`), so the figure is steady-state training's own: the rank's shards and
optimizer state, the gathered units, the gradients in flight and the activations. Both runs see
the same batches; their losses must agree (checkpointing recomputes, it does not change the
math). Prints a table and, with `--out`, writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.harness.dist import run_distributed  # noqa: E402

MB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _worker(rank, world_size, seq, steps, checkpointing):
    import gc

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_zero

    torch.manual_seed(0)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    if checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant: the transformers default
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=3))
    losses, start = [], None
    for step in range(steps + 1):
        if step == 1:
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
            start = _status_kb("VmRSS") * 1024
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, config.vocab_size, (1, seq), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
        losses.append(loss.item())
    return {
        "start_rss_bytes": start,
        "peak_rss_bytes": _status_kb("VmHWM") * 1024,
        "losses": losses,
        "model_state_bytes": engine.memory_stats()["total_bytes"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="measured, after 1 warm-up step")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    if not os.path.exists("/proc/self/clear_refs"):
        print("recompute_report: needs Linux (/proc/self/clear_refs)", file=sys.stderr)
        return 2
    rows = {}
    for checkpointing in (False, True):
        ranks = run_distributed(
            _worker, args.world_size, args.seq, args.steps, checkpointing, timeout=1800
        )
        rows["on" if checkpointing else "off"] = {
            "peak_rss_mb": max(r["peak_rss_bytes"] for r in ranks) / MB,
            "start_rss_mb": max(r["start_rss_bytes"] for r in ranks) / MB,
            "above_start_mb": max(r["peak_rss_bytes"] - r["start_rss_bytes"] for r in ranks) / MB,
            "losses": ranks[0]["losses"],
            "model_state_mb": ranks[0]["model_state_bytes"] / MB,
        }
    off, on = rows["off"], rows["on"]
    same = max(abs(a - b) / abs(a) for a, b in zip(off["losses"], on["losses"], strict=True))
    print(
        f"GPT-2 small, stage 3, {args.world_size} gloo ranks, 1 x {args.seq} tokens per rank, "
        f"{args.steps} steps after a warm-up (peak RSS of those steps, the largest rank)"
    )
    print(f"{'checkpointing':<14}{'peak RSS MB':>12}{'above start MB':>16}{'losses':>30}")
    for name, r in rows.items():
        shown = " ".join(f"{x:.6f}" for x in r["losses"])
        print(f"{name:<14}{r['peak_rss_mb']:>12.0f}{r['above_start_mb']:>16.0f}{shown:>30}")
    print(
        f"with checkpointing: peak RSS {on['peak_rss_mb']:.0f} MB instead of "
        f"{off['peak_rss_mb']:.0f} ({on['peak_rss_mb'] / off['peak_rss_mb']:.2f}x); losses agree "
        f"to {same:.1e} relative (the RSS at the steps' start also differs: the allocator keeps "
        "part of the warm-up step's peak)"
    )
    if args.out:
        report = {"world_size": args.world_size, "seq": args.seq, "steps": args.steps, **rows}
        Path(args.out).write_text(json.dumps({**report, "loss_rel_diff": same}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
