"""Tier 5 (needs CUDA): the engine on GPUs over NCCL, one process per GPU (every GPU, up to 4; a
machine with one GPU runs one rank in a real one-rank NCCL group), against single-process
`torch.optim.AdamW` on the same device and global batch.

What the CPU suite cannot see: tensors left on the wrong device, host copies inside the step,
NCCL's own reduce-scatter and all-gather, bf16 on a GPU, the sparse embedding path and the
int8 quantizer on CUDA tensors, and checkpoints saved from and loaded onto a GPU. Tolerances
are test_parity's (fp32) and cases.py's (bf16). Skipped cleanly without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

import hf_zero
from scripts.harness.cases import (
    MIXED_NORM_RTOL,
    MIXED_UPDATE_RTOL,
    initial_state,
    max_weight_diff,
    rel_diff,
    run_engine,
    run_reference,
    update_error,
)
from scripts.harness.dist import run_distributed

pytestmark = pytest.mark.gpu

STEPS = 6
LOSS_RTOL = 1e-5
NORM_RTOL = 1e-5
WEIGHT_ATOL = 2e-5


def _gpus() -> int:
    return min(torch.cuda.device_count(), 4)


def _cpu(sd: dict) -> dict:
    return {k: v.detach().float().cpu() for k, v in sd.items()}


def _on_device(engine, device: str) -> list[str]:
    """Names of the model's parameters and buffers that are not on `device`."""
    want = torch.device(device)
    named = [*engine.module.named_parameters(), *engine.module.named_buffers()]
    return [n for n, t in named if t.device != want]


def _parity_worker(rank: int, world_size: int) -> list[dict]:
    device = f"cuda:{rank}"
    rows = []
    for kind in ("gpt2", "bert"):  # bert: an untied word embedding, so sparse gradients are on
        ref_losses, ref_norms, ref_sd = run_reference(kind, STEPS, world_size, device=device)
        ref_sd = _cpu(ref_sd)
        initial = _cpu(initial_state(kind))
        for mixed in ("no", "bf16"):
            for stage in range(4):
                config = hf_zero.ZeroConfig(stage=stage, mixed_precision=mixed)
                engine, losses, norms = run_engine(
                    kind, STEPS, rank, world_size, config, device=device
                )
                full = _cpu(engine.full_state_dict(all_ranks=True))
                rows.append(
                    {
                        "kind": kind,
                        "mixed": mixed,
                        "stage": stage,
                        "loss": rel_diff(ref_losses, losses),
                        "norm": rel_diff(ref_norms, norms),
                        "weights": max_weight_diff(full, ref_sd),
                        "update": update_error(full, ref_sd, initial),
                        "elsewhere": _on_device(engine, device),
                        "cuda_bytes": torch.cuda.max_memory_allocated(device),
                    }
                )
                del engine
    return rows


def test_every_stage_on_cuda_matches_single_process_adamw():
    results = run_distributed(_parity_worker, _gpus(), timeout=900, backend="nccl")
    table = "\n".join(str(r) for rows in results for r in rows)
    print(table)
    for rows in results:
        assert len(rows) == 16
        for r in rows:
            assert r["elsewhere"] == [], f"left off the GPU: {r}"
            if r["mixed"] == "no":
                assert r["loss"] <= LOSS_RTOL, f"loss mismatch {r}\n{table}"
                assert r["norm"] <= NORM_RTOL, f"grad norm mismatch {r}\n{table}"
                assert r["weights"] <= WEIGHT_ATOL, f"weights mismatch {r}\n{table}"
            else:
                assert r["norm"] <= MIXED_NORM_RTOL["bf16"], f"bf16 norm {r}\n{table}"
                assert r["update"] <= MIXED_UPDATE_RTOL["bf16"], f"bf16 update {r}\n{table}"


def _lora_worker(rank: int, world_size: int) -> list[dict]:
    from scripts.harness.lora_cases import run_lora_engine, run_lora_reference

    device = f"cuda:{rank}"
    ref_losses, ref_norms, ref_sd = run_lora_reference("gpt2", 3, world_size, device=device)
    ref_sd = _cpu(ref_sd)
    rows = []
    for stage in range(4):
        engine, losses, norms = run_lora_engine(
            "gpt2",
            3,
            rank,
            world_size,
            hf_zero.ZeroConfig(stage=stage),
            checkpointing=True,
            device=device,
        )
        full = _cpu(engine.full_state_dict(all_ranks=True))
        rows.append(
            {
                "stage": stage,
                "loss": rel_diff(ref_losses, losses),
                "norm": rel_diff(ref_norms, norms),
                "weights": max_weight_diff(full, ref_sd),
            }
        )
    return rows


def test_lora_with_gradient_checkpointing_on_cuda_matches_single_process():
    pytest.importorskip("peft")
    results = run_distributed(_lora_worker, _gpus(), timeout=600, backend="nccl")
    table = "\n".join(str(r) for rows in results for r in rows)
    print(table)
    for rows in results:
        for r in rows:
            assert r["loss"] <= LOSS_RTOL and r["norm"] <= NORM_RTOL, f"{r}\n{table}"
            assert r["weights"] <= WEIGHT_ATOL, f"{r}\n{table}"


def _quantized_worker(rank: int, world_size: int) -> dict:
    from hf_zero import quantize

    device = f"cuda:{rank}"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(10_000, device=device, generator=g) * torch.logspace(-3, 3, 10_000).to(device)
    back = quantize.unpack(quantize.pack(x, 256), x.numel(), 256)
    bound = quantize.max_error(x, 256)
    config = hf_zero.ZeroConfig(
        stage=3, comm_quantization={"params": "int8", "grads": "int8", "block_size": 256}
    )
    engine, losses, norms = run_engine("gpt2", STEPS, rank, world_size, config, device=device)
    exact = run_engine("gpt2", STEPS, rank, world_size, hf_zero.ZeroConfig(stage=3), device=device)
    return {
        "device": str(back.device),
        "within_bound": bool(((back - x).abs() <= bound * (1 + 1e-6)).all()),
        "losses": rel_diff(exact[1], losses),
        "finite": all(math.isfinite(v) for v in losses + norms),
        "elsewhere": _on_device(engine, device),
    }


def test_int8_collectives_on_cuda_train_like_the_exact_run():
    for r in run_distributed(_quantized_worker, _gpus(), timeout=600, backend="nccl"):
        print(r)
        assert r["device"].startswith("cuda") and r["within_bound"], r
        assert r["finite"] and r["elsewhere"] == [], r
        assert r["losses"] <= 0.01, r  # lossy, so not exact: every loss within 1% of the exact run


def _checkpoint_worker(rank: int, world_size: int, root: str) -> dict:
    """Save on the GPU, load into a fresh engine on the GPU, and continue: the state read back is
    bit-identical, the next steps agree, and the export loads with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    from scripts.harness.cases import make_model, param_groups

    device = f"cuda:{rank}"
    rows = []
    for stage, mixed in [(s, "no") for s in range(4)] + [(3, "bf16")]:

        def build(stage=stage, mixed=mixed):
            model = make_model("gpt2").to(device)
            opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
            config = hf_zero.ZeroConfig(stage=stage, mixed_precision=mixed, gradient_clipping=1.0)
            return hf_zero.initialize(model, opt, config=config)

        def train(engine, first, steps):
            from scripts.harness.cases import global_batch, rank_slice

            out = []
            for step in range(first, first + steps):
                batch = rank_slice(global_batch("gpt2", step, 0, world_size, device), rank)
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                engine.zero_grad()
                out.append(loss.item())
            return out

        path = f"{root}/s{stage}-{mixed}"
        a = build()
        train(a, 0, 3)
        a.save_checkpoint(path)
        b = build()
        manifest = b.load_checkpoint(path)
        same = all(
            torch.equal(v, b.full_state_dict(all_ranks=True)[k])
            for k, v in a.full_state_dict(all_ranks=True).items()
        )
        next_a, next_b = train(a, 3, 2), train(b, 3, 2)
        export = a.export(f"{root}/export-s{stage}-{mixed}", dtype="float32")
        loaded = AutoModelForCausalLM.from_pretrained(export)
        full = _cpu(a.full_state_dict(all_ranks=True))
        exported = max(
            (v.float() - full[k]).abs().max().item() for k, v in loaded.state_dict().items()
        )
        rows.append(
            {
                "stage": stage,
                "mixed": mixed,
                "step": manifest.step,
                "same_after_load": same,
                "next": rel_diff(next_a, next_b),
                "exported": exported,
                "elsewhere": _on_device(b, device),
            }
        )
    return rows


def test_checkpoint_saved_and_loaded_on_cuda_resumes_and_exports(tmp_path):
    results = run_distributed(
        _checkpoint_worker, _gpus(), str(tmp_path), timeout=600, backend="nccl"
    )
    for rows in results:
        for r in rows:
            print(r)
            assert r["step"] == 3 and r["same_after_load"] and r["elsewhere"] == [], r
            assert r["next"] <= 1e-6, r
            assert r["exported"] == 0.0, r
