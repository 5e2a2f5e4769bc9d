"""Fault scenarios: inject one fault into a real multi-rank gloo job and record what happened.

The fault tests and `scripts/reliability_report.py` share these scenarios. A scenario is a
function that starts real processes (`run_distributed`), injects its fault and returns
`FaultRecord`s: the fault, stage, world size, time to failure, the survivors' error (first
line), whether the previous checkpoint is intact, every rank's outcome, and `problems`, the
requirements the job did not meet (none when it failed as it should). The tests assert on the
records; the report prints them. Nothing here raises on a misbehaving job: a job that hangs past
its deadline or dies unexpectedly becomes a record with a problem, so the report lists every
scenario.

Scenarios here (the rank that misbehaves is the last one unless noted); the checkpoint ones
are in `checkpoint_faults`:
1. dead rank: SIGKILLed mid-backward of the second step; the others raise CollectiveError naming
   the collective and the phase within the collective timeout plus `MARGIN_S`.
2. stalled rank: sleeps instead of calling collectives; the others raise CollectiveError after
   the collective timeout (not before it, not much after it).
3. ranks that disagree at initialize (model config, ZeroConfig stage, optimizer class,
   param-group layout): every rank raises ValueError naming the first difference and the ranks.
4. non-finite gradient without a loss scaler: every rank raises naming the optimizer step, or
   with nonfinite_grads="skip" every rank skips it with a warning, weights untouched.
5. misuse of the training loop (MISUSES): each either does what torch/DDP does or raises, on
   every rank, an error that names the fix.

"Raised" stands for "exits non-zero": the workers catch the error to time and report it, where a
training script would let it end the process.

Timing: `RankOutcome.failed_at` is `time.monotonic()`, one clock for every process on the
machine, so a rank that kills itself first writes that moment to a file, and the time to failure
is the survivors' `failed_at` minus it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hf_zero
from scripts.harness.cases import global_batch, make_model, param_groups, rank_slice
from scripts.harness.dist import run_distributed

__all__ = [
    "FaultRecord",
    "RankOutcome",
    "dead_rank",
    "stalled_rank",
    "disagreement",
    "nonfinite_grads",
    "misuse",
    "DISAGREEMENTS",
    "MISUSES",
    "TIMEOUT_S",
    "STALL_S",
    "MARGIN_S",
    # building blocks for scenarios elsewhere (checkpoint_faults)
    "make_engine",
    "train_step",
    "raised_outcome",
    "finished_outcome",
    "die",
    "run_job",
    "first_line",
    "job_failed",
    "victim_outcome",
    "check_survivors",
    "check_names_collective",
]

# Collective timeout for the dead and stalled rank scenarios, and how long the stalled rank sleeps.
TIMEOUT_S = 3.0
STALL_S = 4.5
# What "within the collective timeout" may add: process scheduling on a loaded 2-core machine.
MARGIN_S = 5.0

DISAGREEMENTS = {
    "model": "different model config (n_embd) on rank 2",
    "config": "different ZeroConfig stage on rank 1",
    "optimizer": "different optimizer class on rank 1",
    "groups": "different param-group layout on rank 0",
}
# What names a collective and its phase in a CollectiveError (comm labels).
_COLLECTIVE_RE = re.compile(
    r"^rank (\d+): (.+) failed: a peer rank disappeared or stopped calling collectives"
)
_PHASES = (
    "(forward)",
    "(backward)",
    "(optimizer step)",
    "after the optimizer step",
    "save_checkpoint",
    "load_checkpoint",
    "at initialize",
)


@dataclass
class RankOutcome:
    """What one rank did in a scenario."""

    rank: int
    status: str
    """"raised", "finished", or "died" (killed on purpose, no report)."""
    error_type: str = ""
    message: str = ""
    """The full text of the error it raised (or of the warning it gave)."""
    elapsed_s: float | None = None
    """From the start of the faulty step (or call) to the error."""
    failed_at: float | None = None
    """time.monotonic() when the error came (or when a killed rank died)."""
    detail: Any = None
    """Scenario-specific: the non-finite scenario's per-step outcomes, whether a failed load left
    the engine as it was, ..."""


@dataclass
class FaultRecord:
    """One row of the reliability report."""

    fault: str
    stage: int | str
    world_size: int
    time_to_failure_s: float | None = None
    """From the fault to the last survivor's error; None where nothing fails (skip policy)."""
    message: str = ""
    """First line of the survivors' error, the scenario's temporary directory shown as <tmp>."""
    checkpoint_intact: bool | None = None
    """The previous checkpoint verifies and resume picks it; None where no save is involved."""
    bound_s: float | None = None
    """The time to failure the scenario requires, at most."""
    ranks: list[RankOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Requirements not met; empty when the job failed as it should."""
    notes: list[str] = field(default_factory=list)
    """Observations that are not failures (for example a rank that was changed before failing)."""
    faulty_ranks: list[int] = field(default_factory=list)
    """The ranks the fault was injected into (killed, stalled); every other rank must fail."""
    run_error: str | None = None
    """run_distributed's error when the job itself went wrong (hung, crashed)."""
    extra: dict = field(default_factory=dict)
    """Scenario-specific facts the tests check: directory listings, resume results, ..."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def survivors(self) -> list[RankOutcome]:
        return [o for o in self.ranks if o.rank not in self.faulty_ranks]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


# ---- worker-side helpers -----------------------------------------------------------------------


def make_engine(stage, *, timeout_s=600.0, mixed="no", nonfinite="raise"):
    model = make_model("gpt2")
    cfg = hf_zero.ZeroConfig(
        stage=stage,
        collective_timeout_s=timeout_s,
        mixed_precision=mixed,
        nonfinite_grads=nonfinite,
    )
    return hf_zero.initialize(model, torch.optim.AdamW(param_groups(model), lr=1e-3), config=cfg)


def train_step(engine, rank, world_size, step):
    engine.backward(engine(**rank_slice(global_batch("gpt2", step, 0, world_size), rank)).loss)
    engine.step()
    engine.zero_grad()


def raised_outcome(rank, error: BaseException, t0: float, detail=None) -> RankOutcome:
    now = time.monotonic()
    return RankOutcome(rank, "raised", type(error).__name__, str(error), now - t0, now, detail)


def finished_outcome(rank, t0: float, detail=None) -> RankOutcome:
    return RankOutcome(rank, "finished", elapsed_s=time.monotonic() - t0, detail=detail)


def die(fault_file: str) -> None:
    """Record the moment, then SIGKILL this process: no handler, no flush, no goodbye."""
    with open(fault_file, "w") as f:
        f.write(repr(time.monotonic()))
    os.kill(os.getpid(), signal.SIGKILL)


# ---- parent-side helpers -----------------------------------------------------------------------


def run_job(fn, world_size, *args, timeout, may_die=()):
    """run_distributed, with a failed job returned as its message instead of raised."""
    try:
        return run_distributed(fn, world_size, *args, timeout=timeout, may_die=may_die), None
    except AssertionError as e:
        return None, str(e)


def first_line(text: str, tmp: str | None = None) -> str:
    """The first line of `text`, stripped, with the directory `tmp` shown as <tmp>."""
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line.replace(tmp, "<tmp>") if tmp else line


def job_failed(record: FaultRecord, error: str) -> FaultRecord:
    """Mark `record` as a job that went wrong as a whole (hung, crashed, raised unexpectedly)."""
    record.run_error = error
    record.problems.append(f"the job itself failed: {first_line(error)}")
    return record


def victim_outcome(result, rank: int, fault_file: str) -> tuple[RankOutcome, list[str]]:
    """The outcome of the rank that was meant to SIGKILL itself, and what is wrong with it."""
    if result is not None:
        return result, [f"rank {rank} was to be killed but reported {result.status}"]
    if not os.path.exists(fault_file):
        return RankOutcome(rank, "died"), [f"rank {rank} died before the fault was injected"]
    killed_at = float(Path(fault_file).read_text())
    return RankOutcome(rank, "died", "SIGKILL", failed_at=killed_at), []


def check_survivors(
    record: FaultRecord,
    error_types: str | tuple[str, ...],
    *,
    since: float | None = None,
    at_least: float = 0.0,
    tmp: str | None = None,
) -> None:
    """Every survivor raised one of `error_types` within the record's bound (and no sooner than
    `at_least`). Fills in the time to failure, from `since` (a monotonic moment) or else each
    rank's own start, and the message: the first survivor's error of the first type."""
    if isinstance(error_types, str):
        error_types = (error_types,)
    failed = []
    for o in record.survivors():
        if o.status != "raised":
            record.problems.append(f"rank {o.rank} {o.status} instead of failing")
            continue
        failed.append(o)
        if o.error_type not in error_types:
            wanted = " or ".join(error_types)
            record.problems.append(f"rank {o.rank} raised {o.error_type}, not {wanted}")
        t = o.failed_at - since if since is not None else o.elapsed_s
        record.time_to_failure_s = max(t, record.time_to_failure_s or 0.0)
        if record.bound_s is not None and t > record.bound_s:
            record.problems.append(f"rank {o.rank} failed after {t:.1f} s > {record.bound_s:g} s")
        if t < at_least:
            record.problems.append(f"rank {o.rank} failed after {t:.1f} s, before {at_least:g} s")
    first = [o for o in failed if o.error_type == error_types[0]] or failed
    if first:
        record.message = first_line(first[0].message, tmp)


def check_names_collective(record: FaultRecord) -> None:
    """Every survivor's CollectiveError names its own rank, the collective and the phase."""
    for o in record.survivors():
        if o.error_type != "CollectiveError":
            continue
        m = _COLLECTIVE_RE.match(o.message)
        if m is None or int(m.group(1)) != o.rank:
            record.problems.append(f"rank {o.rank}'s error does not say which rank failed where")
        elif not any(p in m.group(2) for p in _PHASES):
            record.problems.append(f"rank {o.rank}'s error names no phase: {m.group(2)!r}")


# ---- 1. a dead rank ----------------------------------------------------------------------------


def _dead_rank_worker(rank, world_size, stage, timeout_s, fault_file):
    engine = make_engine(stage, timeout_s=timeout_s)
    if rank == world_size - 1:
        # Die in the middle of the second step's backward (after its first gradient).
        p = engine.module.transformer.h[1].mlp.c_proj.weight
        p.register_hook(lambda g: die(fault_file) if engine.global_steps == 1 else None)
    t0 = time.monotonic()
    try:
        for step in range(2):
            t0 = time.monotonic()
            train_step(engine, rank, world_size, step)
    except Exception as e:
        return raised_outcome(rank, e, t0)
    return finished_outcome(rank, t0)


def dead_rank(stage: int, *, world_size: int = 3, timeout_s: float = TIMEOUT_S) -> FaultRecord:
    """SIGKILL the last rank mid-backward of the second step. The others must raise a
    CollectiveError naming the collective and the phase within timeout_s + MARGIN_S of the kill
    (gloo sees the connection drop, so in practice at once). `RankOutcome.elapsed_s` of a
    survivor counts from the start of its second step, a little before the kill."""
    victim = world_size - 1
    record = FaultRecord(
        "dead rank (SIGKILL mid-backward)",
        stage,
        world_size,
        bound_s=timeout_s + MARGIN_S,
        faulty_ranks=[victim],
    )
    with tempfile.TemporaryDirectory(prefix="hf_zero-fault-") as tmp:
        fault_file = os.path.join(tmp, "killed-at")
        results, error = run_job(
            _dead_rank_worker,
            world_size,
            stage,
            timeout_s,
            fault_file,
            timeout=120,
            may_die={victim},
        )
        if error is not None:
            return job_failed(record, error)
        killed, record.problems = victim_outcome(results[victim], victim, fault_file)
    record.ranks = [killed if r == victim else results[r] for r in range(world_size)]
    check_survivors(record, "CollectiveError", since=killed.failed_at)
    check_names_collective(record)
    return record


# ---- 2. a stalled rank -------------------------------------------------------------------------


def _stall_worker(rank, world_size, stages, timeout_s, stall_s):
    rows = []
    for stage in stages:
        engine = make_engine(stage, timeout_s=timeout_s)
        t0 = time.monotonic()
        try:
            for step in range(2):
                if step == 1 and rank == world_size - 1:
                    time.sleep(stall_s)  # this rank stalls: no collective for a while
                t0 = time.monotonic()
                train_step(engine, rank, world_size, step)
            rows.append(finished_outcome(rank, t0))
        except Exception as e:
            rows.append(raised_outcome(rank, e, t0))
    return rows


def stalled_rank(
    stages: Iterable[int] = (0, 1, 2, 3),
    *,
    world_size: int = 3,
    timeout_s: float = TIMEOUT_S,
    stall_s: float = STALL_S,
) -> list[FaultRecord]:
    """The last rank sleeps `stall_s` (> timeout_s) before the second step instead of calling
    collectives, at each of `stages` in turn, all in one job. The others must raise a
    CollectiveError naming the collective and the phase, no sooner than timeout_s - 0.5 and no
    later than timeout_s + MARGIN_S after they entered the step. The stalled rank, when it wakes,
    finds its peers gone: it may fail too, but with a CollectiveError only."""
    stages = list(stages)
    stalled = world_size - 1
    records = [
        FaultRecord(
            f"stalled rank (sleeps {stall_s:g} s, timeout {timeout_s:g} s)",
            stage,
            world_size,
            bound_s=timeout_s + MARGIN_S,
            faulty_ranks=[stalled],
        )
        for stage in stages
    ]
    results, error = run_job(
        _stall_worker,
        world_size,
        stages,
        timeout_s,
        stall_s,
        timeout=60 + len(stages) * (stall_s + 3 * timeout_s + 30),
    )
    if error is not None:
        return [job_failed(record, error) for record in records]
    for i, record in enumerate(records):
        record.ranks = [rows[i] for rows in results]
        check_survivors(record, "CollectiveError", at_least=timeout_s - 0.5)
        check_names_collective(record)
        late = record.ranks[stalled]
        if late.status == "raised" and late.error_type != "CollectiveError":
            record.problems.append(f"the stalled rank raised {late.error_type}")
    return records


# ---- 3. ranks that disagree at initialize ------------------------------------------------------


def _initialize_worker(rank, world_size, case):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    n_embd = 48 if (case == "model" and rank == 2) else 32
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=97, n_positions=8)
    )
    stage = 3 if (case == "config" and rank == 1) else 2
    if case == "optimizer" and rank == 1:
        opt = torch.optim.SGD(param_groups(model), lr=1e-3, momentum=0.9)
    elif case == "groups" and rank == 0:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.AdamW(param_groups(model), lr=1e-3)
    t0 = time.monotonic()
    try:
        hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
    except Exception as e:
        return raised_outcome(rank, e, t0)
    return finished_outcome(rank, t0)


def disagreement(case: str, *, world_size: int = 3) -> FaultRecord:
    """One rank builds a different model, config, optimizer or param-group layout (DISAGREEMENTS;
    needs world_size 3). Every rank must raise ValueError at initialize naming the first
    difference and which ranks hold which value. The time counts from each rank's call to
    initialize, so it includes waiting for ranks that start later."""
    record = FaultRecord(
        f"ranks disagree at initialize: {DISAGREEMENTS[case]}",
        "2 vs 3" if case == "config" else 2,
        world_size,
    )
    results, error = run_job(_initialize_worker, world_size, case, timeout=120)
    if error is not None:
        return job_failed(record, error)
    record.ranks = results
    check_survivors(record, "ValueError")
    for o in results:
        if o.status == "raised" and not re.match(
            r"ranks disagree at initialize: \S+ differs \(ranks \[[\d, ]+\]: .+; ranks \[",
            o.message,
        ):
            record.problems.append(f"rank {o.rank}'s error names no difference and ranks")
    return record


# ---- 4. non-finite gradients without a loss scaler ---------------------------------------------


def _nonfinite_worker(rank, world_size, stages, mixed, policy):
    rows = []
    for stage in stages:
        engine = make_engine(stage, mixed=mixed, nonfinite=policy)
        steps = []  # per optimizer step: (applied / skipped / raised, warnings or error, unchanged)
        outcome = None
        for step in range(3):
            t0 = time.monotonic()
            loss = engine(**rank_slice(global_batch("gpt2", step, 0, world_size), rank)).loss
            if step == 1 and rank == 1:
                loss = loss * float("nan")  # one rank, one step
            engine.backward(loss)
            before = engine.full_state_dict(all_ranks=True)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    applied = engine.step()
            except FloatingPointError as e:
                steps.append(("raised", str(e), None))
                outcome = raised_outcome(rank, e, t0, detail=steps)
                break
            finally:
                engine.zero_grad()
            after = engine.full_state_dict(all_ranks=True)
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
            kind = "applied" if applied else "skipped"
            steps.append((kind, [str(w.message) for w in caught], unchanged))
        rows.append(outcome or finished_outcome(rank, t0, detail=steps))
    return rows


def nonfinite_grads(
    mixed: str, policy: str, stages: Iterable[int] = (0, 1, 2, 3), *, world_size: int = 2
) -> list[FaultRecord]:
    """Rank 1's loss is NaN in the second of three optimizer steps (fp32 or bf16: no loss
    scaler), at each of `stages` within one job. With nonfinite_grads="raise" every rank must
    raise FloatingPointError naming optimizer step 2; with "skip" every rank skips that step
    with a warning naming it, leaves the weights as they were, and applies the next one.
    `RankOutcome.detail` lists (applied / skipped / raised, warnings or error, weights
    unchanged) per step."""
    stages = list(stages)
    precision = "fp32" if mixed == "no" else mixed
    records = [
        FaultRecord(f"non-finite grad ({precision}), nonfinite_grads={policy!r}", stage, world_size)
        for stage in stages
    ]
    results, error = run_job(
        _nonfinite_worker, world_size, stages, mixed, policy, timeout=60 + 60 * len(stages)
    )
    if error is not None:
        return [job_failed(record, error) for record in records]
    for i, record in enumerate(records):
        record.ranks = [rows[i] for rows in results]
        if policy == "raise":
            check_survivors(record, "FloatingPointError")
            for o in record.ranks:
                if [s[0] for s in o.detail] != ["applied", "raised"]:
                    record.problems.append(f"rank {o.rank}: steps {[s[0] for s in o.detail]}")
                elif "at optimizer step 2" not in o.message:
                    record.problems.append(f"rank {o.rank}'s error does not name step 2")
            continue
        for o in record.ranks:
            kinds = [s[0] for s in o.detail]
            if kinds != ["applied", "skipped", "applied"]:
                record.problems.append(f"rank {o.rank}: steps {kinds}, not skipped once")
                continue
            said = [w for w in o.detail[1][1] if "at optimizer step 2" in w]
            if not said:
                record.problems.append(f"rank {o.rank} skipped without a warning naming step 2")
            elif not record.message:
                record.message = first_line(said[0])
            if not o.detail[1][2]:
                record.problems.append(f"rank {o.rank}'s weights changed in the skipped step")
    return records


# ---- 5. misuse of the training loop -------------------------------------------------------------

MISUSES = {
    "accumulate-synced": "two backward() before step() without no_sync",
    "no-zero-grad": "backward after step() without zero_grad()",
    "idle-step": "step() with no backward since the last step",
    "double-clip": "clip_grad_norm_ twice in one step",
    "torch-clip": "torch.nn.utils.clip_grad_norm_ on the engine's parameters",
    "initialize-twice": "hf_zero.initialize twice on one model",
    "odd-dtypes": "frozen int64 (2**25+1) and float64 parameters",
    "save-pretrained": "model.save_pretrained on the engine's model",
    "fp16-nan": "fp16 with a NaN loss every step",
}


def _misuse_case(case, rank, world_size, stage):
    """Run one misuse; returns (outcome, detail): "raised" with the error, or "finished" with
    what the engine did instead (compared with torch by the parent)."""
    if case == "fp16-nan":
        engine = make_engine(stage, mixed="fp16")
        caught_all = []
        for step in range(60):
            loss = engine(**rank_slice(global_batch("gpt2", step, 0, world_size), rank)).loss
            engine.backward(loss * float("nan"))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.step()  # raises FloatingPointError before the scale underflows
            caught_all += [str(w.message) for w in caught if "loss scale" in str(w.message)]
            engine.zero_grad()
        return "finished", caught_all
    engine = make_engine(stage)
    model = engine.module

    def loss(step=0, micro=0):
        return engine(**rank_slice(global_batch("gpt2", step, micro, world_size), rank)).loss

    if case == "accumulate-synced":
        engine.backward(loss(0, 0) / 2)
        engine.backward(loss(0, 1) / 2)  # no no_sync around the first
        return "finished", engine.clip_grad_norm_(1e9).item()
    if case == "no-zero-grad":
        train_step(engine, rank, world_size, 0)
        engine.step()  # a second step: nothing to apply
        engine.backward(loss(1))
        engine.step()
        engine.backward(loss(2))  # raises: zero_grad() was forgotten
        return "finished", None
    if case == "idle-step":
        applied = engine.step()
        return "finished", (applied, engine.global_steps, len(engine.optimizer.state))
    if case == "double-clip":
        engine.backward(loss())
        return "finished", [engine.clip_grad_norm_(1.0).item() for _ in range(2)]
    if case == "torch-clip":
        engine.backward(loss())
        return "finished", torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
    if case == "initialize-twice":
        hf_zero.initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        return "finished", None
    if case == "odd-dtypes":
        fresh = make_model("gpt2")
        big = torch.tensor([2**25 + 1], dtype=torch.int64)
        fresh.register_parameter("counter", torch.nn.Parameter(big, requires_grad=False))
        third = torch.tensor([1 / 3], dtype=torch.float64)
        fresh.register_parameter("third", torch.nn.Parameter(third, requires_grad=False))
        odd = hf_zero.initialize(
            fresh,
            torch.optim.AdamW(param_groups(fresh), lr=1e-3),
            config=hf_zero.ZeroConfig(stage=stage),
        )
        train_step(odd, rank, world_size, 0)
        sd = odd.full_state_dict(all_ranks=True)
        return "finished", (torch.equal(sd["counter"], big) and torch.equal(sd["third"], third))
    if case == "save-pretrained":
        with tempfile.TemporaryDirectory(prefix="hf_zero-misuse-") as tmp:
            model.save_pretrained(tmp)
        return "finished", None
    raise ValueError(f"unknown misuse {case!r}; known: {', '.join(MISUSES)}")


def _misuse_worker(rank, world_size, cases, stages):
    rows = []
    for case in cases:
        for stage in stages:
            t0 = time.monotonic()
            try:
                _, detail = _misuse_case(case, rank, world_size, stage)
                rows.append(finished_outcome(rank, t0, detail))
            except Exception as e:
                rows.append(raised_outcome(rank, e, t0))
    return rows


def _as_torch(case: str, got, accumulated: float, clips: list[float]) -> bool:
    if case == "accumulate-synced":
        return abs(got - accumulated) <= 1e-5 * accumulated
    if case == "idle-step":
        return got == (False, 0, 0)
    if case == "double-clip":
        return all(abs(a - b) <= 1e-5 * b for a, b in zip(got, clips))
    if case == "odd-dtypes":
        return got is True
    return case == "save-pretrained"  # stages 0-2: the model's own, as before


def _reference_norms(world_size):
    """Single-process torch on the same global batch: the accumulated norm, the two clips."""
    model = make_model("gpt2")
    for micro in range(2):
        (model(**global_batch("gpt2", 0, micro, world_size)).loss / 2).backward()
    accumulated = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
    model.zero_grad()
    model(**global_batch("gpt2", 0, 0, world_size)).loss.backward()
    clips = [torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item() for _ in range(2)]
    return accumulated, clips


def misuse(
    cases: Iterable[str] = tuple(MISUSES),
    stages: Iterable[int] = (0, 1, 2, 3),
    *,
    world_size: int = 2,
) -> list[FaultRecord]:
    """Each misuse of `cases` at each of `stages`, all in one job. What is required: the outcome
    torch/DDP gives (accumulation counts each micro-step once; an idle step changes nothing; a
    second clip returns the clipped norm; frozen odd dtypes stay exact), or an error on every
    rank that names the fix (the rest; `save-pretrained` only at stage 3, where the parameters
    are shards)."""
    cases, stages = list(cases), list(stages)
    records = [
        FaultRecord(f"misuse: {MISUSES[case]}", stage, world_size)
        for case in cases
        for stage in stages
    ]
    results, error = run_job(
        _misuse_worker, world_size, cases, stages, timeout=120 + 60 * len(records)
    )
    if error is not None:
        return [job_failed(record, error) for record in records]
    accumulated, clips = _reference_norms(world_size)
    expect_error = {
        "no-zero-grad": ("RuntimeError", "Call engine.zero_grad()"),
        "torch-clip": ("RuntimeError", "Call engine.clip_grad_norm_(max_norm)"),
        "initialize-twice": ("ValueError", "Keep using the first engine"),
        "save-pretrained": ("RuntimeError", "engine.export(output_dir)"),
        "fp16-nan": ("FloatingPointError", "cannot back off further"),
    }
    for i, record in enumerate(records):
        case, stage = cases[i // len(stages)], stages[i % len(stages)]
        record.ranks = [rows[i] for rows in results]
        if case in expect_error and (case != "save-pretrained" or stage == 3):
            error_type, fix = expect_error[case]
            check_survivors(record, error_type)
            for o in record.ranks:
                if o.status == "raised" and fix not in o.message:
                    record.problems.append(f"rank {o.rank}'s error does not say {fix!r}")
            continue
        for o in record.ranks:
            if o.status != "finished":
                record.problems.append(
                    f"rank {o.rank} raised {o.error_type}: {first_line(o.message)}"
                )
            elif not _as_torch(case, o.detail, accumulated, clips):
                record.problems.append(f"rank {o.rank} got {o.detail!r}, torch gives otherwise")
        record.message = {
            "accumulate-synced": f"as DDP: pre-clip norm {accumulated:.6g}, each micro-step once",
            "idle-step": "as torch: a no-op, returns False, counts nothing",
            "double-clip": f"as torch: {clips[0]:.6g}, then {clips[1]:.6g}",
            "odd-dtypes": "kept whole and bit-exact on every rank",
            "save-pretrained": "the model's own save_pretrained (full parameters)",
        }[case]
    return records
