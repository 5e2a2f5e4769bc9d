"""hf_zero.models: where a --model name leads (embedded preset, folder, config.json, Hub id;
offline-aware) and loading it for a task. Tier 1: no process group."""

from __future__ import annotations

import re

import pytest

from hf_zero import models, presets

pytest.importorskip("transformers")


def test_bert_heads_tell_the_trainer_their_loss_is_a_local_mean():
    model, _ = models.load_model(models.resolve_model("embedded:minilm"), "cls", num_labels=2)
    assert model.accepts_loss_kwargs is False  # else the Trainer logs N x the loss at N ranks
    gpt2, _ = models.load_model(models.resolve_model("embedded:tiny-gpt2"), "clm")
    assert getattr(gpt2, "accepts_loss_kwargs", True) is True  # GPT-2 divides by the count


def test_resolve_model_kinds(tmp_path):
    assert models.resolve_model("embedded:tiny-gpt2").kind == "embedded"
    folder = models.resolve_model(str(presets.minilm_path()))
    assert folder.kind == "folder"
    config = models.resolve_model(
        str(presets.minilm_path() / "config.json"), allow_config_file=True
    )
    assert config.kind == "config_file"
    assert type(models.load_config(config)).__name__ == "BertConfig"


def test_resolve_model_errors(tmp_path):
    with pytest.raises(models.SourceError, match="'embedded:gpt5' is not an embedded preset"):
        models.resolve_model("embedded:gpt5")
    with pytest.raises(models.SourceError, match="is a folder without config.json"):
        models.resolve_model(str(tmp_path))
    cfg = presets.minilm_path() / "config.json"
    with pytest.raises(models.SourceError, match="is a file; it needs a model folder"):
        models.resolve_model(str(cfg))
    with pytest.raises(models.SourceError, match=r"no such file or folder; pass a model folder"):
        models.resolve_model(str(tmp_path / "missing" / "model"))


def test_hub_name_while_offline_says_so_and_how_to_fix(monkeypatch):
    reason = "no network: huggingface.co:443 cannot be reached (test)"
    monkeypatch.setattr(models, "hub_unreachable", lambda timeout_s=3.0: reason)
    with pytest.raises(models.SourceError) as e:
        models.resolve_model("hf-zero-tests/not-cached-model")
    msg = str(e.value)
    assert re.search(r"'hf-zero-tests/not-cached-model' is not a local folder, and this machine "
                     r"is offline \(no network: .*\)", msg)  # fmt: skip
    assert "Point --model at a local model folder" in msg and "embedded:tiny-gpt2" in msg


def test_hub_unreachable_honours_offline_mode(monkeypatch):
    from huggingface_hub import constants

    models.hub_unreachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    try:
        assert models.hub_unreachable() == "HF_HUB_OFFLINE is set"
    finally:
        models.hub_unreachable.cache_clear()


def test_preset_task_mismatch():
    with pytest.raises(models.SourceError, match="--task mlm does not fit embedded:tiny-gpt2"):
        models.load_model(models.resolve_model("embedded:tiny-gpt2"), "mlm")


def test_load_model_from_a_local_folder(tmp_path):
    """A folder saved by save_pretrained loads for its task like the Hub would give it, with a
    pad token for a tokenizer that has none and the causal-LM loss type set."""
    model, tok = presets.build_tiny_gpt2(seed=3)
    model.save_pretrained(tmp_path / "m")
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = models.load_model(models.resolve_model(str(tmp_path / "m")), "clm")
    assert type(loaded).__name__ == "GPT2LMHeadModel" and loaded.loss_type == "ForCausalLM"
    assert ltok.pad_token == ltok.eos_token == "<|endoftext|>"
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert (a == b).all()
