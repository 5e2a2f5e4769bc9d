"""Run every fault scenario on real gloo ranks and print a reliability table (markdown).

    python scripts/reliability_report.py                  # the full matrix, several minutes
    python scripts/reliability_report.py --quick          # one stage per fault
    python scripts/reliability_report.py --stages 0,3 --only dead-rank,stalled-rank --json r.json

Columns: fault, stage, world size, time to failure (with the bound it must meet), the message the
surviving ranks raised (first line), whether the previous checkpoint is intact, and whether the
scenario behaved as required; the unmet requirements follow the table. The scenarios are the
ones the fault tests run (scripts/harness/faults.py and checkpoint_faults.py):

- dead-rank: SIGKILL one of 3 ranks mid-backward, at each stage.
- stalled-rank: one of 3 ranks sleeps past a 3 s collective timeout, at each stage (one job).
- disagree: one of 3 ranks has another model config, stage, optimizer class or param groups.
- nonfinite: a NaN loss without a loss scaler, fp32 and bf16, raise and skip, at each stage.
- save: SIGKILL during a save, RLIMIT_FSIZE mid-file, an impossible checkpoint directory; at
  one stage: 2, or the first of --stages (every stage saves the same per-rank slices).
- load: a truncated, a flipped-byte and a missing rank file, at the same stage; a shard that
  is a symlink, and one replaced while a load runs (one rank).
- replace: a save onto a folder of user files, a folder of checkpoints, a plain file (the data
  must be byte-identical after the refusal); `hf-zero consolidate` into the checkpoint, around
  it, over a folder of other files, under a file; a save whose previous version cannot be
  deleted (chattr +i; the warning names the leftover).
- concurrent: a saver and a loader on one path for 5 s (every load one save's state, or "the
  checkpoint changed while loading"); ranks of one load that read different manifests.
- resume: param groups in another order, unfrozen parameters (refused naming them; then
  `weights_only=True` loads the exact weights).
- misuse: mistakes around the training loop (two backwards without no_sync, a forgotten
  zero_grad, an idle step, two clips, torch's own clipping, initialize twice, frozen int64 and
  float64 parameters, save_pretrained, fp16 with a NaN loss every step), at each stage (one job).

Progress goes to stderr, one line per scenario. Exits 1 if any scenario did not behave as
required, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.harness import checkpoint_faults, checkpoint_misuse, faults  # noqa: E402
from scripts.harness.faults import FaultRecord  # noqa: E402

FAMILIES = (
    "dead-rank",
    "stalled-rank",
    "disagree",
    "nonfinite",
    "save",
    "load",
    "replace",
    "concurrent",
    "resume",
    "misuse",
)
# --quick: one stage per family; together they still cover every stage once.
QUICK_STAGES = {
    "dead-rank": 3,
    "stalled-rank": 0,
    "nonfinite": 1,
    "save": 2,
    "load": 2,
    "misuse": 3,
}
COLUMNS = (
    "fault",
    "stage",
    "world size",
    "time to failure",
    "message",
    "checkpoint intact",
    "as required",
)


@dataclass(frozen=True)
class Scenario:
    """One job (or one group of jobs) of the report: a label for progress, and the call."""

    label: str
    run: Callable[[], list[FaultRecord]]


def plan(
    stages: Sequence[int] = (0, 1, 2, 3), *, quick: bool = False, only: Iterable[str] = FAMILIES
) -> list[Scenario]:
    """The scenarios to run, in report order."""
    only = set(only)
    unknown = only - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown fault families {sorted(unknown)}; known: {', '.join(FAMILIES)}")

    def at(family: str) -> list[int]:
        return [QUICK_STAGES[family]] if quick else list(stages)

    def one(family: str) -> int:
        st = at(family)
        return 2 if 2 in st else st[0]

    out = []
    if "dead-rank" in only:
        for s in at("dead-rank"):
            out.append(Scenario(f"dead rank, stage {s}", lambda s=s: [faults.dead_rank(s)]))
    if "stalled-rank" in only:
        st = at("stalled-rank")
        out.append(Scenario(f"stalled rank, stages {st}", lambda st=st: faults.stalled_rank(st)))
    if "disagree" in only:
        for case in faults.DISAGREEMENTS:
            out.append(Scenario(f"disagree: {case}", lambda c=case: [faults.disagreement(c)]))
    if "nonfinite" in only:
        st = at("nonfinite")
        for mixed, policy in [("no", "raise"), ("bf16", "raise"), ("no", "skip"), ("bf16", "skip")]:
            out.append(
                Scenario(
                    f"non-finite grad, {mixed}/{policy}, stages {st}",
                    lambda m=mixed, p=policy, st=st: faults.nonfinite_grads(m, p, st),
                )
            )
    if "save" in only:
        s = one("save")
        out.append(
            Scenario(
                f"SIGKILL during save, stage {s}",
                lambda s=s: [checkpoint_faults.sigkill_during_save(s)],
            )
        )
        for fault in checkpoint_faults.DISK_FAULTS:
            out.append(
                Scenario(
                    f"disk error {fault}, stage {s}",
                    lambda f=fault, s=s: [checkpoint_faults.disk_error_during_save(f, s)],
                )
            )
    if "load" in only:
        s = one("load")
        out.append(
            Scenario(
                f"corrupted files on load, stage {s}",
                lambda s=s: checkpoint_faults.corrupted_file_on_load(stage=s),
            )
        )
        for case in checkpoint_misuse.SHARD_TROUBLES:
            out.append(
                Scenario(
                    checkpoint_misuse.SHARD_TROUBLES[case],
                    lambda c=case: [checkpoint_misuse.shard_trouble(c)],
                )
            )
    if "replace" in only:
        for kind, label in checkpoint_misuse.FOREIGN.items():
            out.append(Scenario(label, lambda k=kind: [checkpoint_misuse.save_over_foreign(k)]))
        for kind, label in checkpoint_misuse.CONSOLIDATE_MISUSES.items():
            out.append(Scenario(label, lambda k=kind: [checkpoint_misuse.consolidate_misuse(k)]))
        out.append(
            Scenario(
                "previous version cannot be deleted",
                lambda: [checkpoint_misuse.undeletable_previous_version()],
            )
        )
    if "concurrent" in only:
        out.append(
            Scenario(
                "concurrent save and load, 5 s",
                lambda: [checkpoint_misuse.concurrent_save_and_load(5.0)],
            )
        )
        out.append(
            Scenario(
                "ranks read different manifests",
                lambda: [checkpoint_misuse.ranks_read_different_manifests()],
            )
        )
    if "resume" in only:
        for case, label in checkpoint_misuse.RESUME_MISMATCHES.items():
            out.append(Scenario(label, lambda c=case: [checkpoint_misuse.resume_mismatch(c)]))
    if "misuse" in only:
        st = at("misuse")
        out.append(Scenario(f"misuse, stages {st}", lambda st=st: faults.misuse(stages=st)))
    return out


def _cell(text, width: int | None = None) -> str:
    text = " ".join(str(text).split())
    if width is not None and len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|")


def markdown_table(records: Sequence[FaultRecord], *, message_width: int = 150) -> str:
    """The records as a markdown table (a row number, then COLUMNS), followed by the unmet
    requirements and the notes, by row number."""
    lines = [
        "| # | " + " | ".join(COLUMNS) + " |",
        "|---|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for i, r in enumerate(records, 1):
        ttf = "-" if r.time_to_failure_s is None else f"{r.time_to_failure_s:.2f} s"
        if r.bound_s is not None and r.time_to_failure_s is not None:
            ttf += f" (≤ {r.bound_s:g} s)"
        cells = [
            str(i),
            _cell(r.fault),
            _cell(r.stage),
            str(r.world_size),
            ttf,
            _cell(r.message or "-", message_width),
            {None: "n/a", True: "yes", False: "NO"}[r.checkpoint_intact],
            "yes" if r.ok else "**NO**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for title, attr in (("Not as required", "problems"), ("Notes", "notes")):
        rows = [(i, r) for i, r in enumerate(records, 1) if getattr(r, attr)]
        if rows:
            lines += ["", f"{title}:"]
            lines += [
                f"- #{i} ({r.fault}, stage {r.stage}): " + "; ".join(getattr(r, attr))
                for i, r in rows
            ]
    return "\n".join(lines)


def summary_line(records: Sequence[FaultRecord]) -> str:
    bad = sum(not r.ok for r in records)
    if not bad:
        return f"All {len(records)} scenarios behaved as required."
    return f"{bad} of {len(records)} scenarios did NOT behave as required."


def _run_one(scenario: Scenario) -> list[FaultRecord]:
    """The scenario's records; a harness error becomes a record that says so."""
    try:
        return scenario.run()
    except Exception as e:
        record = FaultRecord(scenario.label, "-", 0)
        record.problems.append(f"the harness raised {type(e).__name__}: {e}")
        record.run_error = traceback.format_exc()
        return [record]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="one stage per fault (every stage covered once)"
    )
    mode.add_argument(
        "--stages",
        default="0,1,2,3",
        help="comma-separated ZeRO stages for the per-stage faults (default 0,1,2,3)",
    )
    p.add_argument(
        "--only",
        default=",".join(FAMILIES),
        help=f"comma-separated fault families (default all: {','.join(FAMILIES)})",
    )
    p.add_argument("--json", metavar="FILE", help="also write every record, in full, as JSON")
    args = p.parse_args(argv)
    try:
        args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        p.error(f"--stages must be comma-separated integers, got {args.stages!r}")
    if not args.stages or any(s not in (0, 1, 2, 3) for s in args.stages):
        p.error(f"--stages must name stages 0-3, got {args.stages}")
    args.only = [f.strip() for f in args.only.split(",") if f.strip()]
    if not set(args.only) <= set(FAMILIES):
        p.error(f"--only takes {', '.join(FAMILIES)}; got {', '.join(args.only)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The workers build tiny models whose configs transformers warns about; keep progress legible.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    scenarios = plan(args.stages, quick=args.quick, only=args.only)
    records: list[FaultRecord] = []
    done = 0
    start = time.monotonic()
    try:
        for i, scenario in enumerate(scenarios, 1):
            print(f"[{i}/{len(scenarios)}] {scenario.label} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            got = _run_one(scenario)
            records += got
            done += 1
            bad = sum(not r.ok for r in got)
            verdict = "as required" if not bad else f"{bad} of {len(got)} NOT as required"
            took = time.monotonic() - t0
            print(
                f"[{i}/{len(scenarios)}] {scenario.label}: {verdict} ({took:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted; the table holds the scenarios that finished", file=sys.stderr)
    wall = time.monotonic() - start
    print(markdown_table(records))
    print()
    print(summary_line(records) + f" Total wall time {wall:.0f} s.")
    if args.json:
        payload = {"wall_time_s": wall, "records": [r.to_json() for r in records]}
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    return 0 if done == len(scenarios) and all(r.ok for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
