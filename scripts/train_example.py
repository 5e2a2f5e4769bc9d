"""Train a small GPT-2 with the hf_zero engine on synthetic text, and report per-rank memory.

    torchrun --nproc_per_node 2 --master_port 29511 scripts/train_example.py --stage 2

A minimal end-to-end run of the engine (the fine-tuning script with real data sets is
scripts/finetune.py, a later issue). gloo on CPU, NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist

import hf_zero
from hf_zero.estimate import model_state_bytes


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage 0-3 (default 2)")
    p.add_argument("--zero-config", help="a ZeroConfig YAML/JSON file (overrides --stage)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--per-device-batch-size", type=int, default=4)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    )
    if cuda:
        torch.cuda.set_device(device)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=4,
            n_positions=args.seq_len,
            vocab_size=1024,
        )
    ).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
    )
    if args.zero_config:
        config = hf_zero.ZeroConfig.from_file(args.zero_config)
    else:
        config = hf_zero.ZeroConfig(
            stage=args.stage,
            mixed_precision=args.mixed_precision,
            gradient_clipping=args.max_grad_norm,
        )
    engine = hf_zero.initialize(model, optimizer, config=config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: min(1.0, (s + 1) / 5))

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    accum = args.gradient_accumulation_steps
    for step in range(args.steps):
        engine.zero_grad()  # first, so that the model states measured below are all alive
        for micro in range(accum):
            # Learnable synthetic text: each row counts up from a random token.
            start = torch.randint(0, 1024, (args.per_device_batch_size, 1), generator=gen)
            ids = ((start + torch.arange(args.seq_len)) % 1024).to(device)
            ctx = engine.no_sync() if micro < accum - 1 else contextlib.nullcontext()
            with ctx:
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss / accum)
        applied = engine.step()
        scheduler.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(
                f"step {step:4d}  loss {loss.item():.4f}  grad_norm {engine.grad_norm.item():.3f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}{'' if applied else '  (skipped: overflow)'}",
                flush=True,
            )
    mem = engine.memory_stats()
    psi = engine.num_parameters(only_trainable=True)
    want = model_state_bytes(
        psi, world_size=world, stage=config.stage, mixed_precision=config.mixed_precision
    )
    line = (
        f"rank {rank}/{world} stage {config.stage}: {psi:,} params, model states "
        f"{mem['total_bytes'] / 2**20:.2f} MiB (formula {want['total_bytes'] / 2**20:.2f} MiB), "
        f"comm {engine.comm_stats()['total'] / 2**20:.1f} MiB"
    )
    lines = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(lines, line)
    else:
        lines = [line]
    if rank == 0:
        print("\n".join(lines), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
        # gloo jobs abort at interpreter exit ("terminate called without an active exception")
        # in about 1 run in 5, after the work is done and the group destroyed. Leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
