"""Tier 4: `hf_zero.ZeroAccelerator` under the real `accelerate launch` CLI, 2 and 3 CPU
processes (gloo), with the launch configs of configs/ as the README gives them.

tests/accelerate_scripts/nlp_example.py is a training loop in the style of Accelerate's
nlp_example.py; it differs between plain Accelerate (DDP) and hf_zero only in the Accelerator
line. Each launch imports torch, transformers and accelerate in every process (seconds each), so
one launch runs several trainings (run_plan.py), and the tests share four launches:

- `single`: 2 processes, one launch: DDP, then stages 1, 2 (configs/zero2-like ZeroConfig) and
  3 (configs/zero3.yaml). DDP and stage 2 save_state mid-epoch; stage 2 exports at the end.
- `multi_node`: two launches, one process each (--num_machines 2, --machine_rank 0/1): stage 2
  from scratch, and stage 2 resumed from `single`'s save_state in these new processes.
- `other_world`: 3 processes: DDP resumed from DDP's state, and stages 1 and 3 resumed from
  stage 2's state (another world size and another stage).
- the guard: 2 processes without ACCELERATE_USE_CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.harness.dist import find_free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "accelerate_scripts"
CONFIGS = ROOT / "configs"
SAVE_AT = 6  # batches; epochs have 8 per process at 2 processes, so this is mid-epoch
TIMEOUT = 600


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]


def _env(cpu: bool = True) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def _launch_args(*args: str, port: int | None = None) -> list[str]:
    return [*_accelerate(), "launch", "--main_process_port", str(port or find_free_port()), *args]


def _run_plan(tmp: Path, name: str, plan: list[list[str]], *launch: str) -> None:
    """One `accelerate launch` of run_plan.py with `plan`; fails with the launch's output."""
    plan_file = tmp / f"{name}.json"
    plan_file.write_text(json.dumps(plan))
    proc = subprocess.run(
        _launch_args(*launch, str(SCRIPTS / "run_plan.py"), str(plan_file)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


def _read(tmp: Path, name: str) -> dict:
    return json.loads((tmp / f"{name}.json").read_text())


def _max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("single")
    save = ["--save_state_at", str(SAVE_AT)]
    plan = [
        ["--results", "ddp.json", *save, "--save_state_dir", "state_ddp"],
        ["--zero_stage", "1", "--results", "z1.json"],
        [
            *("--zero_stage", "2", "--results", "z2.json"),
            *(*save, "--save_state_dir", "state_z2", "--save_model", "export_z2"),
        ],
        ["--zero_config", str(CONFIGS / "zero3.yaml"), "--results", "z3.json"],
        ["--lora", "--results", "ddp_lora.json"],
        [
            *("--lora", "--gradient_checkpointing", "--zero_stage", "3"),
            *("--results", "z3_lora.json", "--save_model", "export_z3_lora"),
        ],
    ]
    _run_plan(tmp, "plan", plan, "--config_file", str(CONFIGS / "accelerate_cpu_2proc.yaml"))
    return tmp


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_one_line_change_matches_ddp(single, stage):
    """The same loop, only the Accelerator line changed: per-step losses, grad norms (from
    clip_grad_norm_), the scheduler's lr and the gathered eval accuracy equal DDP's."""
    ddp, zero = _read(single, "ddp"), _read(single, f"z{stage}")
    assert len(ddp["losses"]) == 16 and zero["num_processes"] == 2
    assert _max_rel(ddp["losses"], zero["losses"]) <= 1e-5
    assert _max_rel(ddp["grad_norms"], zero["grad_norms"]) <= 1e-5
    assert zero["lrs"] == ddp["lrs"] and len(set(zero["lrs"])) > 3  # the schedule moved
    assert zero["accuracy"] == ddp["accuracy"]
    assert zero["eval_examples"] == 20  # gather_for_metrics dropped the padded duplicates
    assert not any(zero["skipped"])
    assert torch.allclose(torch.tensor(zero["logits"]), torch.tensor(ddp["logits"]), atol=1e-5)


def test_lora_with_gradient_checkpointing_at_stage3_matches_ddp(single):
    """LoRA adapters (peft) and gradient checkpointing through ZeroAccelerator at stage 3: the
    same losses and grad norms as DDP training the same adapters; save_model writes the adapter
    only, the keys PeftModel.save_pretrained writes."""
    pytest.importorskip("peft")
    from safetensors import safe_open

    ddp, zero = _read(single, "ddp_lora"), _read(single, "z3_lora")
    assert _max_rel(ddp["losses"], zero["losses"]) <= 1e-5
    assert _max_rel(ddp["grad_norms"], zero["grad_norms"]) <= 1e-5
    assert _max_rel(ddp["losses"], _read(single, "ddp")["losses"]) > 1e-3  # not the full run
    assert torch.allclose(torch.tensor(zero["logits"]), torch.tensor(ddp["logits"]), atol=1e-5)
    folder = single / "export_z3_lora"
    assert sorted(p.name for p in folder.iterdir() if p.name != "README.md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
    assert keys and all("lora_" in k or "classifier" in k for k in keys), keys


def test_save_model_loads_with_from_pretrained(single):
    """save_model writes a standard HF folder: plain from_pretrained loads every tensor and
    gives the trained model's logits."""
    from transformers import BertForSequenceClassification

    sys.path.insert(0, str(SCRIPTS))
    try:
        import nlp_example
    finally:
        sys.path.remove(str(SCRIPTS))
    folder = single / "export_z2"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model, info = BertForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert all(not v for v in info.values()), info
    probe = nlp_example.collate_fn(nlp_example.make_pairs(nlp_example.EVAL_BATCH_SIZE, seed=2))
    with torch.no_grad():
        logits = model.eval()(**probe).logits
    trained = torch.tensor(_read(single, "z2")["logits"])
    torch.testing.assert_close(logits, trained, rtol=0, atol=1e-5)


def test_multi_node_matches_single_launch_and_resumes_exactly(single):
    """Two launches on one host, --num_machines 2 --machine_rank 0/1, one process each, train
    together: the same losses as the single 2-process launch. In these new processes,
    load_state of the mid-epoch save_state continues bit-identically (weights, optimizer shards,
    scheduler, dataloader position, RNG, registered object)."""
    tmp = single
    plan = [
        ["--zero_stage", "2", "--results", "mn_z2.json"],
        ["--zero_stage", "2", "--results", "mn_z2_resumed.json", "--resume_from", "state_z2"],
    ]
    (tmp / "mn.json").write_text(json.dumps(plan))
    port = find_free_port()
    procs = [
        subprocess.Popen(
            _launch_args(
                *("--config_file", str(CONFIGS / "accelerate_multi_node.yaml")),
                *("--num_processes", "2", "--machine_rank", str(rank)),
                *("--main_process_ip", "127.0.0.1"),
                str(SCRIPTS / "run_plan.py"),
                str(tmp / "mn.json"),
                port=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(),
            cwd=tmp,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-6000:] for o in outs)
    z2, mn, resumed = _read(tmp, "z2"), _read(tmp, "mn_z2"), _read(tmp, "mn_z2_resumed")
    assert mn["num_processes"] == 2
    assert _max_rel(z2["losses"], mn["losses"]) <= 1e-5
    assert resumed["losses"] == z2["losses"][SAVE_AT:]  # bit-identical
    assert resumed["lrs"] == z2["lrs"][SAVE_AT:]
    assert resumed["grad_norms"] == z2["grad_norms"][SAVE_AT // 2 :]


@pytest.fixture(scope="module")
def other_world(single) -> Path:
    tmp = single
    plan = [
        ["--results", "ddp_3.json", "--resume_from", "state_ddp"],
        ["--zero_stage", "1", "--results", "z1_3.json", "--resume_from", "state_z2"],
        ["--zero_stage", "3", "--results", "z3_3.json", "--resume_from", "state_z2"],
    ]
    _run_plan(
        tmp,
        "plan3",
        plan,
        *("--config_file", str(CONFIGS / "accelerate_multi_gpu.yaml"), "--num_processes", "3"),
    )
    return tmp


@pytest.mark.parametrize("stage", [1, 3])
def test_load_state_at_another_world_size_and_stage(other_world, stage):
    """Stage 2's save_state from 2 processes, loaded by 3 processes at stage 1 or 3, continues
    as DDP does when it loads its own save_state at 3 processes."""
    ddp, zero = _read(other_world, "ddp_3"), _read(other_world, f"z{stage}_3")
    assert zero["num_processes"] == 3 and len(ddp["losses"]) == 6
    assert _max_rel(ddp["losses"], zero["losses"]) <= 1e-5
    assert zero["lrs"] == ddp["lrs"]


def test_launch_without_cpu_flag_stops_before_training(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU without ACCELERATE_USE_CPU=1:
    each process would be rank 0 of 1. Both stop at ZeroAccelerator(...), naming both numbers
    and the launch that works, and nothing is written to the output folder."""
    out = tmp_path / "out"
    script = SCRIPTS / "nlp_example.py"
    args = ["--zero_stage", "2", "--results", str(out / "r.json"), "--save_model", str(out / "m")]
    start = time.monotonic()
    proc = subprocess.run(
        _launch_args("--multi_gpu", "--num_processes", "2", str(script), *args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(cpu=False),
        cwd=tmp_path,
    )
    elapsed = time.monotonic() - start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-4000:]
    assert "torch.distributed has 2 processes but Accelerate trains with 1" in text, text[-4000:]
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in text
    assert "epoch 0" not in text  # no training step ran
    assert not out.exists()
    assert elapsed < 300, elapsed


@pytest.mark.slow
def test_twenty_launches_exit_zero(tmp_path):
    """20 consecutive 2-process launches of the example (one epoch, stage 2) all exit 0: the
    process group is torn down at exit."""
    codes = []
    for i in range(20):
        proc = subprocess.run(
            _launch_args(
                *("--config_file", str(CONFIGS / "accelerate_cpu_2proc.yaml")),
                *(str(SCRIPTS / "nlp_example.py"), "--zero_stage", "2", "--num_epochs", "1"),
            ),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_env(),
            cwd=tmp_path,
        )
        codes.append(proc.returncode)
        if proc.returncode:
            print(f"launch {i}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    print(f"{codes.count(0)} of {len(codes)} launches exited 0")
    assert codes == [0] * 20, codes
