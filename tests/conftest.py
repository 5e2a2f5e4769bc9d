"""Test-suite wide markers.

- `gpu`: needs CUDA; skipped cleanly when torch.cuda is unavailable.
- `slow`: opt-in; runs only with `--run-slow` or HF_ZERO_RUN_SLOW=1.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (or set HF_ZERO_RUN_SLOW=1)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    run_slow = config.getoption("--run-slow") or os.environ.get("HF_ZERO_RUN_SLOW") == "1"
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    skip_slow = pytest.mark.skip(reason="slow: opt in with --run-slow or HF_ZERO_RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
