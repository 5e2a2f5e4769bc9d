"""Checkpoint fault scenarios: saves that fail and files that are damaged, on real gloo ranks.

The same harness as `faults` (records, outcomes, checks); see there. Scenarios:
5. a save that fails: a rank SIGKILLed after writing its files (manifest not yet written), a
   write error in the middle of a file (RLIMIT_FSIZE), a checkpoint path that cannot be a
   directory. Every rank that is still alive raises; the previous checkpoint verifies against
   its manifest (size and sha256 of every file) and is the one `latest_checkpoint` and resume
   pick.
6. corrupted files on load (truncated, flipped byte, missing rank file; each a file of the last
   rank): every rank fails within the collective timeout, and the rank that reads the file
   names it.

Each scenario saves and loads in a temporary directory of its own; messages show it as <tmp>.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_zero.checkpoint import CheckpointError, latest_checkpoint
from hf_zero.checkpoint.reader import CheckpointReader
from scripts.harness.faults import (
    MARGIN_S,
    FaultRecord,
    check_names_collective,
    check_survivors,
    die,
    finished_outcome,
    job_failed,
    make_engine,
    raised_outcome,
    run_job,
    train_step,
    victim_outcome,
)

__all__ = [
    "sigkill_during_save",
    "disk_error_during_save",
    "corrupted_file_on_load",
    "verify_checkpoint",
    "DISK_FAULTS",
    "CORRUPTIONS",
    "CKPT_TIMEOUT_S",
]

# Collective timeout in these scenarios: a rank that dies in a save must not cost 600 s.
CKPT_TIMEOUT_S = 10.0

DISK_FAULTS = {
    "file-too-large": "RLIMIT_FSIZE mid-file on rank 1",
    "not-a-directory": "checkpoint dir unwritable (parent is a file)",
}
# corruption -> (which file of the last rank, label)
CORRUPTIONS = {
    "truncated": ("params", "truncated"),
    "flipped-byte": ("optim", "flipped byte"),
    "missing": ("params", "missing rank file"),
}


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint at `path` is complete (its manifest reads and every file matches
    the manifest's size and sha256), else what is wrong."""
    try:
        with CheckpointReader(path) as reader:
            for name in reader.manifest.files:
                reader.verify(name)
    except CheckpointError as e:
        return str(e)
    return None


def _previous_intact(record: FaultRecord, previous: Path, latest: Path | None) -> bool:
    """Whether `previous` verifies and is `latest`; records a problem when not."""
    why = verify_checkpoint(previous)
    if why is not None:
        record.problems.append(f"the previous checkpoint is damaged: {why}")
    if latest is None or latest.name != previous.name:
        record.problems.append(
            f"latest_checkpoint picks {latest and latest.name}, not {previous.name}"
        )
    return why is None and latest is not None and latest.name == previous.name


# ---- 5. a save that fails ----------------------------------------------------------------------


def _save_then_die(rank, world_size, root, stage, fault_file):
    import hf_zero.checkpoint.sharded as sharded

    engine = make_engine(stage, timeout_s=CKPT_TIMEOUT_S)
    train_step(engine, rank, world_size, 0)
    engine.save_checkpoint(os.path.join(root, "checkpoint-1"))
    train_step(engine, rank, world_size, 1)
    if rank == 1:
        real = sharded._write_rank_files

        def write_then_die(*args, **kwargs):
            real(*args, **kwargs)
            die(fault_file)  # files written, manifest not yet

        sharded._write_rank_files = write_then_die
    t0 = time.monotonic()
    try:
        engine.save_checkpoint(os.path.join(root, "checkpoint-2"))
    except Exception as e:
        return raised_outcome(rank, e, t0)
    return finished_outcome(rank, t0)


def _resume(rank, world_size, root, stage):
    path = latest_checkpoint(root)
    if path is None:
        return None, None
    engine = make_engine(stage)
    engine.load_checkpoint(path)
    return path.name, engine.global_steps


def sigkill_during_save(stage: int = 2, *, world_size: int = 2) -> FaultRecord:
    """Save checkpoint-1 after one step; after the second, rank 1 SIGKILLs itself in the middle
    of saving checkpoint-2 (its files written, the manifest not yet). The other ranks must raise
    within the collective timeout; checkpoint-1 must verify against its manifest, be what
    `latest_checkpoint` picks, and resume on every rank at step 1. `extra`: the directory
    listing after the fault ("names") and every rank's (checkpoint, step) on resume
    ("resumed")."""
    victim = 1
    record = FaultRecord(
        "SIGKILL during save (rank 1, files written)",
        stage,
        world_size,
        checkpoint_intact=False,
        bound_s=CKPT_TIMEOUT_S + MARGIN_S,
        faulty_ranks=[victim],
    )
    with tempfile.TemporaryDirectory(prefix="hf_zero-fault-") as tmp:
        root = os.path.join(tmp, "run")
        os.mkdir(root)
        fault_file = os.path.join(tmp, "killed-at")
        results, error = run_job(
            _save_then_die,
            world_size,
            root,
            stage,
            fault_file,
            timeout=120,
            may_die={victim},
        )
        if error is not None:
            return job_failed(record, error)
        killed, record.problems = victim_outcome(results[victim], victim, fault_file)
        record.ranks = [killed if r == victim else results[r] for r in range(world_size)]
        check_survivors(record, "CollectiveError", since=killed.failed_at, tmp=tmp)
        check_names_collective(record)
        record.extra["names"] = names = sorted(os.listdir(root))
        if "checkpoint-2" in names:
            record.problems.append("the killed save produced checkpoint-2")
        resumed, error = run_job(_resume, world_size, root, stage, timeout=120)
        if error is not None:
            return job_failed(record, error)
        record.extra["resumed"] = resumed
        record.checkpoint_intact = _previous_intact(
            record, Path(root) / "checkpoint-1", latest_checkpoint(root)
        )
        if resumed != [("checkpoint-1", 1)] * world_size:
            record.checkpoint_intact = False
            record.problems.append(f"resume loaded {resumed}, not checkpoint-1 at step 1")
    return record


def _save_with_disk_error(rank, world_size, root, stage, fault):
    import resource

    engine = make_engine(stage, timeout_s=CKPT_TIMEOUT_S)
    train_step(engine, rank, world_size, 0)
    engine.save_checkpoint(os.path.join(root, "checkpoint-1"))
    train_step(engine, rank, world_size, 1)
    target = os.path.join(root, "checkpoint-2")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if fault == "file-too-large" and rank == 1:
        # A real write error in the middle of a file: the kernel refuses to grow it past 16 KiB.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, limits[1]))
    if fault == "not-a-directory":
        # Root may write anywhere, so the directory is made impossible rather than read-only.
        target = os.path.join(root, "a-file", "checkpoint-2")
        if rank == 0:
            open(os.path.join(root, "a-file"), "w").close()
        torch.distributed.barrier()
    t0 = time.monotonic()
    try:
        engine.save_checkpoint(target)
    except Exception as e:
        outcome = raised_outcome(rank, e, t0)
    else:
        outcome = finished_outcome(rank, t0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    # The job can go on, and a later save works.
    engine.save_checkpoint(os.path.join(root, "checkpoint-3"))
    return outcome


def disk_error_during_save(fault: str, stage: int = 2, *, world_size: int = 2) -> FaultRecord:
    """Save checkpoint-1, train a step, then fail saving checkpoint-2 with a real disk error
    (DISK_FAULTS), then save checkpoint-3. Every rank must raise CheckpointError naming the
    failing path and saying the previous checkpoint was left as it was; no checkpoint-2 and no
    temporary directory may remain; checkpoint-3 must be the latest and, once removed,
    checkpoint-1 (which must verify). `extra`: the listing after the saves ("names") and the
    latest checkpoint before and after checkpoint-3 is removed ("latest")."""
    record = FaultRecord(
        f"disk error during save: {DISK_FAULTS[fault]}",
        stage,
        world_size,
        checkpoint_intact=False,
        bound_s=CKPT_TIMEOUT_S + MARGIN_S,
    )
    with tempfile.TemporaryDirectory(prefix="hf_zero-fault-") as tmp:
        root = os.path.join(tmp, "run")
        os.mkdir(root)
        results, error = run_job(_save_with_disk_error, world_size, root, stage, fault, timeout=120)
        if error is not None:
            return job_failed(record, error)
        record.ranks = results
        check_survivors(record, "CheckpointError", tmp=tmp)
        names_path = (
            r"writing \S+checkpoint-2\.tmp-\w+/zero/\S+\.safetensors failed"
            if fault == "file-too-large"
            else r"a-file.*NotADirectoryError|NotADirectoryError.*a-file"
        )
        for o in results:
            if o.status != "raised":
                continue
            if "previous checkpoint left as it was" not in o.message:
                record.problems.append(f"rank {o.rank}'s error does not vouch for the previous")
            if not re.search(names_path, o.message):
                record.problems.append(f"rank {o.rank}'s error does not name the failing path")
        record.extra["names"] = names = sorted(os.listdir(root))
        if "checkpoint-2" in names or any(".tmp-" in n for n in names):
            record.problems.append(f"the failed save left files behind: {names}")
        latest = [latest_checkpoint(root)]
        if latest[0] is None or latest[0].name != "checkpoint-3":
            record.problems.append("the save after the failure is not the latest checkpoint")
        shutil.rmtree(os.path.join(root, "checkpoint-3"), ignore_errors=True)
        latest.append(latest_checkpoint(root))
        record.extra["latest"] = [p and p.name for p in latest]
        record.checkpoint_intact = _previous_intact(record, Path(root) / "checkpoint-1", latest[1])
    return record


# ---- 6. corrupted files on load ----------------------------------------------------------------


def _save_worker(rank, world_size, path, stage):
    engine = make_engine(stage, timeout_s=CKPT_TIMEOUT_S)
    train_step(engine, rank, world_size, 0)
    engine.save_checkpoint(path)


def _load_worker(rank, world_size, path, stage):
    engine = make_engine(stage, timeout_s=CKPT_TIMEOUT_S)
    masters = engine._checkpoint_state().masters
    before = {i: m.detach().clone() for i, m in masters.items()}
    t0 = time.monotonic()
    try:
        engine.load_checkpoint(path)
    except Exception as e:
        outcome = raised_outcome(rank, e, t0)
    else:
        outcome = finished_outcome(rank, t0)
    outcome.detail = {
        "unchanged": engine.global_steps == 0
        and not engine.optimizer.state
        and all(torch.equal(before[i], m) for i, m in masters.items())
    }
    return outcome


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "flipped-byte":
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def corrupted_file_on_load(
    hows: Sequence[str] = tuple(CORRUPTIONS), stage: int = 2, *, world_size: int = 2
) -> list[FaultRecord]:
    """Save one checkpoint, then for each corruption (CORRUPTIONS) damage one file of the last
    rank in a copy and load it on every rank. Every rank must raise CheckpointError naming the
    file, within the collective timeout, with its engine exactly as it was: the ranks agree on
    the checks before any of them copies anything."""
    records = []
    with tempfile.TemporaryDirectory(prefix="hf_zero-fault-") as tmp:
        good = Path(tmp) / "good"
        _, error = run_job(_save_worker, world_size, str(good), stage, timeout=120)
        for how in hows:
            kind, label = CORRUPTIONS[how]
            record = FaultRecord(
                f"corrupted file on load: {label}",
                stage,
                world_size,
                bound_s=CKPT_TIMEOUT_S + MARGIN_S,
            )
            records.append(record)
            if error is not None:
                job_failed(record, error)
                continue
            ckpt = Path(tmp) / how
            shutil.copytree(good, ckpt)
            name = f"{kind}-rank{world_size - 1:05d}-of-{world_size:05d}.safetensors"
            _corrupt(ckpt / "zero" / name, how)
            results, load_error = run_job(_load_worker, world_size, str(ckpt), stage, timeout=120)
            if load_error is not None:
                job_failed(record, load_error)
                continue
            record.ranks = results
            check_survivors(record, ("CheckpointError",), tmp=tmp)
            for o in results:
                if o.error_type != "CheckpointError" or name not in (o.message or ""):
                    record.problems.append(f"rank {o.rank}'s error does not name {name}")
                if not o.detail["unchanged"]:
                    record.problems.append(f"rank {o.rank} changed its engine before failing")
    return records
