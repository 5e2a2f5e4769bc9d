"""hf_zero.presets: the embedded models and data sets (deterministic, quiet, offline) and where a
--model name leads. Tier 1: no process group."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_zero import models, presets

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

# Printed by a fresh interpreter: the corpus, the labelled set, the tokenizer and the initial
# weights of the tiny GPT-2, each as a sha256.
_FINGERPRINT = """
import hashlib, json, torch
from hf_zero import models, presets
h = lambda b: hashlib.sha256(b).hexdigest()
model, tok = presets.build_tiny_gpt2(seed=0)
texts, labels, names = presets.docstring_topics()
print(json.dumps({
    "corpus": h("\\x00".join(presets.docstring_corpus()).encode()),
    "topics": h(json.dumps([texts, labels, names]).encode()),
    "tokenizer": h(tok.backend_tokenizer.to_str().encode()),
    "weights": h(b"".join(p.detach().numpy().tobytes() for p in model.parameters())),
}))
"""


def _fingerprint_in_subprocess() -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_embedded_data_and_models_are_the_same_every_run():
    first, second = _fingerprint_in_subprocess(), _fingerprint_in_subprocess()
    assert first == second
    # ... and the same as in this process (what every rank of a job builds)
    model, tok = presets.build_tiny_gpt2(seed=0)
    here = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
    assert here.hexdigest() == first["weights"]
    assert hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest() == first["tokenizer"]
    other, _ = presets.build_tiny_gpt2(seed=1)
    assert not all(
        (a == b).all() for a, b in zip(model.parameters(), other.parameters())
    )  # the seed matters


def test_corpus_and_labelled_set_shapes():
    corpus = presets.docstring_corpus()
    assert len(corpus) > 500 and len(set(corpus)) == len(corpus)
    assert min(map(len, corpus)) >= presets.MIN_DOC_CHARS
    texts, labels, names = presets.docstring_topics()
    assert names == ["networking", "numbers"]
    assert labels.count(0) == labels.count(1) > 100  # balanced
    assert labels[:6] == [0, 1, 0, 1, 0, 1]  # interleaved: every prefix is balanced
    assert len(set(texts)) == len(texts) and max(map(len, texts)) <= presets.TOPIC_MAX_CHARS
    small, small_labels, _ = presets.docstring_topics(max_per_class=25)
    assert small == texts[:50] and small_labels == labels[:50]


def test_tiny_gpt2_tokenizer_round_trips_and_saves(tmp_path):
    tok = presets.train_tokenizer()
    assert len(tok) == presets.TINY_GPT2_VOCAB
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == 0
    text = "Return the sum of a and b.\n    >>> add(1, 2)\n    3"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]


_QUIET = """
import warnings
warnings.simplefilter("always")
import torch
from hf_zero import models, presets
model, tok = models.load_model(models.resolve_model("embedded:tiny-gpt2"), "clm")
enc = tok(["def f(x): return x", "Return the value."], return_tensors="pt", padding=True)
loss = model(**enc, labels=enc["input_ids"]).loss
prompt = tok(["def f(x):"], return_tensors="pt")
model.generate(**prompt, max_new_tokens=3, do_sample=False)
source = models.resolve_model("embedded:minilm")
cls, btok = models.load_model(source, "cls", num_labels=2, id2label={0: "a", 1: "b"})
mlm, _ = models.load_model(source, "mlm")
benc = btok(["a sentence"], return_tensors="pt")
cls(**benc, labels=torch.tensor([1])).loss.backward()
mlm(**benc, labels=benc["input_ids"])
print(f"ok {loss.item():.3f} {cls.config.id2label} {type(mlm).__name__}")
"""


def test_embedded_models_build_without_a_warning():
    """Building, a forward with labels, generate and the MiniLM loads print nothing: no token id
    outside the vocabulary, no unrecognised loss_type, no load report for the new heads. In a
    fresh interpreter, as transformers warns each thing once per process."""
    out = subprocess.run(
        [sys.executable, "-c", _QUIET], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    ok, loss, rest = out.stdout.strip().split(" ", 2)
    assert ok == "ok" and 6.5 < float(loss) < 9  # about ln(2048): a fresh model
    assert rest == "{0: 'a', 1: 'b'} BertForMaskedLM"


def test_minilm_is_the_pretrained_weights():
    import safetensors.torch

    model, _ = models.load_model(models.resolve_model("embedded:minilm"), "cls", num_labels=2)
    ref = safetensors.torch.load_file(presets.minilm_path() / "model.safetensors")
    key = next(k for k in ref if k.endswith("encoder.layer.0.attention.self.query.weight"))
    ours = dict(model.named_parameters())["bert." + key.removeprefix("bert.")]
    assert (ours == ref[key]).all()
