"""Worker functions for the ZeroTrainer tests, run on gloo ranks by `scripts.harness.dist`."""
