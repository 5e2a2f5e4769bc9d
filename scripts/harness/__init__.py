"""The multi-process harness shared by the tests and `scripts/reliability_report.py`.

- `dist`: `run_distributed`, the one way code runs on several gloo ranks (spawned processes, a
  free port, a failing rank's traceback re-raised).
- `cases`: the tiny models and the single-process reference every stage is compared with.
- `faults`, `checkpoint_faults`, `checkpoint_misuse`: fault and misuse scenarios on real ranks,
  returning records that the tests assert on and the report prints.
"""
