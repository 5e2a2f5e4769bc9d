"""Checkpoint misuse scenarios: what a user can do wrong with paths, concurrent jobs and resumes.

The same harness as `faults` and `checkpoint_faults` (records, outcomes, checks). Scenarios:
7. a save onto what is not a checkpoint: a folder of the user's files, a parent folder of
   checkpoints, a plain file. Every rank raises CheckpointError naming the path and what it
   holds, before anything is written: the user's files are byte-identical afterwards and no
   temporary folder is left.
8. `hf-zero consolidate` misused: the output inside the checkpoint, the checkpoint inside the
   output (both with --overwrite), --overwrite onto a folder of other files, an output under a
   file. Each exits 1 with one line naming the problem, no traceback, nothing changed.
9. a save whose previous version cannot be deleted (a file made immutable with chattr): the
   save succeeds and a RuntimeWarning names the leftover folder.
10. concurrent save and load of one path (a saver rank and a loader rank, each its own
   one-rank engine): every load holds exactly one save's weights, optimizer state and step, or
   raises CheckpointError saying the checkpoint changed while loading; nothing else.
11. ranks of one load that read different manifests (a save swapped the checkpoint between
   them): every rank raises "the checkpoint changed while loading", engines unchanged.
12. a resume with the param groups in another order, or after unfreezing parameters: every rank
   raises CheckpointError naming the parameters and `weights_only=True`, engines unchanged;
   `weights_only=True` then loads exactly the saved weights with a fresh optimizer.
13. a shard that is a symlink (to a copy of the real file) is reported as a symlink; a shard
   replaced while a load runs is reported as the checkpoint changing, not as corrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

import hf_zero
from hf_zero.checkpoint import CheckpointError
from hf_zero.checkpoint.state import Counters
from scripts.harness.cases import make_model, param_groups
from scripts.harness.faults import (
    FaultRecord,
    RankOutcome,
    check_survivors,
    finished_outcome,
    first_line,
    job_failed,
    make_engine,
    raised_outcome,
    run_job,
    train_step,
)

__all__ = [
    "FOREIGN",
    "CONSOLIDATE_MISUSES",
    "RESUME_MISMATCHES",
    "save_over_foreign",
    "consolidate_misuse",
    "undeletable_previous_version",
    "concurrent_save_and_load",
    "ranks_read_different_manifests",
    "resume_mismatch",
    "shard_trouble",
    "SHARD_TROUBLES",
    "digests",
]

TIMEOUT_S = 30.0
FOREIGN = {
    "user-files": "save onto a folder of user files",
    "checkpoints-folder": "save onto a parent folder of checkpoints",
    "plain-file": "save onto a plain file",
}
CONSOLIDATE_MISUSES = {
    "output-inside-checkpoint": "consolidate CKPT CKPT/zero --overwrite",
    "checkpoint-inside-output": "consolidate CKPT <parent of CKPT> --overwrite",
    "overwrite-foreign-folder": "consolidate CKPT <folder of user files> --overwrite",
    "output-under-a-file": "consolidate CKPT <file>/out",
}
SHARD_TROUBLES = {
    "symlinked": "a shard that is a symlink",
    "replaced-mid-load": "a shard replaced while a load runs",
}
RESUME_MISMATCHES = {
    "reordered-groups": "resume with the param groups in another order",
    "unfrozen": "resume after unfreezing the embeddings",
}


def digests(root: Path) -> dict[str, str]:
    """Every file and link under `root` (or `root` itself, a file), by content."""
    root = Path(root)
    out = {}
    paths = [root] if not root.is_dir() else sorted(root.rglob("*"))
    for p in paths:
        if p.is_symlink():
            out[str(p)] = f"link to {os.readlink(p)}"
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p)] = "dir"
    return out


# ---- 7. a save onto what is not a checkpoint ------------------------------------------------


def _make_foreign(kind: str, target: Path) -> list[str]:
    """Create the user's data at `target` (rank 0, before the job); returns names the error
    must mention."""
    if kind == "user-files":
        (target / "data").mkdir(parents=True)
        (target / "notes.txt").write_text("my notes\n")
        (target / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
        return ["notes.txt", "data/"]
    if kind == "plain-file":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("not a folder\n")
        return ["is a file"]
    return ["checkpoint-1/", "checkpoint-2/", "folder of checkpoints"]


def _save_over_worker(rank, world_size, target, kind, stage):
    engine = make_engine(stage, timeout_s=TIMEOUT_S)
    train_step(engine, rank, world_size, 0)
    if kind == "checkpoints-folder":  # real checkpoints in the parent folder
        for step in (1, 2):
            engine.save_checkpoint(os.path.join(target, f"checkpoint-{step}"))
    torch.distributed.barrier()
    before = digests(Path(target)) if rank == 0 else None
    t0 = time.monotonic()
    try:
        engine.save_checkpoint(target)
        outcome = finished_outcome(rank, t0)
    except Exception as e:
        outcome = raised_outcome(rank, e, t0)
    torch.distributed.barrier()
    outcome.detail = {"before": before}
    return outcome


def save_over_foreign(kind: str, stage: int = 2, *, world_size: int = 2) -> FaultRecord:
    """Save a checkpoint onto FOREIGN[kind]. Every rank must raise CheckpointError naming the
    path and what it holds; the data must be byte-identical afterwards (checkpoint intact: the
    user's data), and no temporary folder may be left. `extra`: the listing beside the path."""
    record = FaultRecord(FOREIGN[kind], stage, world_size, checkpoint_intact=False)
    with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
        target = Path(tmp) / "my_project"
        mentions = _make_foreign(kind, target)
        results, error = run_job(
            _save_over_worker, world_size, str(target), kind, stage, timeout=180
        )
        if error is not None:
            return job_failed(record, error)
        record.ranks = results
        check_survivors(record, "CheckpointError", tmp=tmp)
        for o in results:
            if o.status == "raised" and not (
                o.message.startswith(f"refusing to save a checkpoint to {target}")
                and all(m in o.message for m in mentions)
            ):
                record.problems.append(
                    f"rank {o.rank}'s error does not name {target} and {mentions}"
                )
        before, after = results[0].detail["before"], digests(target)
        record.checkpoint_intact = before == after
        if not record.checkpoint_intact:
            record.problems.append("the user's data changed")
        record.extra["names"] = names = sorted(os.listdir(tmp))
        if names != ["my_project"]:
            record.problems.append(f"the refused save left {names}")
    return record


# ---- 8. hf-zero consolidate misused ---------------------------------------------------------


def _one_rank_checkpoint(path: Path, step_seed: int = 0) -> None:
    """A one-rank checkpoint saved in this process (no process group)."""
    model = make_model("gpt2", seed=step_seed)
    engine = hf_zero.initialize(
        model,
        torch.optim.AdamW(param_groups(model), lr=1e-3),
        config=hf_zero.ZeroConfig(stage=1),
    )
    train_step(engine, 0, 1, step_seed)
    engine.save_checkpoint(path)


def consolidate_misuse(kind: str) -> FaultRecord:
    """`hf-zero consolidate` misused (CONSOLIDATE_MISUSES, in this process): it must exit 1
    printing one line that names the problem, no traceback, and change nothing."""
    from hf_zero.cli import main

    record = FaultRecord(CONSOLIDATE_MISUSES[kind], "-", 1, checkpoint_intact=False)
    expected = {
        "output-inside-checkpoint": "is inside the checkpoint",
        "checkpoint-inside-output": "would replace the checkpoint",
        "overwrite-foreign-folder": "entries an export does not write: 'notes.txt'",
        "output-under-a-file": "is a file, not a folder",
    }[kind]
    with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
        ckpt = Path(tmp) / "run" / "ckpt"
        _one_rank_checkpoint(ckpt)
        out = {
            "output-inside-checkpoint": ckpt / "zero",
            "checkpoint-inside-output": ckpt.parent,
            "overwrite-foreign-folder": Path(tmp) / "mine",
            "output-under-a-file": Path(tmp) / "a-file" / "out",
        }[kind]
        if kind == "overwrite-foreign-folder":
            out.mkdir()
            (out / "notes.txt").write_text("keep me\n")
        if kind == "output-under-a-file":
            (Path(tmp) / "a-file").write_text("a file\n")
        before = digests(Path(tmp))
        argv = ["consolidate", str(ckpt), str(out), "--overwrite"]
        stdout, stderr = io.StringIO(), io.StringIO()
        t0 = time.monotonic()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                rc = main(argv)
        except BaseException as e:  # a traceback: exactly what must not happen
            record.ranks = [raised_outcome(0, e, t0)]
            record.problems.append(f"hf-zero consolidate raised {type(e).__name__}: {e}")
            return record
        err = stderr.getvalue()
        record.ranks = [RankOutcome(0, "raised" if rc else "finished", f"exit {rc}", err.strip())]
        record.time_to_failure_s = time.monotonic() - t0
        record.message = first_line(err, tmp)
        if rc != 1:
            record.problems.append(f"exit status {rc}, not 1")
        if len(err.strip().splitlines()) != 1 or not err.startswith("hf-zero consolidate: "):
            record.problems.append(f"not one line of error: {err!r}")
        if expected not in err:
            record.problems.append(f"the error does not say {expected!r}")
        record.checkpoint_intact = digests(Path(tmp)) == before
        if not record.checkpoint_intact:
            record.problems.append("files changed")
    return record


# ---- 9. a previous version that cannot be deleted -------------------------------------------


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


def undeletable_previous_version() -> FaultRecord:
    """Save twice to one path, with a file of the first version made undeletable (chattr +i)
    in between. The second save must succeed and warn, naming `<path>.old-<token>`, which must
    be what is left; the path must hold the new version."""
    from hf_zero.checkpoint import Manifest

    record = FaultRecord("previous version cannot be deleted", 1, 1, checkpoint_intact=False)
    with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
        path = Path(tmp) / "ckpt"
        _one_rank_checkpoint(path, 0)
        stuck = path / "zero" / "rng-rank00000-of-00001.safetensors"
        if not _chattr("+i", stuck):
            record.problems.append("cannot make a file undeletable here (chattr +i failed)")
            return record
        t0 = time.monotonic()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _one_rank_checkpoint(path, 1)
            record.ranks = [finished_outcome(0, t0)]
        except Exception as e:
            record.ranks = [raised_outcome(0, e, t0)]
            record.problems.append(f"the save failed: {type(e).__name__}: {e}")
            caught = []
        finally:
            leftovers = sorted(p.name for p in Path(tmp).iterdir() if ".old-" in p.name)
            for p in Path(tmp).glob("ckpt.old-*/zero/*"):
                _chattr("-i", p)
        texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        texts = [t for t in texts if "could not be deleted" in t]
        record.message = first_line(texts[0], tmp) if texts else ""
        record.extra["leftovers"] = leftovers
        if len(leftovers) != 1 or not texts or str(Path(tmp) / leftovers[0]) not in texts[0]:
            record.problems.append(f"no warning naming the leftover ({leftovers}, {texts})")
        record.checkpoint_intact = Manifest.read(path).step == 1 and "zero" in os.listdir(path)
    return record


# ---- 10. concurrent save and load -----------------------------------------------------------


CHANGED = "the checkpoint changed while loading"


def _concurrent_worker(rank, world_size, path, seconds):
    from hf_zero.checkpoint import sharded

    groups = [torch.distributed.new_group([r]) for r in range(world_size)]  # one-rank engines
    model = make_model("gpt2")
    engine = hf_zero.initialize(
        model,
        torch.optim.AdamW(param_groups(model), lr=1e-3),
        config=hf_zero.ZeroConfig(stage=1),
        group=groups[rank],
    )
    train_step(engine, 0, 1, 0)  # optimizer state exists
    state = engine._checkpoint_state()
    counts = {"saves": 0, "loads": 0, "changed": 0, "wrong": [], "other": []}

    def save(k: int) -> None:
        # Every number the checkpoint holds is k: a mixed load cannot pass for a clean one.
        with torch.no_grad():
            for m in state.masters.values():
                m.fill_(k)
                for v in state.optimizer.state[m].values():
                    v.fill_(k)
        sharded.save_checkpoint(dataclasses.replace(state, counters=Counters(step=k)), path)
        counts["saves"] += 1

    if rank == 0:
        save(1)
    torch.distributed.barrier()
    deadline = time.monotonic() + seconds
    k = 1
    while time.monotonic() < deadline:
        if rank == 0:
            k += 1
            save(k)
            continue
        try:
            manifest = engine.load_checkpoint(path)
        except CheckpointError as e:
            if CHANGED in str(e):
                counts["changed"] += 1
            else:
                counts["other"].append(f"CheckpointError: {e}")
            continue
        except Exception as e:  # anything else is a defect: FileNotFoundError, ...
            counts["other"].append(f"{type(e).__name__}: {e}")
            continue
        counts["loads"] += 1
        step = manifest.step
        values = {float(v) for m in state.masters.values() for v in m.unique()}
        values |= {
            float(x)
            for m in state.masters.values()
            for t in state.optimizer.state[m].values()
            for x in t.reshape(-1).unique()
        }
        if values != {float(step)} or engine.global_steps != step:
            counts["wrong"].append(f"step {step} loaded values {sorted(values)[:4]}")
    torch.distributed.barrier()
    return counts


def concurrent_save_and_load(seconds: float = 5.0) -> FaultRecord:
    """A saver rank saves to one path again and again while a loader rank loads it, for
    `seconds`. Every load must hold exactly one save (all weights, optimizer state and the step
    equal the number that save wrote) or raise CheckpointError saying the checkpoint changed
    while loading. `extra`: saves, clean loads, loads refused as changed."""
    record = FaultRecord(f"concurrent save and load ({seconds:g} s)", 1, 2)
    with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
        results, error = run_job(
            _concurrent_worker,
            2,
            str(Path(tmp) / "ckpt"),
            seconds,
            timeout=120 + 2 * seconds,
        )
    if error is not None:
        return job_failed(record, error)
    saver, loader = results
    record.extra = {
        "saves": saver["saves"],
        "loads": loader["loads"],
        "changed": loader["changed"],
    }
    record.message = (
        f"{saver['saves']} saves; {loader['loads']} clean loads, {loader['changed']} refused "
        "as changed while loading"
    )
    record.ranks = [RankOutcome(0, "finished"), RankOutcome(1, "finished")]
    for what in ("wrong", "other"):
        if loader[what]:
            record.problems.append(f"{len(loader[what])} loads {what}: {loader[what][0]}")
    if loader["loads"] == 0:
        record.problems.append("no load succeeded")
    return record


# ---- 11. ranks that read different manifests ------------------------------------------------


def _different_manifests_worker(rank, world_size, root):
    import hf_zero.checkpoint.format as fmt

    engine = make_engine(1, timeout_s=TIMEOUT_S)
    root = Path(root)
    train_step(engine, rank, world_size, 0)
    engine.save_checkpoint(root / "ckpt")
    train_step(engine, rank, world_size, 1)
    engine.save_checkpoint(root / "next")
    fresh = make_engine(1, timeout_s=TIMEOUT_S)
    masters = fresh._checkpoint_state().masters
    before = {i: m.detach().clone() for i, m in masters.items()}
    real_open, real_read = fmt.open_zero_dir, fmt.read_manifest_at
    marker = root / "swapped"

    def open_after_swap(ckpt):  # rank 1 opens the checkpoint after the swap
        while not marker.exists():
            time.sleep(0.01)
        return real_open(ckpt)

    def read_then_swap(dir_fd, path):  # a save replaces it right after rank 0 read it
        got = real_read(dir_fd, path)
        if not marker.exists():
            os.rename(root / "ckpt", root / "ckpt.old")
            os.rename(root / "next", root / "ckpt")
            marker.touch()
        return got

    if rank == 0:
        fmt.read_manifest_at = read_then_swap
    else:
        fmt.open_zero_dir = open_after_swap
    t0 = time.monotonic()
    try:
        fresh.load_checkpoint(root / "ckpt")
        outcome = finished_outcome(rank, t0)
    except Exception as e:
        outcome = raised_outcome(rank, e, t0)
    finally:
        fmt.open_zero_dir, fmt.read_manifest_at = real_open, real_read
    outcome.detail = {
        "unchanged": fresh.global_steps == 0
        and all(torch.equal(before[i], m) for i, m in masters.items())
    }
    return outcome


def ranks_read_different_manifests(*, world_size: int = 2) -> FaultRecord:
    """Rank 0 reads the manifest of step 1; a save then swaps in step 2's checkpoint, which
    rank 1 reads. Both read consistent files of their own version, so only the agreement can
    tell: every rank must raise CheckpointError saying the checkpoint changed while loading,
    with its engine unchanged."""
    record = FaultRecord("ranks read different manifests", 1, world_size)
    with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
        results, error = run_job(_different_manifests_worker, world_size, tmp, timeout=180)
        if error is not None:
            return job_failed(record, error)
        record.ranks = results
        check_survivors(record, "CheckpointError", tmp=tmp)
    for o in results:
        if "the ranks read different manifests: rank 0: step 1, rank 1: step 2" not in o.message:
            record.problems.append(
                f"rank {o.rank}'s error does not say the manifests differed: {o.message[:300]}"
            )
        if not o.detail["unchanged"]:
            record.problems.append(f"rank {o.rank} changed its engine")
    return record


# ---- 12. a resume whose param groups or trainability changed -------------------------------


def _groups_engine(kind: str | None, seed: int = 0):
    model = make_model("gpt2", seed=seed)
    if kind == "frozen":
        for p in (model.transformer.wte.weight, model.transformer.wpe.weight):
            p.requires_grad_(False)
    groups = param_groups(model)
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    if kind == "reordered":
        groups = groups[::-1]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    cfg = hf_zero.ZeroConfig(stage=1, collective_timeout_s=TIMEOUT_S)
    return hf_zero.initialize(model, opt, config=cfg)


def _resume_mismatch_worker(rank, world_size, path, case):
    saver = _groups_engine("frozen" if case == "unfrozen" else None)
    train_step(saver, rank, world_size, 0)
    saver.save_checkpoint(path)
    saved = saver.full_state_dict(all_ranks=True)
    loader = _groups_engine("reordered" if case == "reordered-groups" else None, seed=1)
    state = loader._checkpoint_state()
    before = {i: m.detach().clone() for i, m in state.masters.items()}
    t0 = time.monotonic()
    try:
        loader.load_checkpoint(path)
        outcome = finished_outcome(rank, t0)
    except Exception as e:
        outcome = raised_outcome(rank, e, t0)
    unchanged = loader.global_steps == 0 and all(
        torch.equal(before[i], m) for i, m in state.masters.items()
    )
    loader.load_checkpoint(path, weights_only=True)
    got = loader.full_state_dict(all_ranks=True)
    outcome.detail = {
        "unchanged": unchanged,
        "weights_only_exact": all(torch.equal(got[k], v) for k, v in saved.items()),
        "fresh_optimizer": not loader.optimizer.state and loader.global_steps == 0,
    }
    return outcome


def resume_mismatch(case: str, *, world_size: int = 2) -> FaultRecord:
    """RESUME_MISMATCHES[case]. Every rank must raise CheckpointError naming a parameter with
    its group or trainability there and here, and `weights_only=True`, with its engine
    unchanged; `load_checkpoint(path, weights_only=True)` must then load exactly the saved
    weights and leave the optimizer fresh."""
    record = FaultRecord(RESUME_MISMATCHES[case], 1, world_size)
    expected = {
        "reordered-groups": "are in another param group since the checkpoint was saved: "
        "'transformer.",
        "unfrozen": "changed trainability (requires_grad) or param group since the checkpoint "
        "was saved: 'transformer.wte.weight': frozen in the checkpoint, param group 0 here",
    }[case]
    with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
        results, error = run_job(
            _resume_mismatch_worker, world_size, str(Path(tmp) / "ckpt"), case, timeout=180
        )
        if error is not None:
            return job_failed(record, error)
        record.ranks = results
        check_survivors(record, "CheckpointError", tmp=tmp)
    for o in results:
        if expected not in o.message or "weights_only=True" not in o.message:
            record.problems.append(f"rank {o.rank}'s error does not say {expected!r}")
        for key, what in (
            ("unchanged", "changed its engine before failing"),
            ("weights_only_exact", "did not load the exact weights with weights_only=True"),
            ("fresh_optimizer", "did not keep a fresh optimizer with weights_only=True"),
        ):
            if not o.detail[key]:
                record.problems.append(f"rank {o.rank} {what}")
    return record


# ---- 13. a symlinked shard, a shard replaced mid-load -----------------------------------------


def shard_trouble(case: str) -> FaultRecord:
    """SHARD_TROUBLES[case], in this process: the load must raise CheckpointError saying what
    happened (a symlink; the checkpoint changed while loading), not "missing" or "corrupted",
    with the engine unchanged."""
    import hf_zero.checkpoint.format as fmt

    record = FaultRecord(SHARD_TROUBLES[case], 1, 1)
    name = "params-rank00000-of-00001.safetensors"
    expected = {
        "symlinked": f"{name} is a symlink (to ",
        "replaced-mid-load": f"the checkpoint changed while loading ({name} was replaced",
    }[case]
    with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
        ckpt, other = Path(tmp) / "ckpt", Path(tmp) / "other"
        _one_rank_checkpoint(ckpt, 0)
        _one_rank_checkpoint(other, 1)
        real = fmt.read_manifest_at
        if case == "symlinked":
            os.replace(ckpt / "zero" / name, Path(tmp) / name)
            (ckpt / "zero" / name).symlink_to(Path(tmp) / name)
        else:

            def read_then_replace(dir_fd, path):
                got = real(dir_fd, path)
                if not (Path(tmp) / "replaced").exists():
                    time.sleep(0.05)  # file times are coarse: after the load began, measurably
                    shutil.copyfile(other / "zero" / name, Path(tmp) / "new")  # a new file
                    os.replace(Path(tmp) / "new", ckpt / "zero" / name)
                    (Path(tmp) / "replaced").touch()
                return got

            fmt.read_manifest_at = read_then_replace
        model = make_model("gpt2", seed=2)
        engine = hf_zero.initialize(model, torch.optim.AdamW(param_groups(model), lr=1e-3))
        masters = engine._checkpoint_state().masters
        before = {i: m.detach().clone() for i, m in masters.items()}
        t0 = time.monotonic()
        try:
            engine.load_checkpoint(ckpt)
            record.ranks = [finished_outcome(0, t0)]
        except Exception as e:
            record.ranks = [raised_outcome(0, e, t0)]
        finally:
            fmt.read_manifest_at = real
        check_survivors(record, "CheckpointError", tmp=tmp)
        if expected not in record.ranks[0].message:
            record.problems.append(f"the error does not say {expected!r}")
        if engine.global_steps or any(not torch.equal(before[i], m) for i, m in masters.items()):
            record.problems.append("the engine changed")
    return record
