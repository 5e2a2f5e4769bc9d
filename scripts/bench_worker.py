"""One rank of one benchmark run (started by `scripts/bench.py`, never by hand).

    python scripts/bench_worker.py SPEC.json RANK

Every engine trains the same GPT-2 (same config, seed and initial weights, dropout off) with the
same AdamW on the same token batches: the global batch of step s is drawn from a generator
seeded with s, and rank r takes rows [r*B, (r+1)*B). With gradient accumulation (`accum` in
the spec), a step is `accum` micro-steps, micro-step m drawing batch s*accum + m; the
micro-steps before the last run inside `no_sync()`, and the loss is their mean. The `single`
engines are one process on the whole global batch, with as many threads as the other runs have
ranks: the compute limit.

Per rank it measures:
  - the time of every step (forward, backward, optimizer step, zero_grad), after a barrier at
    the end of warm-up;
  - bytes this process sent during the measured steps, from the kernel's count of bytes written
    (`wchar` in /proc/self/io: gloo's TCP sends; nothing else writes during the steps);
  - model-state bytes right after the last optimizer step, before zero_grad (gradients and
    optimizer state both alive): every tensor reachable by the garbage collector, each storage
    counted once, so DDP's gradient buckets, FSDP2's DTensor shards and DeepSpeed's flat
    partitions are all counted the same way;
  - peak RSS of the process (getrusage), before any checkpoint is saved;
  - minor page faults of every step (getrusage `ru_minflt`): fresh pages the step touched, which
    is what a step that frees and reallocates its buffers pays for, whatever the machine's load;
    the median over the measured steps (steady state: warm-up steps are left out);
  - the global mean loss of the last step (all-reduced).
It writes them to `<out>/rank<r>.json`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import time
import warnings
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from bench_engines import ENGINES as TABLE

ADAMW = {"lr": 1e-4, "weight_decay": 0.01}
BUCKET = 2**23  # elements per gradient bucket: hf_zero's default bucket_size


def build_model(spec: dict) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = spec["model"]
    if m.get("kind") == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        return BertForSequenceClassification(
            BertConfig(
                vocab_size=m["vocab_size"],
                hidden_size=m["n_embd"],
                num_hidden_layers=m["n_layer"],
                num_attention_heads=m["n_head"],
                intermediate_size=4 * m["n_embd"],
                max_position_embeddings=max(spec["seq"], 128),
                num_labels=2,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )
    config = GPT2Config(
        vocab_size=m["vocab_size"],
        n_positions=max(spec["seq"], 128),
        n_layer=m["n_layer"],
        n_embd=m["n_embd"],
        n_head=m["n_head"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def batch(spec: dict, step: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows of the global batch of `step` that this rank trains on."""
    g = torch.Generator().manual_seed(step)
    b = spec["batch"]
    ids = torch.randint(
        0, spec["model"]["vocab_size"], (b * spec["world_size"], spec["seq"]), generator=g
    )
    if world_size == 1:
        return ids
    return ids[rank * b : (rank + 1) * b]


def inputs(spec: dict, ids: torch.Tensor) -> dict:
    """The model's keyword arguments for a batch of ids: a causal LM predicts the ids, the
    BERT classifier a label derived from them."""
    if spec["model"].get("kind") == "bert":
        return {"input_ids": ids, "labels": ids[:, 0] % 2}
    return {"input_ids": ids, "labels": ids}


def wchar() -> int:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar"))
    except (OSError, StopIteration):
        return -1


def live_tensor_bytes() -> int:
    """Bytes of every storage reachable from a live tensor object, each storage once."""
    seen, total = set(), 0
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecated objects in the scan
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor):
                continue
            t = obj
            if hasattr(t, "to_local"):  # DTensor: its local shard is the storage
                t = t.to_local()
            if t.is_meta:
                continue
            s = t.untyped_storage()
        except Exception:  # a tensor subclass without storage
            continue
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


# ---- engines: each returns (train_step(micro-batches) -> loss tensor, extra stats fn) ------


def setup_single(model, spec, device, fused=None):
    opt = torch.optim.AdamW(model.parameters(), **ADAMW, fused=fused)
    return _plain(model, opt), None


def _plain(model, opt, after_step=None):
    state = {}

    def step(micros):
        if len(micros) > 1 and not hasattr(model, "no_sync"):
            raise SystemExit(f"gradient accumulation is not set up for {type(model).__name__}")
        loss = 0.0
        for k, ids in enumerate(micros):
            last = k == len(micros) - 1
            with contextlib.nullcontext() if last else model.no_sync():
                micro = model(input_ids=ids, labels=ids).loss / len(micros)
                micro.backward()
            loss += micro.detach()
        opt.step()
        if state.get("measure"):
            state["state_bytes"] = live_tensor_bytes()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.state = state
    step.opt = opt
    return step


def setup_ddp(model, spec, device, zero_redundancy=False, fused=None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    if zero_redundancy:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.AdamW, **ADAMW)
    else:
        opt = torch.optim.AdamW(ddp.parameters(), **ADAMW, fused=fused)
    return _plain(ddp, opt), None


def setup_fsdp2(model, spec, device, reshard=True):
    from torch.distributed.fsdp import fully_shard

    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    return _plain(model, opt), None


def setup_hf_zero(model, spec, device, stage, config=None):
    import hf_zero

    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    fields = {**spec.get("hf_zero", {}), **(config or {})}
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage, **fields))
    state = {}

    def step(micros):
        loss = 0.0
        for k, ids in enumerate(micros):
            last = k == len(micros) - 1
            with contextlib.nullcontext() if last else engine.no_sync():
                micro = engine(**inputs(spec, ids)).loss / len(micros)
                engine.backward(micro)
            loss += micro.detach()
        engine.step()
        if state.get("measure"):
            state["state_bytes"] = live_tensor_bytes()
            state["memory_stats"] = engine.memory_stats()
        engine.zero_grad()
        return loss.detach()

    step.state = state
    step.opt = opt
    step.engine = engine

    def extra():
        return {
            "comm_stats": engine.comm_stats(),
            "comm_path": dict(engine._stats.paths),
            "wire_stats": engine.wire_stats(),
        }

    return step, extra


def setup_deepspeed(model, spec, device, stage):
    import deepspeed

    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    config = {
        "train_micro_batch_size_per_gpu": spec["batch"],
        "gradient_accumulation_steps": spec.get("accum", 1),
        # The same bucket size as hf_zero's default (2**23 elements) and DDP's order of
        # magnitude; DeepSpeed's own defaults (5e8) allocate 2 GB buffers up front.
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": BUCKET,
            "allgather_bucket_size": BUCKET,
            **({"stage3_prefetch_bucket_size": BUCKET} if stage == 3 else {}),
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    state = {}

    def step(micros):
        loss = 0.0
        for ids in micros:  # DeepSpeed scales by 1/accumulation and steps at the boundary
            micro = engine(input_ids=ids, labels=ids).loss
            engine.backward(micro)
            engine.step()
            loss += micro.detach() / len(micros)
        if state.get("measure"):
            state["state_bytes"] = live_tensor_bytes()
        return loss

    step.state = state
    step.opt = opt
    step.engine = engine
    return step, None


# Engine name -> its setup, as bench_engines.py (the one table of engines) gives it.
ENGINES = {name: partial(globals()[e.setup], **e.options) for name, e in TABLE.items()}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(sys.argv[2])
    engine_name = spec["engine"]
    single = TABLE[engine_name].single
    world_size = 1 if single else spec["world_size"]
    cuda = spec["device"] == "cuda"
    torch.set_num_threads(spec["world_size"] if single and not cuda else 1)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(spec["port"]),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    backend = "nccl" if cuda else "gloo"
    if TABLE[engine_name].setup == "setup_deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{spec['port']}",
            timeout=timedelta(minutes=30),
            device_id=device if cuda else None,
        )
    model = build_model(spec).to(device)
    step, extra = ENGINES[engine_name](model, spec, device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Warm-up steps stay out of the timing: first-use costs (DeepSpeed compiles a communication
    # op on its first step, allocators grow) land there. Peak RSS is the lifetime peak. One more
    # step after the measured ones takes the memory snapshot (a full scan of live objects is
    # slow), after a barrier so that no collective is still in flight, and gives the loss.
    times, faults, sent, comm0 = [], [], None, None
    warmup, steps = spec["warmup"], spec["steps"]
    for s in range(warmup + steps + 1):
        if s in (warmup, warmup + steps):
            sync()
            dist.barrier()
            if s == warmup:
                sent = wchar()
                comm0 = extra()["comm_stats"] if extra is not None else None
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
            else:
                sent = wchar() - sent if sent >= 0 else None
                comm1 = extra()["comm_stats"] if extra is not None else None
        # With accumulation, micro-step m of step s draws global batch s * accum + m.
        accum = spec.get("accum", 1)
        ids = [batch(spec, s * accum + m, rank, world_size).to(device) for m in range(accum)]
        step.state["measure"] = s == warmup + steps
        if step.state["measure"]:
            gc.collect()
        sync()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        loss = step(ids)
        sync()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    measured = times[warmup : warmup + steps]
    last = loss.detach().float().clone()
    dist.all_reduce(last)
    last /= world_size
    result = {
        "engine": engine_name,
        "rank": rank,
        "world_size": world_size,
        "step_times_s": measured,
        "median_step_s": statistics.median(measured),
        "minor_faults": faults[warmup : warmup + steps],
        "minor_faults_per_step": statistics.median(faults[warmup : warmup + steps]),
        "page_bytes": resource.getpagesize(),
        "final_loss": last.item(),
        "sent_bytes_per_step": sent / steps if sent is not None and not cuda else None,
        "state_bytes": step.state.get("state_bytes"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # The AdamW kernel that ran: torch's default (a for-loop on CPU) unless fused was
        # asked for or, for hf_zero, chosen for its flat shards.
        "optimizer_kernel": "fused"
        if any(g.get("fused") for g in step.opt.param_groups)
        else "default",
    }
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    if "memory_stats" in step.state:
        result["memory_stats"] = step.state["memory_stats"]
    if extra is not None:
        result.update(extra())
        result["comm_bytes_per_step"] = {k: (v - comm0.get(k, 0)) / steps for k, v in comm1.items()}
    save_dir = spec.get("save_dir")
    if save_dir and engine_name in ("hf_zero3", "deepspeed3"):
        t0 = time.perf_counter()
        if engine_name == "hf_zero3":
            step.engine.save_checkpoint(Path(save_dir) / engine_name)
        else:
            step.engine.save_checkpoint(str(Path(save_dir) / engine_name), tag="step")
        result["save_s"] = time.perf_counter() - t0
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: gloo jobs sometimes abort there


if __name__ == "__main__":
    main()
