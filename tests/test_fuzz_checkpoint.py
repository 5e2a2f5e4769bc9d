"""Tier 2: hostile checkpoint files, fuzzed through every entry point that reads them.

A checkpoint is a folder a user hands us, perhaps downloaded, perhaps edited. These tests build
one real checkpoint (a tiny GPT-2 trained one step, saved at world size 1 with no process
group) and, for every example, copy it into a fresh folder, damage it, and drive it through
`Manifest.read`, `latest_checkpoint`, `inspect_checkpoint` and the `hf-zero inspect` command,
`engine.load_checkpoint` (into one engine, reused) and `hf_zero.consolidate`.

What is damaged, one property test each:
- the manifest, as structure: keys dropped or added, values replaced by junk of any type
  (negative and huge ints, NaN and Infinity, unicode and lone surrogates, paths, deep nesting,
  integer literals too long to parse), layouts edited and then made self-consistent again
  (offsets and sizes recomputed) so that the deeper checks are reached, the export's keys and
  dtypes, file entries, optimizer fields;
- the manifest, as bytes: truncated, bytes flipped, inserted or replaced, other encodings;
- a shard file (params, optim or rng): its 8-byte header length, its JSON header (dtypes,
  shapes, data_offsets, entries dropped, renamed or duplicated), its metadata (the "hf_zero"
  JSON with the rank, world size and layout_slice), its data. The manifest's size and sha256
  are then fixed up, so the file passes the hash check and the parsers behind it are what is
  tested: a matching hash is no defence against whoever wrote the manifest;
- names and links: file names in the manifest that are paths (`../`, absolute, NUL, unicode
  digits, trailing newline), and the manifest, zero/ folder, shard files or copied model files
  replaced by symlinks to elsewhere (a copy of the real file outside, so a read would pass its
  hash), dangling, looping, or to devices; junk files in zero/ with names that are not UTF-8.

What must hold for every example:
1. Each entry point succeeds or raises CheckpointError; any other exception fails the test.
   `latest_checkpoint` never raises and finds the checkpoint exactly when `Manifest.read`
   accepts it; `hf-zero inspect` exits 0 or 1.
2. No hang: each example runs under a SIGALRM limit (EXAMPLE_SECONDS).
3. No huge allocation: the process's peak RSS grows by less than RSS_GROWTH_LIMIT in an
   example (a shape of 2**39 elements, a header length of 2**63 must be refused, not tried).
4. No silently wrong load: a load that succeeds holds exactly what a reference reader
   (`safetensors.torch.load_file`) finds in the files, every master and every optimizer state
   tensor, and the manifest's step; a refused load leaves the engine exactly as it was. An
   export that succeeds holds exactly the manifest's export keys, each with the values of its
   parameter in the params file, in the shape the manifest gives. (What only the manifest
   records is checked for type, range and consistency, not truth: hyperparameters, tied-weight
   aliases, and a parameter's shape as long as its size is unchanged. Loading into an engine
   compares shapes with the model's; an export has no model to compare with.)
5. Nothing outside: an audit hook records every file opened and every rename, mkdir, delete
   and copy. Entry points read only inside the checkpoint; only consolidate writes, and only
   in its output folder and that folder's temporary sibling. The checkpoint's files are byte
   for byte as before.

Example counts. Each property has two tests. `test_<property>` runs in the default run with the
CI settings: derandomized (the same examples every run, for a given hypothesis version and test
code), no example database, no deadline (shared slow machine): 560 examples in all (200 + 80 +
200 + 80). `test_<property>_nightly` is marked `slow` (opt in with
`--run-slow` or HF_ZERO_RUN_SLOW=1) and runs ten times as many, 5,600, random examples: a new
draw each run, and a failure prints the blob that reproduces it (`@reproduce_failure`).
`--hypothesis-show-statistics` shows how far the examples get (which entry points accept them).

Two plain tests cover what the fuzzed engine (fp32) never reads: an fp16 engine's loss scaler
state.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file

import hf_zero
from hf_zero.checkpoint import CheckpointError, Manifest, latest_checkpoint
from hf_zero.checkpoint.consolidate import COPIED_FILES
from hf_zero.checkpoint.inspect import inspect_checkpoint
from hf_zero.cli import main as cli_main
from scripts.harness.cases import make_model, param_groups

CI = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NIGHTLY = settings(CI, derandomize=False)

EXAMPLE_SECONDS = 60
RSS_GROWTH_LIMIT = 512 << 20
IDS = torch.arange(16).reshape(2, 8) % 97
SHARDS = (
    "params-rank00000-of-00001.safetensors",
    "optim-rank00000-of-00001.safetensors",
    "rng-rank00000-of-00001.safetensors",
)


# ---- the checkpoint, built once ---------------------------------------------------------------


class Fuzz:
    """The valid checkpoint every example starts from, and the engine every load goes into."""

    def __init__(self, root: Path):
        model = make_model("gpt2")
        self.engine = hf_zero.initialize(
            model,
            torch.optim.AdamW(param_groups(model), lr=1e-3),
            config=hf_zero.ZeroConfig(stage=1),
        )
        self.engine.backward(self.engine(input_ids=IDS, labels=IDS).loss)
        self.engine.step()
        self.engine.zero_grad()
        self.base = root / "ckpt"
        self.engine.save_checkpoint(self.base)
        self.manifest = json.loads((self.base / "zero" / "manifest.json").read_text())
        self.shards = {name: (self.base / "zero" / name).read_bytes() for name in SHARDS}
        # The parameter each export key must hold, by its own name (aliases are manifest-only).
        self.sources = {
            p.name: (fu.index, p.offset, p.shape)
            for fu in self.engine._layout.flat_units
            for p in fu.params
        }

    def example(self, tmp: Path) -> tuple[Path, Path]:
        """A fresh copy of the checkpoint under `tmp`, beside a folder `outside` holding copies
        of its files (a link or name pointing there reaches a file whose hash matches)."""
        ckpt = tmp / "ckpt"
        shutil.copytree(self.base, ckpt)
        outside = tmp / "outside"
        outside.mkdir()
        for name in (*SHARDS, "config.json"):
            src = ckpt / "zero" / name if name in SHARDS else ckpt / name
            shutil.copyfile(src, outside / name)
        (outside / "secret.txt").write_text("a file of this machine that no export may carry\n")
        return ckpt, outside


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    return Fuzz(tmp_path_factory.mktemp("fuzz"))


# ---- watching what the entry points touch ----------------------------------------------------

_SYSTEM_ROOTS = tuple(
    {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    | {os.path.realpath(Path(__file__).parents[1])}
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {  # audit event -> indices of its path arguments; all of these change files
    "os.rename": (0, 1),
    "os.mkdir": (0,),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.symlink": (0, 1),
    "os.link": (0, 1),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
}


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class _Watch:
    """The files one entry point opens and changes, checked against what it may touch."""

    active: _Watch | None = None

    def __init__(self, example: Path, reads: list[Path], writes: list[Path]):
        self.example = os.path.realpath(example)
        self.reads = [os.path.realpath(p) for p in reads]
        # A folder, or a name prefix ending in "-": the folder and its siblings so named.
        self.writes = [os.path.realpath(p) for p in writes]
        self.violations: list[str] = []
        self.busy = False

    def _allowed(self, real: str, roots: list[str]) -> bool:
        if any(_inside(real, r) for r in roots):
            return True
        # Library files (lazy imports) are fine; anything else on this machine is not.
        return not _inside(real, self.example) and any(_inside(real, r) for r in _SYSTEM_ROOTS)

    def see(self, event: str, path, write: bool) -> None:
        if isinstance(path, int) or path is None:
            return
        real = os.path.realpath(os.fsdecode(path))
        write_ok = any(
            real.startswith(w) if w.endswith("-") else _inside(real, w) for w in self.writes
        )
        if write and not write_ok:
            self.violations.append(f"{event} writes {real}")
        elif not write and not (write_ok or self._allowed(real, self.reads)):
            self.violations.append(f"{event} reads {real}")


def _audit(event: str, args: tuple) -> None:
    w = _Watch.active
    if w is None or w.busy or not (event == "open" or event in _PATH_EVENTS):
        return
    w.busy = True
    try:
        if event == "open":
            path, mode, flags = args
            w.see(event, path, write=bool(flags & _WRITE_FLAGS))
        else:
            for i in _PATH_EVENTS[event]:
                w.see(event, args[i], write=True)
    finally:
        w.busy = False


sys.addaudithook(_audit)  # hooks cannot be removed; it does nothing unless a _Watch is active


@contextlib.contextmanager
def _watch(example: Path, *, reads: list[Path], writes: tuple[Path, ...] = ()):
    w = _Watch(example, reads, list(writes))
    _Watch.active = w
    try:
        yield w
    finally:
        _Watch.active = None
    assert not w.violations, w.violations


class _Hung(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise _Hung(f"an example ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _guarded():
    """Fails the test if the peak RSS grew by RSS_GROWTH_LIMIT or more while it ran; keeps the
    process's RNG states (a load restores the checkpoint's)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < RSS_GROWTH_LIMIT, f"peak RSS grew by {grown >> 20} MiB"


# ---- driving every entry point ------------------------------------------------------------------


def _attempt(fn, *args, **kwargs):
    """(result, None) or (None, the CheckpointError); any other exception propagates."""
    try:
        return fn(*args, **kwargs), None
    except CheckpointError as e:
        assert str(e), "a CheckpointError must say what is wrong"
        return None, e


def _digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = f"link to {os.readlink(p)}"
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _reference(path: Path) -> dict[str, torch.Tensor] | None:
    """What safetensors itself reads from a file, or None where it refuses it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError):
        return None


def _engine_state(engine) -> dict:
    opt = engine.optimizer
    masters = [engine._sharded_optimizer.masters[fu.index] for fu in engine._layout.flat_units]
    return {
        "masters": [m.detach().clone() for m in masters],
        "state": [
            {k: v.clone() for k, v in opt.state.get(m, {}).items()} if m in opt.state else None
            for m in masters
        ],
        "groups": [
            copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups
        ],
        "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
        "counters": (engine.global_steps, engine.skipped_steps),
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _check_load(fuzz: Fuzz, ckpt: Path, manifest_ok: bool) -> bool:
    engine = fuzz.engine
    before = _engine_state(engine)
    with _watch(ckpt.parent, reads=[ckpt]):
        loaded, error = _attempt(engine.load_checkpoint, ckpt)
    if error is not None:
        assert _same(before, _engine_state(engine)), f"a refused load changed the engine: {error}"
        return False
    assert manifest_ok, "load_checkpoint accepted a manifest Manifest.read refuses"
    params = _reference(ckpt / "zero" / SHARDS[0])
    optim = _reference(ckpt / "zero" / SHARDS[1])
    rng = _reference(ckpt / "zero" / SHARDS[2])
    assert params is not None and optim is not None and rng is not None
    opt = engine.optimizer
    for fu in engine._layout.flat_units:
        master = engine._sharded_optimizer.masters[fu.index]
        key = f"flat{fu.index:05d}"
        assert _same(master, params[key]), f"master {key} is not what the params file holds"
        want = {k[len(key) + 1 :]: v for k, v in optim.items() if k.startswith(key + ".")}
        got = opt.state.get(master, {})
        assert _same(dict(got), want), f"optimizer state of {key} is not what the optim file holds"
    assert engine.global_steps == loaded.step
    # torch normalizes a state it is given; compare with what the file's state means to it.
    restored = torch.Generator()
    restored.set_state(rng["torch_cpu"])
    assert _same(torch.get_rng_state(), restored.get_state())
    return True


def _check_export(fuzz: Fuzz, ckpt: Path, manifest_ok: bool, dtype) -> bool:
    out = ckpt.parent / "out"
    # consolidate writes a temporary sibling `out.tmp-<random>` and renames it into place.
    with _watch(ckpt.parent, reads=[ckpt], writes=(out, ckpt.parent / "out.tmp-")):
        done, error = _attempt(hf_zero.consolidate, ckpt, out, dtype=dtype, progress=False)
    left = sorted(p.name for p in ckpt.parent.iterdir())
    if error is not None:
        assert left == ["ckpt", "outside"], f"a refused export left {left}"
        return False
    assert manifest_ok, "consolidate accepted a manifest Manifest.read refuses"
    assert left == ["ckpt", "out", "outside"], left
    manifest = json.loads((ckpt / "zero" / "manifest.json").read_bytes())
    export = manifest["hf_export"]
    params = _reference(ckpt / "zero" / SHARDS[0])
    assert params is not None
    tensors = {}
    for f in sorted(out.iterdir()):
        assert f.name in COPIED_FILES or f.name == "README.md" or f.name.startswith("model"), f.name
        if f.suffix == ".safetensors":
            assert _export_metadata(f) == {"format": "pt"}
            tensors.update(load_file(str(f)))
    assert sorted(tensors) == sorted(export["keys"])
    declared = {
        p["name"]: p["shape"] for u in manifest["layout"]["flat_units"] for p in u["params"]
    }
    for key, value in tensors.items():
        if dtype == "auto":
            assert str(value.dtype) == f"torch.{export['dtypes'][key]}", (key, value.dtype)
        else:
            assert value.dtype == torch.float32, (key, value.dtype)
        source = export.get("renames", {}).get(key, key)  # the tensor it was renamed from
        if source in fuzz.sources:
            index, offset, shape = fuzz.sources[source]
            flat = params[f"flat{index:05d}"]
            want = flat[offset : offset + math.prod(shape)].to(value.dtype)
            assert _same(value.reshape(-1), want), f"export key {key!r} does not hold its values"
            # The files record each parameter's size, not its shape: that is the manifest's.
            assert list(value.shape) == declared[source], (key, value.shape, declared[source])
    return True


def _export_metadata(path: Path) -> dict | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _drive(fuzz: Fuzz, ckpt: Path, *, dtype="float32") -> dict:
    """Every entry point on one damaged checkpoint; returns which ones accepted it."""
    before = _digests(ckpt.parent)
    with _watch(ckpt.parent, reads=[ckpt]):
        manifest, error = _attempt(Manifest.read, ckpt)
        manifest_ok = error is None
        found = latest_checkpoint(ckpt.parent)
        assert found == (ckpt if manifest_ok else None), (found, error)
        info, error = _attempt(inspect_checkpoint, ckpt)
        assert (error is None) == manifest_ok, error
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = cli_main(["inspect", str(ckpt)])
        assert rc in (0, 1)
        assert rc == (0 if manifest_ok and info["ok"] else 1), (rc, stderr.getvalue())
    loaded = _check_load(fuzz, ckpt, manifest_ok)
    exported = _check_export(fuzz, ckpt, manifest_ok, dtype)
    after = _digests(ckpt.parent)
    after = {k: v for k, v in after.items() if not _inside(k, str(ckpt.parent / "out"))}
    assert after == before, "an entry point changed the checkpoint or the folder beside it"
    return {"manifest": manifest_ok, "load": loaded, "export": exported}


def _drive_example(fuzz: Fuzz, ckpt: Path, **kwargs) -> None:
    """`_drive`, counting the outcomes (`--hypothesis-show-statistics` shows how deep the
    examples get)."""
    outcome = _drive(fuzz, ckpt, **kwargs)
    event(", ".join(f"{k} {'accepted' if v else 'refused'}" for k, v in outcome.items()))


@contextlib.contextmanager
def _example(fuzz: Fuzz):
    with tempfile.TemporaryDirectory(prefix="hf-zero-fuzz-") as tmp:
        ckpt, outside = fuzz.example(Path(tmp))
        with _time_limit(EXAMPLE_SECONDS):
            yield ckpt, outside


# ---- junk -----------------------------------------------------------------------------------


class Raw:
    """JSON text put into a document as it is: what json.dumps cannot write."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


RAW = st.sampled_from(
    [
        (_nested, 100_000),  # deeper than any parser's recursion
        (_nested, 900),  # parses; deep enough to trouble a recursive printer
        (lambda n: '{"a":' * n + "1" + "}" * n, 3000),
        (lambda n: "1" + "0" * n, 5000),  # more digits than Python converts to an int
        (lambda n: "-" + "9" * n, 4400),
    ]
).map(lambda spec: Raw(spec[0](spec[1]))) | st.sampled_from(
    [
        "1e999",
        "-1e999",
        "NaN",
        "Infinity",
        "-Infinity",
        '"\\ud800"',  # a lone surrogate
        '"\\u0000"',
        "1.0",
        "-0",
    ]
).map(Raw)

INTERESTING_INTS = st.sampled_from(
    [0, 1, -1, 2, 7, 8, 2**31 - 1, 2**31, 2**32, 2**39, 2**40, 2**53 + 1, 2**63 - 1, 2**63]
    + [2**64, -(2**63) - 1, 10**30, 99999, 100000]
)
INTERESTING_STRINGS = st.sampled_from(
    [
        "",
        "../x",
        "/etc/passwd",
        "..",
        ".",
        "\x00",
        "é",
        "\ud800",
        "__metadata__",
        "params-rank00000-of-00001.safetensors",
        "../params-rank00000-of-00001.safetensors",
        "float8_e4m3fn",
        "int64",
        "bool",
        "complex64",
        "__class__",
        "NaN",
        "🙂" * 10,
    ]
) | st.integers(1000, 100_000).map(lambda n: "x" * n)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    INTERESTING_INTS,
    st.floats(),
    st.text(max_size=12),
    INTERESTING_STRINGS,
)
JUNK = st.one_of(
    st.recursive(
        SCALARS,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=8) | INTERESTING_STRINGS, inner, max_size=4)
        ),
        max_leaves=8,
    ),
    RAW,
)


def dumps(doc) -> bytes:
    """json.dumps with NaN/Infinity literals allowed and Raw values spliced in."""
    raws: list[str] = []

    def default(obj):
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(obj))

    text = json.dumps(doc, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw, 1)
    return text.encode("utf-8", "surrogatepass")


def _tweak(value, data):
    """A value near `value` or of a neighbouring type."""
    if isinstance(value, bool):
        return data.draw(st.sampled_from([not value, int(value), str(value).lower(), None]))
    if isinstance(value, int):
        return data.draw(
            st.sampled_from(
                [value + 1, value - 1, -value, value * 2**20, float(value), str(value), [value]]
            )
            | INTERESTING_INTS
        )
    if isinstance(value, float):
        return data.draw(st.sampled_from([math.nan, math.inf, -math.inf, -value, int(value)]))
    if isinstance(value, str):
        return data.draw(
            st.sampled_from(
                [value + "x", value[:-1], value.upper(), "../" + value, "/" + value, [value]]
            )
            | INTERESTING_STRINGS
        )
    if isinstance(value, list):
        choices = [
            value[::-1],
            value + value[:1],
            value[1:],
            {str(i): v for i, v in enumerate(value)},
        ]
        return data.draw(st.sampled_from(choices))
    if isinstance(value, dict):
        return data.draw(st.sampled_from([list(value.values()), list(value), {}]))
    return data.draw(JUNK)


def _walk(doc, steps):
    """(parent, key) of the node a walk reaches: each step picks a child by its index modulo the
    number of children. (None, None) is the document itself."""
    parent, key, node = None, None, doc
    for s in steps:
        if isinstance(node, dict) and node:
            k = list(node)[s % len(node)]
        elif isinstance(node, list) and node:
            k = s % len(node)
        else:
            break
        parent, key, node = node, k, node[k]
    return parent, key


def mutate_json(doc, data, *, max_ops: int = 3):
    """Apply 1..max_ops random edits anywhere in a JSON document; returns the new document."""
    for _ in range(data.draw(st.integers(1, max_ops), label="ops")):
        steps = data.draw(st.lists(st.integers(0, 2**16), max_size=8), label="path")
        parent, key = _walk(doc, steps)
        node = doc if parent is None else parent[key]
        op = data.draw(st.sampled_from(["replace", "tweak", "delete", "insert", "swap"]))
        if op == "insert" and isinstance(node, dict):
            node[data.draw(st.text(max_size=8) | INTERESTING_STRINGS)] = data.draw(JUNK)
            continue
        if op == "insert" and isinstance(node, list):
            node.insert(data.draw(st.integers(0, len(node))), data.draw(JUNK))
            continue
        new = data.draw(JUNK) if op in ("replace", "insert") else _tweak(node, data)
        if parent is None:
            doc = new if op != "delete" else {}
        elif op == "delete":
            del parent[key]
        elif op == "swap" and len(parent) > 1:
            keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
            other = keys[data.draw(st.integers(0, len(keys) - 1))]
            parent[key], parent[other] = parent[other], parent[key]
        else:
            parent[key] = new
    return doc


# ---- manifest mutations that keep it plausible --------------------------------------------------


def _units(m):
    return m["layout"]["flat_units"]


def fix_layout(m) -> None:
    """Recompute offsets and sizes from the shapes, as a careful forger would, so that an edited
    layout passes the manifest's own consistency checks."""
    layout = m.get("layout") if isinstance(m, dict) else None
    units = layout.get("flat_units") if isinstance(layout, dict) else None
    if not isinstance(units, list):
        return
    ws = layout.get("world_size")
    ws = ws if type(ws) is int and 1 <= ws <= 10**6 else 1
    for i, u in enumerate(units):
        if not isinstance(u, dict) or not isinstance(u.get("params"), list):
            continue
        u["index"] = i
        offset = 0
        for p in u["params"]:
            if not isinstance(p, dict):
                continue
            p["offset"] = offset
            shape = p.get("shape")
            if isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape):
                offset += math.prod(shape)
        u["numel"] = offset
        u["padded_numel"] = -(-offset // ws) * ws


def _swap_names(m, data):
    params = _units(m)[data.draw(st.integers(0, len(_units(m)) - 1))]["params"]
    a, b = data.draw(st.lists(st.integers(0, len(params) - 1), min_size=2, max_size=2))
    params[a]["name"], params[b]["name"] = params[b]["name"], params[a]["name"]


def _reorder(m, data):
    params = _units(m)[data.draw(st.integers(0, len(_units(m)) - 1))]["params"]
    order = data.draw(st.permutations(range(len(params))))
    params[:] = [params[i] for i in order]


def _move_param(m, data):
    a, b = _units(m)[0]["params"], _units(m)[1]["params"]
    src, dst = (a, b) if data.draw(st.booleans()) else (b, a)
    dst.insert(
        data.draw(st.integers(0, len(dst))), src.pop(data.draw(st.integers(0, len(src) - 1)))
    )


def _reshape(m, data):
    params = _units(m)[data.draw(st.integers(0, len(_units(m)) - 1))]["params"]
    p = params[data.draw(st.integers(0, len(params) - 1))]
    n = math.prod(p["shape"])
    p["shape"] = data.draw(
        st.sampled_from(
            [[n], [1, n], [n, 1], [], [0], [2**39], [2**39, 2**39], [2**40 - 1] * 2, [n + 1]]
            + [[1] * 65, p["shape"][::-1], [*p["shape"], 2**30]]
        )
    )


def _world_size(m, data):
    ws = data.draw(st.sampled_from([2, 3, 4, 99999, 100000]))
    m["world_size"] = ws
    if data.draw(st.booleans()):
        m["layout"]["world_size"] = ws
    entries = list(m["files"].values())
    files = {}
    for kind in ("params", "optim", "rng"):
        for r in range(min(ws, 4)):
            files[f"{kind}-rank{r:05d}-of-{ws:05d}.safetensors"] = entries[r % len(entries)]
    if ws <= 4 or data.draw(st.booleans()):
        m["files"] = files


def _state_keys(m, data):
    keys = m["optimizer"]["state_keys"]
    op = data.draw(st.sampled_from(["clear", "drop", "add", "rename", "move"]))
    if op == "clear":
        keys.clear()
    elif op == "drop":
        keys["flat00000"].remove(data.draw(st.sampled_from(keys["flat00000"])))
    elif op == "add":
        keys["flat00000"].append(data.draw(st.sampled_from(["exp_avg2", "step", "", "../x"])))
    elif op == "rename":
        keys["flat00002"] = keys.pop("flat00000")
    else:
        keys["flat00000"], keys["flat00001"] = ["step"], keys["flat00000"]


def _hf_export(m, data):
    export = m["hf_export"]
    op = data.draw(
        st.sampled_from(
            ["add", "drop", "dtype", "alias", "conversion", "rename", "reorder", "replace"]
        )
    )
    names = [p["name"] for u in _units(m) for p in u["params"]]
    if op == "add":
        export["keys"].append(
            data.draw(
                st.sampled_from(["__metadata__", "../evil", "/tmp/evil", "lm_head.weight", ""])
                | st.sampled_from(names)
                | JUNK
            )
        )
    elif op == "drop":
        export["keys"].pop(data.draw(st.integers(0, len(export["keys"]) - 1)))
    elif op == "dtype":
        key = data.draw(st.sampled_from(export["keys"]))
        export["dtypes"][key] = data.draw(
            st.sampled_from(["float64", "int64", "int8", "bool", "bfloat16", "float16"])
            | INTERESTING_STRINGS
            | JUNK
        )
    elif op == "alias":
        params = _units(m)[data.draw(st.integers(0, 1))]["params"]
        alias = data.draw(st.sampled_from(["__metadata__", "../evil", "lm_head.weight"] + names))
        params[data.draw(st.integers(0, len(params) - 1))]["aliases"].append(alias)
        if data.draw(st.booleans()):
            export["keys"].append(alias)
            export["dtypes"][alias] = "float32"
    elif op == "conversion":
        export["weight_conversion"] = data.draw(JUNK)
        if data.draw(st.booleans()):
            export["conversion"] = data.draw(st.sampled_from(["splits experts"]) | JUNK)
    elif op == "rename":
        # A renamed key: save_pretrained writes `new` for the model's `source` (GPT-NeoX's
        # embed_out.weight); or junk, or a rename of a key that is not exported.
        key = data.draw(st.sampled_from(export["keys"]))
        new = data.draw(st.sampled_from(["embed_out.weight", "__metadata__", ""]) | JUNK)
        if data.draw(st.booleans()) and isinstance(new, str) and new not in export["keys"]:
            export["keys"][export["keys"].index(key)] = new
            export["dtypes"][new] = export["dtypes"].get(key, "float32")
        renames = export.setdefault("renames", {})
        renames[new if isinstance(new, str) else key] = key if data.draw(st.booleans()) else new
    elif op == "reorder":
        export["keys"] = data.draw(st.permutations(export["keys"]))
    else:
        m["hf_export"] = data.draw(st.none() | JUNK)


def _file_entries(m, data):
    files = m["files"]
    name = data.draw(st.sampled_from(sorted(files)))
    entry = files[name]
    op = data.draw(st.sampled_from(["size", "sha", "swap", "drop", "rename"]))
    if op == "size":
        entry["size"] = data.draw(
            st.sampled_from([entry["size"] + 1, entry["size"] - 1, -1, 2**63]) | JUNK
        )
    elif op == "sha":
        entry["sha256"] = data.draw(
            st.sampled_from([entry["sha256"].upper(), entry["sha256"][:12], "0" * 64]) | JUNK
        )
    elif op == "swap":
        other = data.draw(st.sampled_from(sorted(files)))
        files[name], files[other] = files[other], files[name]
    elif op == "drop":
        del files[name]
    else:
        files[data.draw(NAMES)] = files.pop(name)


def _optimizer(m, data):
    opt = m["optimizer"]
    op = data.draw(st.sampled_from(["hyper", "groups", "class", "scaler", "counters"]))
    if op == "hyper":
        group = opt["param_groups"][data.draw(st.integers(0, 1))]
        key = data.draw(st.sampled_from(sorted(group)))
        group[key] = data.draw(st.just([0.9]) | st.just([0.9, 0.99, 0.5]) | JUNK)
    elif op == "groups":
        opt["param_groups"] = opt["param_groups"][: data.draw(st.integers(0, 1))]
    elif op == "class":
        opt["class"] = data.draw(st.sampled_from(["torch.optim.sgd.SGD", ""]) | JUNK)
    elif op == "scaler":
        m["loss_scaler"] = data.draw(
            st.just({"scale": -1.0, "good_steps": 0}) | st.just({"scale": math.inf}) | JUNK
        )
    else:
        key = data.draw(st.sampled_from(["step", "skipped_steps", "stage", "mixed_precision"]))
        m[key] = data.draw(
            st.sampled_from([2**63, -1, 1.5, "3", True, "fp16", "bf16", "fp8", 4]) | JUNK
        )


PLAUSIBLE = [
    _swap_names,
    _reorder,
    _move_param,
    _reshape,
    _world_size,
    _state_keys,
    _hf_export,
    _file_entries,
    _optimizer,
]

# ---- names ---------------------------------------------------------------------------------

NAMES = st.builds(
    lambda prefix, core, suffix: prefix + core + suffix,
    st.sampled_from(
        ["", "../", "/", "./", "zero/", "../../", "/tmp/", "..\\", "~/", "\x00", "C:\\"]
    ),
    st.sampled_from(
        [
            "params-rank00000-of-00001.safetensors",
            "optim-rank00000-of-00001.safetensors",
            "rng-rank00000-of-00001.safetensors",
            "params-rank00001-of-00001.safetensors",
            "params-rank00000-of-00002.safetensors",
            "params-rank\u0660\u0660\u0660\u0660\u0660-of-\u0660\u0660\u0660\u0660\u0661.safetensors",
            "params-rank0000-of-00001.safetensors",
            "outside/params-rank00000-of-00001.safetensors",
            "secret.txt",
            "manifest.json",
            "..",
            "",
        ]
    ),
    st.sampled_from(["", "/", "/..", "\n", "\x00", ".bak", " ", "/."]),
)


# ---- the properties ------------------------------------------------------------------------


def check_mutated_manifest(fuzz: Fuzz, data) -> None:
    m = copy.deepcopy(fuzz.manifest)
    plausible = st.lists(st.sampled_from(PLAUSIBLE), min_size=1, max_size=2)
    for op in data.draw(plausible, label="plausible"):
        # An earlier edit may have removed what this one edits; then it does nothing.
        with contextlib.suppress(KeyError, IndexError, TypeError, AttributeError, ValueError):
            op(m, data)
    # Random edits mostly break the manifest outright; a plausible edit followed by a fix-up
    # reaches the checks behind the manifest's own, so most examples take that road.
    if data.draw(st.sampled_from([False, False, True]), label="random edits"):
        m = mutate_json(m, data)
    if data.draw(st.sampled_from([True, True, True, False]), label="fix layout"):
        fix_layout(m)
    dtype = data.draw(st.sampled_from(["float32", "auto"]), label="export dtype")
    with _example(fuzz) as (ckpt, _):
        (ckpt / "zero" / "manifest.json").write_bytes(dumps(m))
        _drive_example(fuzz, ckpt, dtype=dtype)


def check_manifest_bytes(fuzz: Fuzz, data) -> None:
    raw = bytearray((fuzz.base / "zero" / "manifest.json").read_bytes())
    op = data.draw(st.sampled_from(["truncate", "flip", "insert", "delete", "replace", "encode"]))
    if op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op in ("flip", "insert", "delete"):
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            byte = data.draw(st.integers(0, 255) | st.sampled_from(list(b'{}[]",:0-eE.\\')))
            if op == "flip":
                raw[i] = byte
            elif op == "insert":
                raw.insert(i, byte)
            else:
                del raw[i]
    elif op == "replace":
        raw = bytearray(data.draw(st.binary(max_size=256)))
    else:
        text = raw.decode()
        how = data.draw(st.sampled_from(["utf-16", "utf-32", "bom", "bad byte", "two documents"]))
        if how in ("utf-16", "utf-32"):
            raw = bytearray(text.encode(how))
        elif how == "bom":
            raw = bytearray(b"\xef\xbb\xbf" + text.encode())
        elif how == "bad byte":
            raw = bytearray(text.encode() + b"\xff")
        else:
            raw = bytearray(text.encode() + b"\n{}")
    with _example(fuzz) as (ckpt, _):
        (ckpt / "zero" / "manifest.json").write_bytes(bytes(raw))
        _drive_example(fuzz, ckpt)


SAFETENSORS_DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U16",
    "U32",
    "U64",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F4",
    "F6_E2M3",
    "C64",
]


def _split_header(raw: bytes) -> tuple[int, bytes, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, raw[8 : 8 + n], raw[8 + n :]


def mutate_shard(raw: bytes, data) -> bytes:
    """A shard file with its header length, header JSON, metadata or data changed."""
    n, text, body = _split_header(raw)
    op = data.draw(st.sampled_from(["length", "header bytes", "entry", "metadata", "body"]))
    if op == "length":
        length = data.draw(
            st.sampled_from([0, 1, 2, 7, n - 1, n + 1, n + 8, len(raw) - 8, len(raw), 2**31])
            | st.sampled_from([2**63, 2**64 - 1, 100_000_001])
            | st.integers(0, 2**64 - 1)
        )
        return struct.pack("<Q", max(0, length)) + raw[8:]
    if op == "header bytes":
        text = bytearray(text)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(text) - 1))
            text[i] = data.draw(st.integers(0, 255) | st.sampled_from(list(b'{}[]",:0123456789')))
        return struct.pack("<Q", n) + bytes(text) + body
    if op == "body":
        body = bytearray(body)
        if data.draw(st.booleans()) and body:
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= data.draw(st.integers(1, 255))
        else:
            body = body[: data.draw(st.integers(0, len(body)))] + bytearray(
                data.draw(st.binary(max_size=16))
            )
        return struct.pack("<Q", n) + text + bytes(body)
    header = json.loads(text)
    if op == "metadata":
        meta = header.setdefault("__metadata__", {})
        sub = data.draw(st.sampled_from(["drop", "value", "hf_zero"]))
        key = data.draw(st.sampled_from(sorted(meta) or ["format"]))
        if sub == "drop":
            meta.pop(key, None)
        elif sub == "value":
            meta[key] = data.draw(JUNK | st.sampled_from(["np", "", "{}", "[]", "null"]))
        else:
            info = json.loads(meta.get("hf_zero", "{}"))
            if data.draw(st.booleans()) and info.get("layout_slice"):
                fix = data.draw(st.sampled_from(["range", "pieces", "swap"]))
                unit = info["layout_slice"][data.draw(st.integers(0, 1))]
                if fix == "range":
                    unit["range"][1] += 1
                elif fix == "pieces":
                    unit["pieces"].pop()
                else:
                    a, b = unit["pieces"][0], unit["pieces"][1]
                    a[0], b[0] = b[0], a[0]
            else:
                info = mutate_json(info, data)
            meta["hf_zero"] = dumps(info).decode("utf-8", "surrogatepass")
    else:
        names = sorted(k for k in header if k != "__metadata__")
        name = data.draw(st.sampled_from(names))
        entry = header[name]
        field = data.draw(
            st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "duplicate", "junk"])
        )
        if field == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(SAFETENSORS_DTYPES) | JUNK)
        elif field == "shape":
            (numel,) = entry["shape"] or [1]
            half = [numel // 2, 2] if numel % 2 == 0 else [numel, 1]
            entry["shape"] = data.draw(
                st.sampled_from(
                    [half, [numel, 1], [1, numel], [], [numel + 1], [numel - 1], [2**39]]
                    + [[-1], [2**62, 4], [2**32, 2**32, 0], [0]]
                )
                | JUNK
            )
        elif field == "offsets":
            lo, hi = entry["data_offsets"]
            other = header[data.draw(st.sampled_from(names))]["data_offsets"]
            entry["data_offsets"] = data.draw(
                st.sampled_from([[hi, lo], [lo + 4, hi + 4], [lo, hi - 4], [0, 2**63], list(other)])
                | JUNK
            )
        elif field == "drop":
            del header[name]
        elif field == "rename":
            header[
                data.draw(
                    st.sampled_from(["flat00002", "flat00000", "flat00001", "buffer:x", "step"])
                    | st.sampled_from(["flat00000.exp_avg", "flat00000.step", "torch_cpu", ""])
                )
            ] = header.pop(name)
        elif field == "duplicate":
            header[data.draw(st.sampled_from(["flat00001", "flat00000.exp_avg_sq", "python"]))] = (
                copy.deepcopy(entry)
            )
        else:
            header[name] = data.draw(JUNK)
    text = dumps(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def check_shard_files(fuzz: Fuzz, data) -> None:
    name = data.draw(st.sampled_from(SHARDS), label="file")
    raw = mutate_shard(fuzz.shards[name], data)
    with _example(fuzz) as (ckpt, _):
        path = ckpt / "zero" / name
        path.write_bytes(raw)
        m = copy.deepcopy(fuzz.manifest)
        m["files"][name] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        (ckpt / "zero" / "manifest.json").write_text(json.dumps(m))
        _drive_example(fuzz, ckpt)


LINKED = [
    "zero",
    "zero/manifest.json",
    *(f"zero/{s}" for s in SHARDS),
    "config.json",
    "generation_config.json",
    "tokenizer.json",
]


def _link_target(data, ckpt: Path, outside: Path, linked: str) -> str:
    # The outside copy of the linked file (or folder): reading through the link passes its hash.
    base = "moved-zero" if linked == "zero" else Path(linked).name
    same = outside / base if (outside / base).exists() else outside / "secret.txt"
    choice = data.draw(
        st.sampled_from(["outside", "relative", "secret", "inside", "dangling", "loop", "device"])
        | st.sampled_from(["dir", "root"])
    )
    if choice == "outside":
        return str(same)
    if choice == "relative":
        return os.path.relpath(same, (ckpt / linked).parent)
    if choice == "secret":
        return str(outside / "secret.txt")
    if choice == "inside":
        return "config.json" if linked != "config.json" else "generation_config.json"
    if choice == "dangling":
        return str(outside / "no-such-file")
    if choice == "loop":
        return Path(linked).name
    if choice == "device":
        return "/dev/zero"
    if choice == "dir":
        return str(outside)
    return "/"


def check_names_and_links(fuzz: Fuzz, data) -> None:
    op = data.draw(st.sampled_from(["name", "link", "junk file"]), label="op")
    with _example(fuzz) as (ckpt, outside):
        m = copy.deepcopy(fuzz.manifest)
        if op == "name":
            name = data.draw(NAMES, label="name")
            # The entry a read outside would match: the outside copy's real size and hash.
            source = outside / "params-rank00000-of-00001.safetensors"
            entry = {"size": source.stat().st_size, "sha256": hashlib.sha256(source.read_bytes())}
            entry["sha256"] = entry["sha256"].hexdigest()
            if data.draw(st.booleans(), label="replace the real entry"):
                del m["files"]["params-rank00000-of-00001.safetensors"]
            m["files"][name] = entry
            (ckpt / "zero" / "manifest.json").write_bytes(dumps(m))
        elif op == "link":
            linked = data.draw(st.sampled_from(LINKED), label="linked")
            path = ckpt / linked
            if path.is_dir():  # zero/ itself: the real one moves out, a link may point to it
                shutil.move(path, outside / "moved-zero")
            elif path.exists():
                path.unlink()
            path.symlink_to(_link_target(data, ckpt, outside, linked))
        else:
            name = data.draw(
                st.binary(min_size=1, max_size=12).map(
                    lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")
                )
            )
            if name in (b".", b".."):
                name = b"junk"
            with contextlib.suppress(OSError):
                (ckpt / "zero" / os.fsdecode(name)).write_bytes(b"junk")
        _drive_example(fuzz, ckpt)


# ---- the tests: CI settings in the default run, ten times as many random examples nightly ------


@settings(CI, max_examples=200)
@given(data=st.data())
def test_mutated_manifest(fuzz, data):
    with _guarded():
        check_mutated_manifest(fuzz, data)


@pytest.mark.slow
@settings(NIGHTLY, max_examples=2000)
@given(data=st.data())
def test_mutated_manifest_nightly(fuzz, data):
    with _guarded():
        check_mutated_manifest(fuzz, data)


@settings(CI, max_examples=80)
@given(data=st.data())
def test_manifest_bytes(fuzz, data):
    with _guarded():
        check_manifest_bytes(fuzz, data)


@pytest.mark.slow
@settings(NIGHTLY, max_examples=800)
@given(data=st.data())
def test_manifest_bytes_nightly(fuzz, data):
    with _guarded():
        check_manifest_bytes(fuzz, data)


@settings(CI, max_examples=200)
@given(data=st.data())
def test_shard_files(fuzz, data):
    with _guarded():
        check_shard_files(fuzz, data)


@pytest.mark.slow
@settings(NIGHTLY, max_examples=2000)
@given(data=st.data())
def test_shard_files_nightly(fuzz, data):
    with _guarded():
        check_shard_files(fuzz, data)


@settings(CI, max_examples=80)
@given(data=st.data())
def test_names_and_links(fuzz, data):
    with _guarded():
        check_names_and_links(fuzz, data)


@pytest.mark.slow
@settings(NIGHTLY, max_examples=800)
@given(data=st.data())
def test_names_and_links_nightly(fuzz, data):
    with _guarded():
        check_names_and_links(fuzz, data)


def test_the_unmodified_checkpoint_passes_every_entry_point(fuzz):
    """The baseline every property starts from: all entry points accept it, and the oracles
    (reference reads, audit, engine comparison) agree with a correct load and export."""
    with _guarded(), _example(fuzz) as (ckpt, _):
        assert _drive(fuzz, ckpt) == {"manifest": True, "load": True, "export": True}


@pytest.fixture(scope="module")
def fp16_engine():
    model = make_model("gpt2")
    return hf_zero.initialize(
        model,
        torch.optim.AdamW(param_groups(model), lr=1e-3),
        config=hf_zero.ZeroConfig(stage=1, mixed_precision="fp16", initial_loss_scale=1024.0),
    )


@pytest.mark.parametrize(
    "state",
    [
        {"scale": math.nan, "good_steps": 0},
        {"scale": -1.0, "good_steps": 0},
        {"scale": 1024.0, "good_steps": -1},
        {"scale": "1024", "good_steps": 0},
        {"scale": 1024.0},
        {"scale": True, "good_steps": 0},
    ],
)
def test_loss_scaler_state_is_checked_before_an_fp16_engine_takes_it(fuzz, fp16_engine, state):
    """Only an engine with a dynamic loss scaler reads the manifest's loss_scaler; the fp32
    engine the properties use never does, so its states are checked here."""
    with _guarded(), tempfile.TemporaryDirectory() as tmp:
        ckpt, _ = fuzz.example(Path(tmp))
        m = copy.deepcopy(fuzz.manifest)
        m["loss_scaler"] = state
        (ckpt / "zero" / "manifest.json").write_bytes(dumps(m))
        before = _engine_state(fp16_engine)
        with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}: bad loss_scaler state")):
            fp16_engine.load_checkpoint(ckpt)
        assert _same(before, _engine_state(fp16_engine))
        assert fp16_engine._scaler.state_dict() == {"scale": 1024.0, "good_steps": 0}


def test_checkpoint_without_loss_scaler_keeps_the_fp16_engines_scale(fuzz, fp16_engine):
    """A checkpoint saved in fp32 has no loss scaler state: loading it into an fp16 engine keeps
    the engine's own scale instead of failing on the missing fields."""
    assert fuzz.manifest["loss_scaler"] == {}
    with _guarded(), tempfile.TemporaryDirectory() as tmp:
        ckpt, _ = fuzz.example(Path(tmp))
        fp16_engine.load_checkpoint(ckpt)
    assert fp16_engine._scaler.state_dict() == {"scale": 1024.0, "good_steps": 0}
    assert fp16_engine.global_steps == 1
