"""Test-only helpers: a local server speaking the Hub's HTTP API (`hub_server`). The
multi-process harness the tests share with the scripts lives in `scripts/harness`."""
