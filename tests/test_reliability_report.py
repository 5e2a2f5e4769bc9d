"""Tier 1: scripts/reliability_report.py on synthetic records: the plan of scenarios, the table,
the verdict and the exit status. No processes; the scenarios themselves are what the fault tests
run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from scripts.harness.faults import FaultRecord, RankOutcome

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reliability_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("reliability_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _records():
    good = FaultRecord(
        "dead rank (SIGKILL mid-backward)",
        3,
        3,
        time_to_failure_s=0.0512,
        message="rank 0: all-gather of unit 'transformer.h.1' (backward) failed: a | b",
        bound_s=8.0,
        ranks=[RankOutcome(0, "raised", "CollectiveError", "...")],
        faulty_ranks=[2],
    )
    bad = FaultRecord(
        "disk error during save",
        2,
        2,
        time_to_failure_s=None,
        message="x" * 300,
        checkpoint_intact=False,
        problems=["rank 1 finished instead of failing", "checkpoint-2 left behind"],
        notes=["rank 0 changed its engine before failing"],
    )
    skip = FaultRecord("non-finite grad (fp32), nonfinite_grads='skip'", 1, 2, message="")
    return [good, bad, skip]


def test_table_has_one_row_per_record_and_the_verdicts(report):
    table = report.markdown_table(_records(), message_width=40)
    lines = table.splitlines()
    assert lines[0] == (
        "| # | fault | stage | world size | time to failure | message | checkpoint intact "
        "| as required |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    rows = lines[2:5]
    assert rows[0].startswith("| 1 | dead rank (SIGKILL mid-backward) | 3 | 3 | 0.05 s (≤ 8 s) | ")
    assert rows[0].endswith(" | n/a | yes |")
    assert "failed: a \\| b" not in rows[0]  # truncated at 40 characters, before the pipe
    assert "rank 0: all-gather of unit 'transformer…" in rows[0]
    assert rows[1] == "| 2 | disk error during save | 2 | 2 | - | " + "x" * 39 + "… | NO | **NO** |"
    assert rows[2] == (
        "| 3 | non-finite grad (fp32), nonfinite_grads='skip' | 1 | 2 | - | - | n/a | yes |"
    )
    assert (
        "\nNot as required:\n- #2 (disk error during save, stage 2): rank 1 finished instead "
        "of failing; checkpoint-2 left behind" in table
    )
    assert "\nNotes:\n- #2 (disk error during save, stage 2): rank 0 changed its engine" in table
    # A pipe inside a message is escaped, not a column break.
    wide = report.markdown_table(_records())
    assert wide.splitlines()[2].count(" | ") == 7 and "failed: a \\| b |" in wide


def test_summary_line(report):
    records = _records()
    assert report.summary_line(records) == "1 of 3 scenarios did NOT behave as required."
    assert report.summary_line([records[0]]) == "All 1 scenarios behaved as required."


def test_plan_covers_every_stage_once_in_quick_mode(report):
    full = [s.label for s in report.plan()]
    assert len(full) == 4 + 1 + 4 + 4 + 3 + 3 + 8 + 2 + 2 + 1  # ... resume, misuse
    assert [s for s in full if s.startswith("dead rank")] == [
        f"dead rank, stage {s}" for s in range(4)
    ]
    assert "stalled rank, stages [0, 1, 2, 3]" in full
    quick = [s.label for s in report.plan(quick=True)]
    assert len(quick) == 1 + 1 + 4 + 4 + 3 + 3 + 8 + 2 + 2 + 1
    assert "dead rank, stage 3" in quick and "stalled rank, stages [0]" in quick
    assert "misuse, stages [0, 1, 2, 3]" in full and "misuse, stages [3]" in quick
    only = [s.label for s in report.plan([0, 3], only=["dead-rank", "save"])]
    assert only == [
        "dead rank, stage 0",
        "dead rank, stage 3",
        "SIGKILL during save, stage 0",
        "disk error file-too-large, stage 0",
        "disk error not-a-directory, stage 0",
    ]
    with pytest.raises(ValueError, match=r"unknown fault families \['dead'\]"):
        report.plan(only=["dead"])


def test_bad_arguments_are_refused(report, capsys):
    for argv in (["--stages", "0,4"], ["--stages", "two"], ["--only", "dead"]):
        with pytest.raises(SystemExit) as exc:
            report.parse_args(argv)
        assert exc.value.code == 2
    assert "--only takes dead-rank, stalled-rank" in capsys.readouterr().err


def test_exit_status_and_json(report, monkeypatch, tmp_path, capsys):
    good, bad, _ = _records()

    def broken():
        raise RuntimeError("scenario crashed")

    scenarios = [report.Scenario("good", lambda: [good]), report.Scenario("broken", broken)]
    monkeypatch.setattr(report, "plan", lambda *a, **k: scenarios)
    out = tmp_path / "r.json"
    assert report.main(["--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "[2/2] broken: 1 of 1 NOT as required" in captured.err
    assert "the harness raised RuntimeError: scenario crashed" in captured.out
    assert "1 of 2 scenarios did NOT behave as required." in captured.out
    data = json.loads(out.read_text())
    assert [r["ok"] for r in data["records"]] == [True, False]
    assert data["records"][0]["ranks"][0]["error_type"] == "CollectiveError"

    monkeypatch.setattr(report, "plan", lambda *a, **k: [report.Scenario("good", lambda: [good])])
    assert report.main([]) == 0
    assert "All 1 scenarios behaved as required." in capsys.readouterr().out
