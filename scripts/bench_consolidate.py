"""Benchmark `hf_zero.consolidate`: wall time and peak RSS on a GPT-2-small-sized checkpoint.

    python scripts/bench_consolidate.py [--n-layer 12] [--n-embd 768] [--n-head 12] [--out FILE]

Phases:
  1. Two gloo ranks (spawned, free port, one thread each) build GPT2LMHeadModel(GPT2Config(...)),
     take one AdamW step at ZeRO stage 3 (so the optimizer files hold real moments) and save a
     sharded checkpoint. This part is not measured and may be slow.
  2. A fresh interpreter, started with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536 (so its
     peak RSS follows freed memory, DESIGN.md §9), imports hf_zero and consolidates the
     checkpoint to fp32. It reports its own peak RSS (getrusage RUSAGE_SELF) and the time of the
     consolidate call; the parent times the whole process, interpreter start and imports included.
  3. Another fresh interpreter only imports, for the baseline RSS of Python + torch.

Prints one JSON object (also written to --out) and a line of text. Reference on this machine:
DeepSpeed's zero_to_fp32 took 4.7 s and peaked at 1.17 GB on a 105M-parameter ZeRO-3 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ENV = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536", "OMP_NUM_THREADS": "1"}

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import hf_zero
t1 = time.perf_counter()
if sys.argv[1] != "--import-only":
    hf_zero.consolidate(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3], progress=False)
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print(json.dumps({"import_s": t1 - t0, "consolidate_s": t2 - t1, "peak_rss_bytes": rss}))
"""


def _save_rank(
    rank: int, world_size: int, port: int, n_layer: int, n_embd: int, n_head: int, path: str
):
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_zero

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=world_size,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(minutes=20),
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=3))
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator())
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(path)
    numel = engine.num_parameters()
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"parameters": numel}), flush=True)
    os._exit(0)  # skip interpreter teardown: gloo jobs sometimes abort there (DESIGN.md §9)


def save_checkpoint(n_layer: int, n_embd: int, n_head: int, path: Path) -> int:
    """Phase 1, in two spawned processes; returns the model's parameter count."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import bench_consolidate as b; "
        "b._save_rank(*map(int, sys.argv[2:8]), sys.argv[8])"
    )
    here = str(Path(__file__).resolve().parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, here, str(r), "2", str(port)]
            + [str(n_layer), str(n_embd), str(n_head), str(path)],
            env=ENV,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs) or not (path / "zero" / "manifest.json").is_file():
        codes = [p.returncode for p in procs]
        raise SystemExit(f"saving the checkpoint failed: exit codes {codes}")
    return json.loads(outs[0].strip().splitlines()[-1])["parameters"]


def measure(args: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=ENV, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"consolidation failed:\n{done.stderr}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12, help="must divide --n-embd")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--out", help="also write the JSON result here")
    parser.add_argument("--workdir", help="where to put the checkpoint (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ckpt, export = Path(tmp) / "ckpt", Path(tmp) / "hf"
        t0 = time.perf_counter()
        numel = save_checkpoint(args.n_layer, args.n_embd, args.n_head, ckpt)
        save_s = time.perf_counter() - t0
        run = measure([str(ckpt), str(export), args.max_shard_size])
        baseline = measure(["--import-only"])
        params_bytes = sum(f.stat().st_size for f in (ckpt / "zero").glob("params-*"))
        ckpt_bytes = sum(f.stat().st_size for f in (ckpt / "zero").iterdir())
        export_bytes = sum(f.stat().st_size for f in export.glob("*.safetensors"))
    result = {
        "parameters": numel,
        "n_layer": args.n_layer,
        "n_embd": args.n_embd,
        "world_size": 2,
        "stage": 3,
        "max_shard_size": args.max_shard_size,
        "checkpoint_bytes": ckpt_bytes,
        "params_files_bytes": params_bytes,
        "export_bytes": export_bytes,
        "save_s": round(save_s, 2),
        "consolidate_s": round(run["consolidate_s"], 3),
        "process_s": round(run["process_s"], 3),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "import_only_peak_rss_bytes": baseline["peak_rss_bytes"],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"consolidate {numel / 1e6:.1f}M params ({export_bytes / 1e6:.0f} MB fp32): "
        f"{run['consolidate_s']:.2f} s in the call, "
        f"{run['process_s']:.2f} s for the whole process, "
        f"peak RSS {run['peak_rss_bytes'] / 1e9:.3f} GB "
        f"(Python + torch alone: {baseline['peak_rss_bytes'] / 1e9:.3f} GB)"
    )


if __name__ == "__main__":
    main()
