"""The README as a newcomer uses it: every Python snippet runs as it stands, every command names
files that exist and flags the scripts accept, and (opt-in, slow) the two commands at the top
work when pasted into a fresh virtual environment.

Snippets and commands are read out of README.md itself, never copied here, so the README cannot
drift from what runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NEWCOMER = "<!-- readme:newcomer-command -->"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def _commands(block: str) -> list[list[str]]:
    """Shell commands of a bash block: comments dropped, continuation lines joined, `&&`
    chains and leading `VAR=value` assignments split off."""
    text = re.sub(r"\\\n", " ", block)
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words:
                out.append(words)
    return out


PYTHON_SNIPPETS = _blocks("python")
COMMANDS = [c for block in _blocks("bash") for c in _commands(block)]


def test_the_readme_has_snippets_and_commands():
    assert len(PYTHON_SNIPPETS) >= 4, "the README's Python snippets were not found"
    assert len(COMMANDS) >= 15, "the README's commands were not found"
    assert README.count(NEWCOMER) == 2


@pytest.mark.parametrize("index", range(len(PYTHON_SNIPPETS)))
def test_python_snippet_runs_as_written(index, tmp_path):
    """In a fresh folder that has the repository's configs/ (snippets name configs/zero3.yaml),
    as one process."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    script = tmp_path / "snippet.py"
    script.write_text(PYTHON_SNIPPETS[index])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"snippet {index}:\n{PYTHON_SNIPPETS[index]}\n{proc.stderr[-3000:]}"
    )


def _script_and_args(words: list[str]) -> tuple[str, list[str]] | None:
    """The script a launch command runs and its arguments (launcher flags dropped)."""
    for i, w in enumerate(words):
        if w.startswith("scripts/") and w.endswith(".py"):
            return w, words[i + 1 :]
    return None


def test_every_command_names_files_that_exist():
    for words in COMMANDS:
        for w in words:
            for value in w.split("=")[-1:]:
                if re.fullmatch(r"(scripts|configs|tests|docs)/[\w./-]+", value):
                    assert (ROOT / value).exists(), f"{' '.join(words)}: {value} does not exist"


def test_every_finetune_command_parses():
    """The flags of each scripts/finetune.py command are ones its parser accepts (argparse only:
    nothing is loaded, so Hub names in GPU examples are fine offline)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import finetune
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    seen = 0
    for words in COMMANDS:
        found = _script_and_args(words)
        if found and found[0] == "scripts/finetune.py":
            parser = finetune.build_parser()
            parser.parse_args(found[1])
            seen += 1
    assert seen >= 4


def test_every_hf_zero_command_is_a_real_subcommand():
    from hf_zero.cli import main

    seen = set()
    for words in COMMANDS:
        if words[0] != "hf-zero":
            continue
        seen.add(words[1])
        with pytest.raises(SystemExit) as e:
            main([words[1], "--help"])
        assert e.value.code == 0, words
    assert {"consolidate", "inspect", "push", "estimate"} <= seen


@pytest.mark.slow
def test_the_two_newcomer_commands_work_in_a_fresh_environment(tmp_path):
    """The two commands under 'Start here', extracted from the README and run in order in a
    copy of the repository's tracked files, with no virtual environment yet. Slow: the second
    command is the whole CI run."""
    commands = re.findall(rf"{re.escape(NEWCOMER)}\n```bash\n(.*?)```", README, flags=re.S)
    assert len(commands) == 2
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    repo = tmp_path / "hf_zero"
    for name in files:
        src = ROOT / name
        if src.is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / name)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT / ".venv"))
    )
    for i, command in enumerate(commands):
        start = time.monotonic()
        proc = subprocess.run(
            ["bash", "-c", command.strip()],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=5400,
        )
        took = time.monotonic() - start
        print(f"newcomer command {i + 1}: exit {proc.returncode} in {took:.0f} s")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        if i == 0:
            from transformers import AutoModelForCausalLM

            model, info = AutoModelForCausalLM.from_pretrained(
                repo / "output" / "tiny-gpt2", output_loading_info=True
            )
            assert all(not v for v in info.values()), info
            assert (repo / "output" / "tiny-gpt2" / "README.md").is_file()
