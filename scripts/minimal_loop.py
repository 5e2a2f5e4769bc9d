"""The smallest complete use of hf_zero in your own training loop: linear regression, the classic
first distributed example, on 4 gloo processes of one CPU machine.

    torchrun --nproc_per_node 4 --master_port 29541 scripts/minimal_loop.py

Each step, the global batch of 16 rows is split across the ranks (4 rows each at 4 ranks); every
rank computes the loss of its own rows, `engine.backward` averages the gradients over the ranks,
so the update is the gradient of the loss on all 16 rows, exactly as one process training on the
whole batch would make it (`python scripts/minimal_loop.py`, no launcher: world size 1).

Every rank prints, each step, the loss of the current weights on the whole global batch. The
ranks hold the same weights, so the lines agree across ranks, and they agree with the one-process
run up to float rounding (the 4 partial gradients are summed in another order). The last step
writes a sharded checkpoint: each rank its own shard of the optimizer state.

The API in five calls: `hf_zero.initialize` (wrap model and optimizer), `engine(...)` (forward),
`engine.backward(loss)`, `engine.step()`, `engine.zero_grad()`; then `engine.save_checkpoint`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import hf_zero
from hf_zero import comm

GLOBAL_BATCH = 16  # rows per step over all ranks; divisible by 1, 2, 4, 8 and 16 ranks
TRUE_WEIGHT = (2.0, -3.0, 0.5, 1.0)
TRUE_BIAS = 0.7


def make_batches(steps: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of every step: x (steps, GLOBAL_BATCH, 4), y = x @ w + b + noise, (steps, 16, 1).
    Every rank draws the same numbers, then takes its own rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, GLOBAL_BATCH, len(TRUE_WEIGHT), generator=g)
    noise = 0.1 * torch.randn(steps, GLOBAL_BATCH, 1, generator=g)
    y = x @ torch.tensor(TRUE_WEIGHT).unsqueeze(1) + TRUE_BIAS + noise
    return x, y


def say(line: str) -> None:
    """One line in one write: the ranks share the launcher's stdout, and print()'s separate
    write of the newline lets another rank's line land in between."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--stage", type=int, default=2, help="ZeRO stage 0-3 (default 2)")
    p.add_argument("--checkpoint-dir", default="checkpoints/minimal_loop")
    args = p.parse_args()

    # Under torchrun (or accelerate launch) join the launcher's processes; alone, world size 1.
    world = comm.init_process_group() if "WORLD_SIZE" in os.environ else comm.default_world()
    rank, world_size = world.rank, world.world_size
    if GLOBAL_BATCH % world_size:
        sys.exit(f"the global batch of {GLOBAL_BATCH} rows does not split over {world_size} ranks")
    rows = GLOBAL_BATCH // world_size

    # One GPU per process where there are GPUs (NCCL), the CPU otherwise (gloo).
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if world.backend == "nccl"
        else torch.device("cpu")
    )
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Linear(len(TRUE_WEIGHT), 1).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    engine = hf_zero.initialize(model, optimizer, config=hf_zero.ZeroConfig(stage=args.stage))

    x, y = (t.to(device) for t in make_batches(args.steps))
    for step in range(args.steps):
        with torch.no_grad():  # the loss of the whole global batch: what one process trains on
            global_loss = F.mse_loss(engine(x[step]), y[step]).item()
        say(f"rank {rank}/{world_size} step {step:3d} loss {global_loss:.9f}")

        mine = slice(rank * rows, (rank + 1) * rows)  # this rank's rows of the global batch
        loss = F.mse_loss(engine(x[step, mine]), y[step, mine])
        engine.backward(loss)  # gradients averaged over ranks: the global batch's gradient
        engine.step()
        engine.zero_grad()

    path = engine.save_checkpoint(args.checkpoint_dir)
    if rank == 0:
        say(f"checkpoint written to {path}")
    if world.initialized:
        comm.destroy_process_group()
        # gloo jobs may abort at interpreter exit even after the group is destroyed: leave now.
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
