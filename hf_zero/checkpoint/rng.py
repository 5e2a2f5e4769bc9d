"""RNG states in a checkpoint: the rng-rank files (torch CPU and CUDA, python, numpy).

Each rank saves its own streams, and a load restores them only at the same world size, where
rank r's streams mean the same. A restore is all or nothing: `read_rng` checks every state,
trying each on a scratch generator, before the load changes anything, and returns the function
that applies them once everything else is loaded.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from .format import CheckpointError

__all__ = ["rng_state", "read_rng"]


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's RNG states as tensors (for the file) and JSON strings (its metadata)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    meta = {}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda{i}"] = s
    version, state, gauss = random.getstate()
    tensors["python"] = torch.tensor(state, dtype=torch.int64)
    meta["python"] = json.dumps([version, gauss])
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = json.dumps([kind, int(pos), int(has_gauss), float(cached)])
    except ImportError:  # pragma: no cover
        pass
    return tensors, meta


def _rng_tensor(f, path: Path, key: str, dtype: str, numel: int) -> torch.Tensor:
    if key not in f.keys():
        raise CheckpointError(f"{path}: tensor {key!r} is missing")
    sl = f.get_slice(key)
    if sl.get_dtype() != dtype or sl.get_shape() != [numel]:
        raise CheckpointError(
            f"{path}: tensor {key!r} is {sl.get_dtype()} {sl.get_shape()}, "
            f"expected {dtype} [{numel}]"
        )
    return f.get_tensor(key)


def _rng_meta(meta: dict, key: str, path: Path, length: int) -> list:
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, RecursionError):
        value = None
    if not (isinstance(value, list) and len(value) == length):
        raise CheckpointError(f"{path}: metadata {key!r} is missing or malformed")
    return value


def read_rng(f, path: Path) -> Callable[[], None]:
    """Read and check the RNG states of an open rng file; returns the function that restores
    them, called once everything else is loaded. Each state is first given to a scratch
    generator, so whatever the real one would refuse is refused here, before anything changed.
    """
    meta = f.metadata() or {}
    keys = set(f.keys())
    cpu = _rng_tensor(f, path, "torch_cpu", "U8", torch.get_rng_state().numel())
    cuda = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda{i}" in keys:
                n = torch.cuda.get_rng_state(i).numel()
                cuda[i] = _rng_tensor(f, path, f"torch_cuda{i}", "U8", n)
    version, gauss = _rng_meta(meta, "python", path, 2)
    mt = _rng_tensor(f, path, "python", "I64", 625).tolist()
    # CPython truncates words above 32 bits silently; a real state never has them.
    if not (
        type(version) is int
        and (gauss is None or type(gauss) is float)
        and all(0 <= w < 2**32 for w in mt[:-1])
    ):
        raise CheckpointError(f"{path}: the python RNG state is malformed")
    python_state = (version, tuple(mt), gauss)
    numpy_state = None
    if "numpy" in keys:
        import numpy as np

        kind, pos, has_gauss, cached = _rng_meta(meta, "numpy", path, 4)
        words = _rng_tensor(f, path, "numpy", "I64", 624)
        if not (
            kind == "MT19937"
            and type(pos) is int
            and type(has_gauss) is int
            and type(cached) in (int, float)
            and bool(((words >= 0) & (words < 2**32)).all())
        ):
            raise CheckpointError(f"{path}: the numpy RNG state is malformed")
        numpy_state = (kind, words.numpy().astype("uint32"), pos, has_gauss, float(cached))
    try:
        torch.Generator().set_state(cpu)
        random.Random().setstate(python_state)
        if numpy_state is not None:
            np.random.RandomState().set_state(numpy_state)
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{path}: RNG state refused ({type(e).__name__}: {e})") from None

    def restore() -> None:
        torch.set_rng_state(cpu)
        for i, state in cuda.items():
            torch.cuda.set_rng_state(state, i)
        random.setstate(python_state)
        if numpy_state is not None:
            np.random.set_state(numpy_state)

    return restore
