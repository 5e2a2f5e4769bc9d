"""Model cards (hf_zero/card.py): the README.md of an export carries real metadata and the
training setup, from a real checkpoint's manifest, and the template ships inside the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_zero.card import CardInfo, template_text, write_card
from hf_zero.checkpoint import Manifest
from hf_zero.estimate import model_state_bytes
from tests.helpers.hub_server import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("card") / "ckpt"
    return path, save_tiny_checkpoint(path, stage=2, steps=2)


def _numel(checkpoint) -> int:
    return Manifest.read(checkpoint[0]).layout.trainable_numel()


def test_packaged_template_is_the_one_in_model_cards():
    user_copy = (ROOT / "model_cards" / "modelcard_template.md").read_text("utf-8")
    assert template_text() == user_copy
    assert "{{ card_data }}" in user_copy and "{{ zero_stage }}" in user_copy


def test_card_carries_metadata_and_the_training_setup(checkpoint, tmp_path):
    ckpt, run = checkpoint
    info = CardInfo(
        base_model="gpt2",
        datasets=["wikitext"],
        license="mit",
        language="en",
        tags=["causal-lm"],
        train_loss=run["loss"],
        eval_loss=2.5,
        metrics={"accuracy": 0.25},
        memory_stats=run["memory_stats"],
        notes="Trained for a test.",
    )
    path = write_card(tmp_path, Manifest.read(ckpt), info)
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "gpt2"
    assert data["datasets"] == ["wikitext"]
    assert data["license"] == "mit"
    assert data["language"] == ["en"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["hf_zero", "zero-stage-2", "causal-lm"]
    setup = data["hf_zero"]
    assert (setup["zero_stage"], setup["world_size"], setup["steps"]) == (2, 1, 2)
    assert setup["mixed_precision"] == "no"
    assert setup["optimizer"] == "AdamW"
    assert setup["model_state_bytes_per_rank"] == run["memory_stats"]["total_bytes"]
    assert setup["model_state_bytes_source"] == "measured"
    (index,) = data["model-index"]
    assert index["name"] == tmp_path.name
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    assert metrics == {"loss": 2.5, "accuracy": 0.25}
    assert index["results"][0]["dataset"]["name"] == "wikitext"
    text = card.text
    assert "| ZeRO stage | 2 |" in text
    assert "| world size | 1 |" in text
    assert "| optimizer steps | 2 |" in text
    assert f"| final train loss | {run['loss']:.4f} |" in text
    assert "| final eval loss | 2.5000 |" in text
    assert "| accuracy | 0.25 |" in text
    assert "(measured)" in text
    assert "AdamW (lr 0.001, weight_decay 0.01)" in text
    assert "fine-tune of [gpt2](https://huggingface.co/gpt2) on wikitext" in text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/folder")' in text
    assert "## Notes\n\nTrained for a test." in text


def test_card_without_a_measurement_gives_the_zero_accounting(checkpoint, tmp_path):
    write_card(tmp_path, Manifest.read(checkpoint[0]), CardInfo(repo_id="me/tiny"))
    card = ModelCard.load(tmp_path / "README.md")
    numel = _numel(checkpoint)
    # fp32 AdamW at stage 2 on one rank: 4Ψ + 12Ψ/1 = 16Ψ, as plain data parallelism.
    expected = model_state_bytes(numel, world_size=1, stage=2)["total_bytes"]
    assert expected == 16 * numel
    setup = card.data.to_dict()["hf_zero"]
    assert setup["model_state_bytes_per_rank"] == expected
    assert setup["model_state_bytes_source"] == "ZeRO accounting"
    assert "model-index" not in card.data.to_dict()  # no eval results given
    assert card.data.model_name == "tiny"
    assert 'from_pretrained("me/tiny")' in card.text
    assert "| final eval loss | n/a |" in card.text


def test_a_card_is_rewritten_from_the_setup_an_earlier_card_recorded(checkpoint, tmp_path):
    run = checkpoint[1]
    info = CardInfo(memory_stats=run["memory_stats"])
    write_card(tmp_path, Manifest.read(checkpoint[0]), info)
    before = ModelCard.load(tmp_path / "README.md").data.to_dict()["hf_zero"]
    write_card(tmp_path, None, CardInfo(base_model="gpt2", eval_loss=1.0))
    after = ModelCard.load(tmp_path / "README.md")
    assert after.data.to_dict()["hf_zero"] == before  # the measured bytes are kept too
    assert after.data.base_model == "gpt2"
    assert "| final eval loss | 1.0000 |" in after.text


def test_a_card_without_a_manifest_needs_an_hf_zero_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# someone else's card\n")
    with pytest.raises(ValueError, match="has no README.md with hf_zero's training setup"):
        write_card(tmp_path, None, CardInfo())


def test_a_template_of_your_own(checkpoint, tmp_path):
    template = tmp_path / "mine.md"
    template.write_text(
        "---\n{{ card_data }}\n---\n\nStage {{ zero_stage }} on {{ world_size }}.\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    write_card(out, Manifest.read(checkpoint[0]), CardInfo(template=template))
    card = ModelCard.load(out / "README.md")
    assert card.text.strip() == "Stage 2 on 1."
    assert card.data.library_name == "transformers"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"datasets": ["ok", 3]}, r"CardInfo.datasets must be a list of strings, got \['ok', 3\]"),
        ({"eval_loss": "low"}, "CardInfo.eval_loss must be a number or None, got 'low'"),
    ],
)
def test_card_info_refuses_bad_values(kwargs, message):
    with pytest.raises(TypeError, match=message):
        CardInfo(**kwargs)


def test_card_info_takes_a_lone_string_as_one_item():
    assert CardInfo(datasets="imdb", tags="x").datasets == ["imdb"]


def test_the_card_works_from_an_installed_wheel(checkpoint, tmp_path):
    # Built from a clean copy of the sources: no build/ or egg-info left over from elsewhere
    # can add files the package data does not name.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "hf_zero", src / "hf_zero", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(wheel_dir), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheel_dir.glob("hf_zero-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packaged = z.read("hf_zero/templates/modelcard_template.md").decode()
    assert packaged == template_text()
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
        + [str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    out = tmp_path / "out"
    out.mkdir()
    code = (
        "import sys, hf_zero\n"
        "from hf_zero.card import CardInfo, write_card\n"
        "from hf_zero.checkpoint import Manifest\n"
        "write_card(sys.argv[2], Manifest.read(sys.argv[1]), CardInfo(base_model='gpt2'))\n"
        "print(hf_zero.__file__)\n"
    )
    # Run outside the repository, with the installed copy first on the path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint[0]), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()).is_relative_to(target)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "gpt2" and "| ZeRO stage | 2 |" in card.text
