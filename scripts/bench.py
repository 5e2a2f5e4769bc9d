"""Benchmark hf_zero against DDP, ZeroRedundancyOptimizer, FSDP2 and DeepSpeed ZeRO, in one run.

    python scripts/bench.py                      # GPT-2 small (124M), 2 ranks, every engine
    python scripts/bench.py --quick              # a tiny GPT-2, a few minutes on 2 cores
    python scripts/bench.py --model gpt2-4x256 --world-size 2 --steps 5 --out-dir bench_results

Every engine trains the same GPT-2 (same weights, batches and AdamW) for `--warmup` + `--steps`
steps in fresh processes, one per rank (gloo on CPU, NCCL with one GPU per rank on a GPU
machine), all started with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536 so that peak RSS
follows freed memory the same way for every engine. The engines, run one after another:

    single            one process, the whole global batch, N threads: the compute limit
    single_fused      the same with AdamW(fused=True)
    ddp               DistributedDataParallel (gradient_as_bucket_view=True)
    ddp_fused         the same with AdamW(fused=True)
    zero_redundancy   DDP + torch's ZeroRedundancyOptimizer
    fsdp2             fully_shard per GPT2Block and the root, reshard_after_forward=True
    fsdp2_no_reshard  the same with reshard_after_forward=False
    hf_zero0..3       hf_zero.initialize(..., ZeroConfig(stage=k))
    hf_zero1_overlap  stage 1 (2) with overlap_param_gather: the after-step all-gather lands
    hf_zero2_overlap  during the next forward
    hf_zero2_bert     stage 2 on a BERT classifier shaped like all-MiniLM-L6-v2, dense gradients
    hf_zero2_sparse   the same with sparse embedding gradients (exact; the default)
    hf_zero3_q8       stage 3 with int8 parameter all-gather and gradient reduce-scatter (lossy)
    deepspeed2, 3     DeepSpeed ZeRO-2 / ZeRO-3 with the same torch AdamW (if installed)

Per engine: the median step time (max over ranks per step), its ratio to DDP and to the peer
stage, model-state bytes per rank next to the ZeRO formula, peak RSS per rank, minor page faults
per measured step (fresh pages touched: memory churn, independent of the machine's load), bytes
each rank sent per step (gloo: counted by the kernel) next to the 2Ψ/3Ψ volume, and the loss of
the last step, which must agree across engines (a benchmark of wrong training is worthless).
With `--rounds K` the engines run round-robin K times; a ratio is the median of the per-round
ratios (engine ÷ peer in the same round), so a round where the machine slowed down cancels.
Then the gradient-accumulation case (`--accum-steps`, 4 micro-steps per step, `--accum-engines`):
stage 1 communicates once per optimizer step, stage 2 every micro-step, DDP-fused skips it
inside no_sync(); run in the same rounds as the main engines. Then two
sweeps: step time and memory against model size at fixed N, and memory against N at a fixed
model. Then consolidation: `hf_zero.consolidate` against DeepSpeed's `zero_to_fp32` on the
ZeRO-3 checkpoints both engines saved after their runs, each in a fresh process.

Writes `results.json`, `results.md` and PNG plots (with matplotlib) to `--out-dir`, prints the
markdown, and exits 1 if an engine failed or a correctness check (equal losses, hf_zero's
model-state bytes equal to the formula) did not hold. Timings are never checked: they are
reported, with which targets they meet.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_engines import ENGINES as TABLE
from bench_report import FORMULA_RTOL, accum_targets, markdown, plots, step_ratio, targets

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "bench_worker.py"
MMAP_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}

MODELS = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 2048},
    "tiny-wide": {"n_layer": 2, "n_embd": 128, "n_head": 2, "vocab_size": 2048},
    "gpt2-4x256": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 50257},
    "gpt2-6x512": {"n_layer": 6, "n_embd": 512, "n_head": 8, "vocab_size": 50257},
    "gpt2": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257},
}
# The engines with model="bert" train this one, whatever --model says: all-MiniLM-L6-v2's shape
# (--quick: its 30,522-row vocabulary on 2 narrow layers).
BERT = {"kind": "bert", "n_layer": 6, "n_embd": 384, "n_head": 12, "vocab_size": 30522}
BERT_QUICK = {"kind": "bert", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 30522}


def bert_shape(args) -> dict:
    return BERT_QUICK if args.quick else BERT


# The engines and what each must show live in one table (bench_engines.py), read by the worker
# and the tests too. Derived here: which ZeRO stage an engine's memory matches, its communication
# volume in elements per rank per step (the ZeRO paper's convention: an all-reduce is 2Ψ, a
# reduce-scatter or an all-gather Ψ), and the peers its step time is compared with.
ENGINES = list(TABLE)
STAGE = {e.name: e.stage for e in TABLE.values()}
VOLUME = {e.name: e.volume for e in TABLE.values()}
PEERS = {e.name: list(e.peers) for e in TABLE.values() if e.peers}
# The gradient-accumulation case: stage 1 communicates once per optimizer step, stages 2-3
# every micro-step, against DDP (which skips communication inside no_sync()).
ACCUM_ENGINES = ("ddp_fused", "hf_zero1", "hf_zero2")
ACCUM_REFERENCE = "ddp_fused"
LOSS_RTOL = 1e-4  # fp32, a few steps: reduction order moves the loss by ~1e-6 relative


def formula_bytes(stage: int, numel: int, world_size: int) -> float:
    """Model-state bytes per rank for fp32 AdamW (params 4Ψ, grads 4Ψ, moments 8Ψ)."""
    p, n = numel, world_size
    return {0: 16 * p, 1: 8 * p + 8 * p / n, 2: 4 * p + 12 * p / n, 3: 16 * p / n}[stage]


def count_params(model: dict, seq: int) -> int:
    """Ψ: the model's parameters, tied ones once, built on the meta device."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_worker import build_model

    with torch.device("meta"):
        if model.get("kind") == "bert":
            m = build_model({"model": model, "seq": seq})
        else:
            m = GPT2LMHeadModel(GPT2Config(n_positions=max(seq, 128), **model))
    return sum(p.numel() for p in m.parameters())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def missing_requirement(engine: str) -> str | None:
    """Why `engine` cannot run here (its optional package is not installed), or None."""
    need = TABLE[engine].requires
    if need is None or importlib.util.find_spec(need) is not None:
        return None
    shown = {"deepspeed": "DeepSpeed"}.get(need, need)
    return f"{shown} is not installed (see README)"


def run_engine(engine: str, args, model_key: str, world_size: int, work: Path, **extra) -> dict:
    """Run one engine in fresh processes; returns the per-rank results merged, or an error."""
    accum = extra.get("accum", 1)
    out = work / (f"{model_key}-n{world_size}-{engine}" + (f"-accum{accum}" if accum > 1 else ""))
    out.mkdir(parents=True, exist_ok=True)
    ranks = 1 if TABLE[engine].single else world_size
    spec = {
        "engine": engine,
        "model": bert_shape(args) if TABLE[engine].model == "bert" else MODELS[model_key],
        "world_size": world_size,
        "batch": args.batch,
        "seq": args.seq,
        "steps": extra.get("steps", args.steps),
        "warmup": extra.get("warmup", args.warmup),
        "device": args.device,
        "port": free_port(),
        "out": str(out),
        "save_dir": extra.get("save_dir"),
        "accum": extra.get("accum", 1),
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        **MMAP_ENV,
        "OMP_NUM_THREADS": str(world_size if TABLE[engine].single else 1),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    logs = [open(out / f"rank{r}.log", "w") for r in range(ranks)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out / "spec.json"), str(r)],
            env=env,
            cwd=ROOT,
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(ranks)
    ]
    deadline = start + args.run_timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.perf_counter())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append("timeout")
    for f in logs:
        f.close()
    wall = time.perf_counter() - start
    results = []
    for r in range(ranks):
        path = out / f"rank{r}.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    if len(results) != ranks or any(c != 0 for c in codes):
        tail = (out / "rank0.log").read_text()[-2000:] if (out / "rank0.log").exists() else ""
        bad = next((r for r, c in enumerate(codes) if c != 0), 0)
        if bad:
            tail = (out / f"rank{bad}.log").read_text()[-2000:]
        return {"engine": engine, "error": f"exit codes {codes}", "log_tail": tail, "wall_s": wall}
    per_step = [max(vals) for vals in zip(*(r["step_times_s"] for r in results))]
    merged = {
        "engine": engine,
        "model": model_key,
        "world_size": world_size,
        "ranks": ranks,
        "accum": accum,
        "step_s": statistics.median(per_step),
        "step_times_s": per_step,
        "final_loss": results[0]["final_loss"],
        "optimizer_kernel": results[0].get("optimizer_kernel"),
        "state_bytes": [r["state_bytes"] for r in results],
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in results],
        "minor_faults_per_step": [r["minor_faults_per_step"] for r in results],
        "fault_bytes_per_step": [r["minor_faults_per_step"] * r["page_bytes"] for r in results],
        "sent_bytes_per_step": [r["sent_bytes_per_step"] for r in results],
        "wall_s": wall,
    }
    for key in (
        "memory_stats",
        "comm_bytes_per_step",
        "comm_path",
        "wire_stats",
        "peak_cuda_bytes",
        "save_s",
    ):
        if key in results[0]:
            merged[key] = [r.get(key) for r in results]
    return merged


def annotate(res: dict, numel: int) -> None:
    """Add the formulas next to what was measured."""
    if "error" in res:
        return
    e, n = res["engine"], res["world_size"]
    stage_n = 1 if TABLE[e].single else n
    res["numel"] = numel
    res["formula_bytes"] = formula_bytes(STAGE[e], numel, stage_n)
    res["state_over_formula"] = max(res["state_bytes"]) / res["formula_bytes"]
    if "memory_stats" in res:
        totals = [m["total_bytes"] for m in res["memory_stats"]]
        res["hf_zero_state_bytes"] = totals
        res["hf_zero_over_formula"] = max(totals) / res["formula_bytes"]
    res["volume_elements"] = VOLUME[e] * numel
    # A ring moves (N-1)/N of each collective's volume out of every rank.
    res["volume_wire_bytes"] = VOLUME[e] * numel * 4 * (n - 1) / n if VOLUME[e] else 0


def merge_rounds(runs: list[dict]) -> dict:
    """One engine's runs over the rounds: the last run's figures, with `step_s` the median of
    the rounds' (and each round's in `step_s_rounds`). A failed or skipped run stands for all."""
    bad = [r for r in runs if "error" in r or "skipped" in r]
    if bad:
        return bad[0]
    merged = dict(runs[-1])
    if len(runs) > 1:
        merged["step_s_rounds"] = [r["step_s"] for r in runs]
        merged["step_s"] = statistics.median(merged["step_s_rounds"])
    return merged


def check_rounds(rounds: dict[str, list[dict]]) -> list[str]:
    """Training is deterministic: every round of an engine must end at the same loss."""
    problems = []
    for e, runs in rounds.items():
        losses = {r["final_loss"] for r in runs if "final_loss" in r}
        if len(losses) > 1:
            problems.append(f"{e}: final loss differs between rounds: {sorted(losses)}")
    return problems


def add_ratios(results: dict[str, dict]) -> None:
    """Step-time ratios to DDP and to the peers: the median of the per-round ratios
    (`bench_report.step_ratio`, what the targets use), and beside it, with rounds, the ratio of
    the engines' median step times (`vs_ddp_of_medians`)."""
    ddp = results.get("ddp", {})
    for e, res in results.items():
        if "error" in res or "skipped" in res:
            continue
        res["vs_ddp"] = step_ratio(res, ddp)
        if "step_s_rounds" in res and "step_s" in ddp:
            res["vs_ddp_of_medians"] = res["step_s"] / ddp["step_s"]
        res["vs_peer"] = {
            p: step_ratio(res, results[p])
            for p in PEERS.get(e, [])
            if "step_s" in results.get(p, {})
        }


def add_accum_ratios(results: dict[str, dict]) -> None:
    """Accumulation case: step time over `ACCUM_REFERENCE`'s (median of per-round ratios)."""
    ref = results.get(ACCUM_REFERENCE, {})
    for res in results.values():
        if "step_s" in res:
            res["vs_reference"] = step_ratio(res, ref)


def check_accum_losses(results: dict[str, dict]) -> list[str]:
    ref = results.get(ACCUM_REFERENCE, {}).get("final_loss")
    problems = []
    for e, res in results.items():
        if "final_loss" not in res or ref is None:
            continue
        diff = abs(res["final_loss"] - ref) / abs(ref)
        if diff > LOSS_RTOL:
            problems.append(
                f"{e} (accumulation): final loss {res['final_loss']:.7g} differs from "
                f"{ACCUM_REFERENCE}'s {ref:.7g} by {diff:.2e} relative (> {LOSS_RTOL:g})"
            )
    return problems


def check_losses(results: dict[str, dict]) -> list[str]:
    """Every exact engine ends at its model's reference loss (GPT-2: one process, else DDP;
    BERT: its dense stage 2); a lossy one's difference is reported only."""
    gpt2_ref = "single" if "final_loss" in results.get("single", {}) else "ddp"
    refs = {"gpt2": gpt2_ref, "bert": "hf_zero2_bert"}
    problems = []
    for e, res in results.items():
        ref_name = refs[TABLE[e].model]
        ref = results.get(ref_name, {}).get("final_loss")
        if "final_loss" not in res or ref is None:
            continue
        res["loss_rel_diff"] = abs(res["final_loss"] - ref) / abs(ref)
        res["loss_reference"] = ref_name
        if res["loss_rel_diff"] > LOSS_RTOL and TABLE[e].exact:
            problems.append(
                f"{e}: final loss {res['final_loss']:.7g} differs from {ref_name}'s {ref:.7g} "
                f"by {res['loss_rel_diff']:.2e} relative (> {LOSS_RTOL:g})"
            )
        over = res.get("hf_zero_over_formula")
        if over is not None and abs(over - 1) > FORMULA_RTOL:
            problems.append(
                f"{e}: hf_zero memory_stats {max(res['hf_zero_state_bytes'])} bytes per rank, "
                f"formula {res['formula_bytes']:.0f} ({over:.4f}x)"
            )
    return problems


# ---- consolidation --------------------------------------------------------------------------

CONSOLIDATE_CHILD = r"""
import json, resource, sys, time
tool, src, dst = sys.argv[1:4]
t0 = time.perf_counter()
if tool == "hf_zero":
    import hf_zero
else:
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
t1 = time.perf_counter()
if src != "--import-only":
    if tool == "hf_zero":
        hf_zero.consolidate(src, dst, progress=False)
    else:
        convert_zero_checkpoint_to_fp32_state_dict(src, dst, tag="step")
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"import_s": t1 - t0, "consolidate_s": t2 - t1, "peak_rss_bytes": rss}))
"""


def measure_consolidation(tool: str, src: Path, dst: Path) -> dict:
    env = {**os.environ, **MMAP_ENV, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    out = {}
    for label, argv in (("run", [str(src), str(dst)]), ("import_only", ["--import-only", "-"])):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CONSOLIDATE_CHILD, tool, *argv],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if done.returncode:
            return {"tool": tool, "error": done.stderr[-2000:]}
        rec = json.loads(done.stdout.strip().splitlines()[-1])
        rec["process_s"] = time.perf_counter() - start
        out[label] = rec
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.suffix in (".safetensors", ".bin"))
    return {
        "tool": tool,
        "consolidate_s": out["run"]["consolidate_s"],
        "process_s": out["run"]["process_s"],
        "peak_rss_bytes": out["run"]["peak_rss_bytes"],
        "import_only_peak_rss_bytes": out["import_only"]["peak_rss_bytes"],
        "export_bytes": size,
    }


def machine() -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if deepspeed_available():
        from importlib.metadata import version

        info["deepspeed"] = version("deepspeed")
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), help="default gpt2 (tiny with --quick)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--seq", type=int, help="sequence length (default 128, 32 with --quick)")
    p.add_argument("--steps", type=int, help="measured steps (default 5, 3 with --quick)")
    p.add_argument("--warmup", type=int, help="unmeasured steps first (default 2, 1 with --quick)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the main engines this many times, round-robin; s/step is the median of rounds",
    )
    p.add_argument("--engines", help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument(
        "--accum-steps",
        type=int,
        default=4,
        help="micro-steps per optimizer step in the gradient-accumulation case",
    )
    p.add_argument(
        "--accum-engines",
        default=",".join(ACCUM_ENGINES),
        help="engines in the gradient-accumulation case (comma-separated; '' for none)",
    )
    p.add_argument("--sizes", help="models for the size sweep (comma-separated; '' for none)")
    p.add_argument("--world-sizes", help="N for the memory sweep (comma-separated; '' for none)")
    p.add_argument("--size-engines", help="engines in the size sweep")
    p.add_argument("--sweep-engines", help="engines in the world-size sweep")
    p.add_argument("--no-consolidate", action="store_true", help="skip the consolidation part")
    p.add_argument("--quick", action="store_true", help="tiny model, short sweeps: a few minutes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out-dir", default="bench_results")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds per engine run")
    p.add_argument("--keep-work", action="store_true", help="keep logs and checkpoints")
    p.add_argument(
        "--render",
        metavar="RESULTS_JSON",
        help="run nothing: judge the targets again and rewrite results.md and the plots beside "
        "an earlier run's results.json (after a change to what the report shows)",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.model = args.model or ("tiny" if q else "gpt2")
    args.seq = args.seq or (32 if q else 128)
    args.steps = args.steps or (3 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    if args.sizes is None:
        args.sizes = "tiny,tiny-wide" if q else "gpt2-4x256,gpt2-6x512,gpt2"
    if args.world_sizes is None:
        args.world_sizes = "1,2,3" if q else "1,2,3,4"
    if args.sweep_engines is None:
        args.sweep_engines = (
            "ddp,hf_zero2,hf_zero3" if q else "ddp,fsdp2,hf_zero1,hf_zero2,hf_zero3,deepspeed3"
        )
    if args.size_engines is None:  # the stage-2 and stage-3 targets' peers, at every size
        args.size_engines = (
            args.sweep_engines
            if q
            else "ddp,ddp_fused,fsdp2,hf_zero1,hf_zero2,hf_zero3,deepspeed2,deepspeed3"
        )
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("engines", "size_engines", "sweep_engines", "accum_engines"):
        val = getattr(args, name)
        chosen = ENGINES if val is None else [e for e in val.split(",") if e]
        bad = [e for e in chosen if e not in ENGINES]
        if bad:
            p.error(f"--{name.replace('_', '-')}: unknown engine(s) {bad}; choose from {ENGINES}")
        setattr(args, name, chosen)
    args.sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in args.sizes if s not in MODELS]
    if bad:
        p.error(f"--sizes: unknown model(s) {bad}; choose from {sorted(MODELS)}")
    try:
        args.world_sizes = [int(n) for n in args.world_sizes.split(",") if n]
    except ValueError:
        p.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    if args.world_size < 1 or any(n < 1 for n in args.world_sizes):
        p.error("world sizes must be >= 1")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.accum_steps < 2:
        p.error(f"--accum-steps must be >= 2, got {args.accum_steps}")
    unsupported = [e for e in args.accum_engines if TABLE[e].setup == "setup_fsdp2"]
    if unsupported:
        p.error(f"--accum-engines: {unsupported} have no no_sync(); use DDP, hf_zero or DeepSpeed")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.device == "cuda":
        import torch

        need = max([args.world_size, *args.world_sizes])
        if torch.cuda.device_count() < need:
            p.error(
                f"--device cuda needs {need} GPUs (one per rank), found {torch.cuda.device_count()}"
            )
    return args


def write_report(report: dict, out_dir: Path) -> str:
    """Judge the targets, then write results.json, results.md and the plots; the markdown."""
    results, acc = report["main"], report["accumulation"]
    report["targets"] = targets(results, report["consolidation"], report["model_sweep"])
    report["targets"] += accum_targets(acc["results"], acc["micro_steps"])
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    try:
        made = plots(report, out_dir)
        md += "\nPlots: " + ", ".join(made) + "\n"
    except ImportError:
        md += "\nPlots not drawn: matplotlib is not installed (pip install '.[bench]').\n"
    (out_dir / "results.md").write_text(md)
    return md


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        path = Path(args.render)
        if not path.is_file():
            raise SystemExit(f"--render: {path} is not a file (a results.json of an earlier run)")
        md = write_report(json.loads(path.read_text()), path.parent)
        print(md)
        progress(f"rewrote {path.parent}/results.md from {path}")
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hf_zero_bench-", dir=out_dir if args.keep_work else None))
    started = time.perf_counter()
    numel_of = {m: count_params(MODELS[m], args.seq) for m in {args.model, *args.sizes}}
    numel_of["bert"] = count_params(bert_shape(args), args.seq)

    def one(engine, model_key, n, **kw):
        if (why := missing_requirement(engine)) is not None:
            return {"engine": engine, "skipped": why}
        t0 = time.perf_counter()
        res = run_engine(engine, args, model_key, n, work, **kw)
        annotate(res, numel_of["bert" if TABLE[engine].model == "bert" else model_key])
        status = res.get("error") or f"{res['step_s']:.3f} s/step"
        acc = f" accum={kw['accum']}" if kw.get("accum", 1) > 1 else ""
        progress(
            f"  {engine:<17} {model_key} N={n}{acc}: {status} ({time.perf_counter() - t0:.0f} s)"
        )
        return res

    progress(f"main: {args.model}, {args.world_size} ranks, {args.device}")
    save_dir = None if args.no_consolidate else work / "checkpoints"
    rounds: dict[str, list[dict]] = {e: [] for e in args.engines}
    accum_rounds: dict[str, list[dict]] = {e: [] for e in args.accum_engines}
    for k in range(args.rounds):
        if args.rounds > 1:
            progress(f"round {k + 1} of {args.rounds}")
        last = k == args.rounds - 1  # checkpoints for the consolidation part: once
        for e in args.engines:
            where = str(save_dir) if save_dir and last else None
            rounds[e].append(one(e, args.model, args.world_size, save_dir=where))
        for e in args.accum_engines:  # in the same round, so per-round ratios hold here too
            accum_rounds[e].append(one(e, args.model, args.world_size, accum=args.accum_steps))
    main_results = {e: merge_rounds(rs) for e, rs in rounds.items()}
    add_ratios(main_results)
    accum_results = {e: merge_rounds(rs) for e, rs in accum_rounds.items()}
    add_accum_ratios(accum_results)
    problems = check_losses(main_results) + check_rounds(rounds) + check_rounds(accum_rounds)
    problems += check_accum_losses(accum_results)

    consolidation = {}
    if save_dir is not None:
        progress("consolidation")
        for tool, name in (("hf_zero", "hf_zero3"), ("deepspeed", "deepspeed3")):
            src = save_dir / name
            if src.is_dir():
                consolidation[tool] = measure_consolidation(tool, src, work / f"export-{tool}")
                progress(f"  {tool}: {consolidation[tool].get('process_s', 'FAILED')}")

    model_sweep = []
    if len(args.sizes) > 1:
        progress(f"size sweep: {args.sizes}")
        for m in args.sizes:
            for e in args.size_engines:
                if m == args.model and e in main_results:
                    model_sweep.append(main_results[e])
                else:
                    model_sweep.append(one(e, m, args.world_size))
    ws_sweep = []
    if len(args.world_sizes) > 1:
        progress(f"world-size sweep (memory): {args.world_sizes}")
        for n in args.world_sizes:
            for e in args.sweep_engines:
                if n == args.world_size and e in main_results:
                    ws_sweep.append(main_results[e])
                else:
                    ws_sweep.append(one(e, args.model, n, steps=1, warmup=1))
    for r in model_sweep + ws_sweep:
        if "error" in r:
            problems.append(f"{r['engine']} (sweep): {r['error']}")
    problems += [
        f"{e}: {r['error']}\n{r['log_tail']}"
        for e, r in [*main_results.items(), *accum_results.items()]
        if "error" in r
    ]
    report = {
        "command": " ".join(
            ["python", "scripts/bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "config": {
            "model": args.model,
            "model_config": MODELS[args.model],
            "world_size": args.world_size,
            "batch": args.batch,
            "seq": args.seq,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "accum_steps": args.accum_steps,
            "device": args.device,
        },
        "main_numel": numel_of[args.model],
        "main": main_results,
        "accumulation": {"micro_steps": args.accum_steps, "results": accum_results},
        "targets": [],
        "consolidation": consolidation,
        "model_sweep": [r for r in model_sweep if "skipped" not in r],
        "world_size_sweep": [r for r in ws_sweep if "skipped" not in r],
        "problems": problems,
        "total_s": None,
    }
    report["total_s"] = time.perf_counter() - started
    md = write_report(report, out_dir)
    print(md)
    progress(f"wrote {out_dir}/results.json, results.md ({report['total_s']:.0f} s in all)")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
