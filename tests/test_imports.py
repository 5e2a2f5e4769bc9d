"""The package's import structure: `import hf_zero` stays light, the integrations load lazily,
no import cycle inside hf_zero, the checkpoint package never reaches the engine, and only
hf_zero/comm.py touches torch.distributed.

The import graph is read from the source with ast (every `import` and `from ... import`
statement, at module level or inside functions, relative ones resolved), so it covers code that
a test run never executes.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hf_zero

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_zero"
HEAVY = ("transformers", "accelerate", "datasets", "peft")


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_import_hf_zero_imports_no_integration_library():
    proc = _python("import hf_zero", "-X", "importtime")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # "import time: self [us] | cumulative | imported package", one line per module imported.
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "hf_zero" in imported and "hf_zero.engine" in imported
    for heavy in HEAVY:
        assert not any(m == heavy or m.startswith(heavy + ".") for m in imported), heavy
    proc = _python("import hf_zero, json, sys; print(json.dumps(sorted(sys.modules)))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout)
    assert [m for m in loaded if m.split(".")[0] in HEAVY] == []


def test_public_names_are_few_and_explicit():
    assert len(hf_zero.__all__) <= 15
    assert len(set(hf_zero.__all__)) == len(hf_zero.__all__)
    assert set(hf_zero.__all__) <= set(dir(hf_zero))
    for name in set(hf_zero.__all__) - set(hf_zero._LAZY):
        assert name in vars(hf_zero), name  # loaded by `import hf_zero` itself
    with pytest.raises(AttributeError, match="module 'hf_zero' has no attribute 'Nope'"):
        hf_zero.Nope  # noqa: B018


LAZY_CHECK = r"""
import importlib, json, sys
import hf_zero
heavy = {heavy!r}
out = []
for name, module in {lazy!r}:
    before = sorted(m for m in heavy if m in sys.modules)
    value = getattr(hf_zero, name)
    assert value is getattr(importlib.import_module(module), name), name
    out.append([name, before, sorted(m for m in heavy if m in sys.modules), value.__module__])
print(json.dumps(out))
"""


def test_integrations_load_on_first_use():
    lazy = [
        (n, m) for n, m in hf_zero._LAZY.items() if (ROOT / f"{m.replace('.', '/')}.py").exists()
    ]
    # The light ones first: the Hub push and the card import none of the heavy libraries.
    lazy.sort(key=lambda nm: nm[1].startswith("hf_zero.integrations"))
    assert ("push_to_hub", "hf_zero.hub") in lazy and ("CardInfo", "hf_zero.card") in lazy
    proc = _python(LAZY_CHECK.format(heavy=HEAVY, lazy=lazy))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = set()
    for name, before, after, defined_in in json.loads(proc.stdout):
        assert set(before) == seen, name  # nothing loaded a library before its first user
        assert defined_in.startswith("hf_zero."), (name, defined_in)
        if name == "ZeroAccelerator":
            assert "accelerate" in after
        if name in ("ZeroTrainer", "ZeroTrainingArguments"):
            assert "transformers" in after
        if name in ("push_to_hub", "CardInfo"):
            assert after == [], name
        seen = set(after)


# ---- the import graph, read from the source --------------------------------------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the module: absolute names as
    written, relative ones resolved; `from X import y` counts X.y when y is a module (X is then
    only its parent package, imported first whatever the order), else X."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((sub if sub in known else target, node.lineno))
    return out


def _graph() -> dict[str, dict[str, int]]:
    """hf_zero module -> {hf_zero module it imports: line}."""
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        edges = {}
        for target, line in _imports(name, path, known):
            if target in known and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_walker_sees_relative_and_function_level_imports(tmp_path):
    # The walker itself, on a made-up package: a cycle through a function-level relative import.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    known = {"pkg", "pkg.a", "pkg.b"}

    def name_of(p):
        return ".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__")

    graph = {
        name_of(p): {t: ln for t, ln in _imports(name_of(p), p, known) if t in known}
        for p in sorted(pkg.glob("*.py"))
    }
    assert graph["pkg.a"] == {"pkg.b": 1}
    assert graph["pkg.b"] == {"pkg.a": 2}
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]


def test_no_import_cycle_inside_hf_zero():
    graph = _graph()
    assert len(graph) > 10 and "hf_zero.engine" in graph
    report = []
    for cycle in _cycles(graph):
        edges = [f"{a} -> {b} (line {graph[a][b]})" for a in cycle for b in graph[a] if b in cycle]
        report.append("; ".join(edges))
    assert report == [], "import cycles:\n" + "\n".join(report)


def test_the_checkpoint_package_never_reaches_the_engine():
    graph = _graph()
    for start in (m for m in graph if m.startswith("hf_zero.checkpoint")):
        seen, todo, via = {start}, [start], {}
        while todo:
            m = todo.pop()
            for target in graph[m]:
                if target not in seen:
                    seen.add(target)
                    via[target] = m
                    todo.append(target)
        if "hf_zero.engine" in seen:
            chain, m = ["hf_zero.engine"], "hf_zero.engine"
            while m != start:
                m = via[m]
                chain.append(m)
            pytest.fail("the checkpoint package imports the engine: " + " -> ".join(chain[::-1]))


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside a type annotation (never evaluated under
    `from __future__ import annotations`)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            roots.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns:
            roots.append(node.returns)
    return {id(n) for root in roots for n in ast.walk(root)}


def _touches_torch_distributed(path: Path) -> list[int]:
    """Lines that import torch.distributed or reach it as `torch.distributed` in code."""
    lines = []
    tree = ast.parse(path.read_text(), filename=str(path))
    in_annotation = _annotation_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name.startswith("torch.distributed") for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.startswith("torch.distributed") or (
                node.module == "torch" and any(a.name == "distributed" for a in node.names)
            ):
                lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            if (
                isinstance(node.value, ast.Name)
                and node.value.id == "torch"
                and id(node) not in in_annotation
            ):
                lines.append(node.lineno)
    return lines


def test_only_comm_touches_torch_distributed():
    offenders = {}
    for name, path in _modules().items():
        if name == "hf_zero.comm":
            continue
        lines = _touches_torch_distributed(path)
        if lines:
            offenders[str(path.relative_to(ROOT))] = lines
    assert offenders == {}, f"torch.distributed used outside hf_zero/comm.py: {offenders}"
    assert _touches_torch_distributed(PACKAGE / "comm.py")  # the check sees it where it is


# ---- what the tests import, and what the `test` extra installs ---------------------------------

# Imported by tests only when present, each skipping without it (the `bench` extra).
OPTIONAL = {"deepspeed"}


def _third_party_imports_of_the_tests() -> dict[str, str]:
    """Top-level module -> a file importing it, over tests/ and scripts/ (which the tests run),
    for every module not from the standard library, this repository or OPTIONAL."""
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "scripts").rglob("*.py"))
    local = {"hf_zero", "tests", "scripts"} | {p.stem for p in files}
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top not in sys.stdlib_module_names and top not in local | OPTIONAL:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _requirement_closure(requirements: list[str]) -> set[str]:
    """Normalised distribution names of `requirements` and everything they require (as
    installed here), following extras-free requirements only."""
    from importlib import metadata

    def name(req: str) -> str:
        return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")

    seen, todo = set(), [name(r) for r in requirements]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [name(r) for r in requires if "extra ==" not in r]
    return seen


def test_the_test_extra_installs_every_library_the_tests_import():
    from importlib import metadata

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = _requirement_closure(
        project["dependencies"] + project["optional-dependencies"]["test"]
    )
    providers = metadata.packages_distributions()
    missing = {}
    for module, where in _third_party_imports_of_the_tests().items():
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not dists & installed:
            missing[module] = where
    # tests/test_bench.py runs scripts/bench.py, which draws its plots with matplotlib.
    assert _third_party_imports_of_the_tests()["matplotlib"].startswith("scripts/")
    assert missing == {}, f"imported by the tests but not installed by hf_zero[test]: {missing}"
