"""Shared test helpers: `dist.run_distributed` for multi-process gloo tests."""
