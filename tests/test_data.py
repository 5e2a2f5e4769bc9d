"""hf_zero.data: loading, column checks, task inference, tokenizing, grouping, collating.
Tier 1: no process group. Every user-facing error is matched by its text."""

from __future__ import annotations

import json
import re

import pytest

from hf_zero import data, models, presets

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    return presets.train_tokenizer()


@pytest.fixture(scope="module")
def bert_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(presets.minilm_path()))


@pytest.fixture
def offline(monkeypatch):
    reason = "no network: huggingface.co:443 cannot be reached (test)"
    monkeypatch.setattr(models, "hub_unreachable", lambda timeout_s=3.0: reason)
    return reason


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"text": f"sentence number {i} about {'cats' if i % 2 else 'dogs'}", "label": i % 2}
        for i in range(20)]  # fmt: skip


# ---- group_texts: pure ------------------------------------------------------------------------


def test_group_texts_concatenates_and_drops_the_tail():
    out = data.group_texts({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8]], "m": [[1] * 3, [1] * 2,
                           [0] * 3]}, 3)  # fmt: skip
    assert out == {"input_ids": [[1, 2, 3], [4, 5, 6]], "m": [[1, 1, 1], [1, 1, 0]]}
    assert data.group_texts({"input_ids": [[1, 2]]}, 3) == {"input_ids": []}
    # every token kept up to the last full block, in order, for many block sizes
    rows = [list(range(i * 10, i * 10 + n)) for i, n in enumerate([7, 1, 12, 5])]
    flat = [t for r in rows for t in r]
    for bs in range(1, 26):
        blocks = data.group_texts({"input_ids": rows}, bs)["input_ids"]
        assert all(len(b) == bs for b in blocks)
        assert [t for b in blocks for t in b] == flat[: len(flat) // bs * bs]
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        data.group_texts({"input_ids": rows}, 0)


# ---- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["json", "jsonl", "csv", "txt"])
def test_load_local_files_of_each_format(tmp_path, ext):
    path = tmp_path / f"train.{ext}"
    if ext == "csv":
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    elif ext == "txt":
        path.write_text("".join(r["text"] + "\n" for r in ROWS))
    elif ext == "json":
        path.write_text(json.dumps(ROWS))
    else:
        _write_jsonl(path, ROWS)
    raw = data.load_raw_dataset(str(path))
    assert list(raw) == ["train"] and len(raw["train"]) == 20
    assert raw["train"]["text"][3] == ROWS[3]["text"]
    if ext != "txt":
        assert list(raw["train"]["label"])[:4] == [0, 1, 0, 1]


def test_load_with_validation_file(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    valid = _write_jsonl(tmp_path / "valid.jsonl", ROWS[:4])
    raw = data.load_raw_dataset(str(train), validation_file=str(valid))
    assert {k: len(v) for k, v in raw.items()} == {"train": 20, "validation": 4}
    tr, ev = data.split_train_eval(raw, eval_fraction=0.5)
    assert (len(tr), len(ev)) == (20, 4)  # the source's validation split wins over the fraction


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(data.DataError, match=re.escape(f"--dataset file not found: '{missing}'")):
        data.load_raw_dataset(str(missing))
    with pytest.raises(data.DataError, match="--validation_file file not found"):
        data.load_raw_dataset(
            str(_write_jsonl(tmp_path / "t.jsonl", ROWS)), validation_file=str(missing)
        )


def test_bad_extensions(tmp_path):
    bad = tmp_path / "train.parquet"
    bad.write_text("x")
    with pytest.raises(
        data.DataError, match=r"has the extension '\.parquet'; local data files must"
    ):
        data.load_raw_dataset(str(bad))
    a = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = tmp_path / "b.csv"
    b.write_text("text\nx\n")
    with pytest.raises(data.DataError, match="--dataset files mix formats"):
        data.load_raw_dataset([str(a), str(b)])


def test_unreadable_file_is_one_clear_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(data.DataError, match="cannot read the --dataset files"):
        data.load_raw_dataset(str(broken))


def test_hub_name_while_offline_says_so(offline):
    with pytest.raises(data.DataError) as e:
        data.load_raw_dataset("imdb")
    msg = str(e.value)
    assert "--dataset 'imdb' is not a local file, and this machine is offline" in msg
    assert offline in msg and "--dataset train.jsonl" in msg and "HF_HUB_OFFLINE=1" in msg


def test_embedded_datasets():
    raw = data.load_raw_dataset("embedded:docstring-topics")
    assert raw["train"].features["label"].names == ["networking", "numbers"]
    with pytest.raises(data.DataError, match="is not an embedded data set; the embedded data"):
        data.load_raw_dataset("embedded:nope")
    with pytest.raises(data.DataError, match="is embedded: it takes no further files"):
        data.load_raw_dataset("embedded:docstrings", config_name="x")


# ---- columns, classes, tasks ------------------------------------------------------------------


def _raw(**columns):
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})


def test_check_columns_names_what_exists():
    raw = _raw(sentence=["a", "b"], y=[0, 1])
    with pytest.raises(
        data.DataError,
        match=re.escape(
            "text column 'text' is not in the 'train' split (columns: sentence, y); "
            "pass --text_column NAME"
        ),
    ):
        data.check_columns(raw, task="clm")
    with pytest.raises(data.DataError, match=r"text column 'body' is not in .*pick one of them"):
        data.check_columns(raw, task="clm", text_column="body")
    cols = data.check_columns(raw, task="cls", text_column="sentence", label_column="y")
    assert cols == data.Columns(text="sentence", label="y")
    assert data.check_columns(raw, task="mlm", text_column="sentence").label is None


def test_cls_without_a_label_column_says_so():
    raw = _raw(text=["a", "b"])
    with pytest.raises(
        data.DataError,
        match=re.escape(
            "--task cls needs a label column, and 'label' is not in the 'train' split "
            "(columns: text); pass --label_column NAME"
        ),
    ):
        data.check_columns(raw, task="cls")


def test_class_names():
    assert data.class_names(_raw(label=[1, 0, 1]), "label") == ["0", "1"]
    assert data.class_names(_raw(label=["pos", "neg", "pos"]), "label") == ["neg", "pos"]
    topics = data.load_raw_dataset("embedded:docstring-topics")
    assert data.class_names(topics, "label") == ["networking", "numbers"]
    with pytest.raises(data.DataError, match="holds float values; --task cls needs class labels"):
        data.class_names(_raw(label=[0.5, 1.5]), "label")
    with pytest.raises(data.DataError, match=r"has only one class \(x\)"):
        data.class_names(_raw(label=["x", "x"]), "label")


def test_infer_and_check_task():
    gpt2 = transformers.GPT2Config()
    bert = transformers.BertConfig()
    assert data.infer_task(gpt2, has_label_column=True) == "clm"
    assert data.infer_task(bert, has_label_column=True) == "cls"
    assert data.infer_task(bert, has_label_column=False) == "mlm"
    bert.architectures = ["BertForMaskedLM"]
    assert data.infer_task(bert, has_label_column=True) == "mlm"  # the saved head says it
    data.check_task(gpt2, "clm")
    with pytest.raises(
        data.DataError, match=r"--task mlm \(masked LM\) does not fit a 'gpt2' model.*--task clm"
    ):
        data.check_task(gpt2, "mlm")
    with pytest.raises(data.DataError, match="--task must be one of clm, cls, mlm, got 'seq2seq'"):
        data.check_task(gpt2, "seq2seq")


def test_resolve_block_size(gpt2_tokenizer):
    config = transformers.GPT2Config(n_positions=128)
    assert data.resolve_block_size(None, gpt2_tokenizer, config) == 128
    assert data.resolve_block_size(32, gpt2_tokenizer, config) == 32
    with pytest.raises(data.DataError, match="--block_size 512 is longer than the model's 128"):
        data.resolve_block_size(512, gpt2_tokenizer, config)
    with pytest.raises(data.DataError, match="--max_length must be a positive number of tokens"):
        data.resolve_block_size(0, gpt2_tokenizer, config, flag="--max_length")


def test_split_train_eval_is_seeded():
    raw = _raw(text=[str(i) for i in range(100)])
    a_train, a_eval = data.split_train_eval(raw, eval_fraction=0.1, seed=3)
    b_train, b_eval = data.split_train_eval(raw, eval_fraction=0.1, seed=3)
    assert len(a_eval) == 10 and list(a_eval["text"]) == list(b_eval["text"])
    assert sorted([*a_train["text"], *a_eval["text"]]) == sorted(raw["train"]["text"])
    assert data.split_train_eval(raw, eval_fraction=0)[1] is None
    with pytest.raises(data.DataError, match=r"--eval_fraction must be in \[0, 1\), got 1.5"):
        data.split_train_eval(raw, eval_fraction=1.5)


# ---- tokenizing and collating -----------------------------------------------------------------


def test_clm_blocks_are_the_documents_joined_by_eos(gpt2_tokenizer):
    docs = ["def add(a, b): return a + b", "Return the sum of two numbers.", "x" * 50]
    ds = datasets.Dataset.from_dict({"text": docs})
    blocks = data.tokenize_dataset(ds, gpt2_tokenizer, task="clm", block_size=8)
    eos = gpt2_tokenizer.eos_token_id
    joined = [t for d in docs for t in gpt2_tokenizer(d)["input_ids"] + [eos]]
    assert list(blocks["input_ids"]) == [
        joined[i : i + 8] for i in range(0, len(joined) // 8 * 8, 8)
    ]
    assert list(blocks["labels"]) == list(blocks["input_ids"])
    batch = data.build_collator("clm", gpt2_tokenizer)([blocks[0], blocks[1]])
    assert (
        batch["input_ids"].shape == (2, 8)
        and batch["labels"].tolist() == list(blocks["labels"])[:2]
    )
    with pytest.raises(data.DataError, match="fewer than one block of 4096"):
        data.tokenize_dataset(ds, gpt2_tokenizer, task="clm", block_size=4096)


def test_cls_truncates_and_maps_labels(bert_tokenizer):
    ds = datasets.Dataset.from_dict(
        {"t": ["short", "a much longer text " * 20], "y": ["pos", "neg"]}
    )
    out = data.tokenize_dataset(
        ds, bert_tokenizer, task="cls", text_column="t", label_column="y",
        class_names=["neg", "pos"], max_length=16,
    )  # fmt: skip
    assert list(out["labels"]) == [1, 0]
    assert max(len(r) for r in out["input_ids"]) == 16
    batch = data.build_collator("cls", bert_tokenizer)([out[0], out[1]])
    assert batch["input_ids"].shape == (2, 16)  # padded to the longest
    with pytest.raises(data.DataError, match=r"labels \['pos'\] of 'y' are not among the classes"):
        data.tokenize_dataset(ds, bert_tokenizer, task="cls", text_column="t", label_column="y",
                              class_names=["neg", "other"])  # fmt: skip


def test_mlm_collator_masks_and_needs_a_mask_token(bert_tokenizer, gpt2_tokenizer):
    import torch

    ds = datasets.Dataset.from_dict({"text": ["the quick brown fox jumps over the lazy dog"] * 20})
    blocks = data.tokenize_dataset(ds, bert_tokenizer, task="mlm", block_size=32)
    assert "special_tokens_mask" in blocks.column_names and "labels" not in blocks.column_names
    torch.manual_seed(0)
    batch = data.build_collator("mlm", bert_tokenizer, mlm_probability=0.3)(list(blocks))
    masked = batch["labels"] != -100
    assert 0.15 < masked.float().mean() < 0.45
    special = torch.tensor(list(blocks["special_tokens_mask"])).bool()
    assert not (masked & special).any()  # [CLS]/[SEP] are never masked
    with pytest.raises(data.DataError, match="--task mlm masks tokens, and the tokenizer"):
        data.build_collator("mlm", presets.train_tokenizer())
    with pytest.raises(data.DataError, match=r"--mlm_probability must be in \(0, 1\), got 0"):
        data.build_collator("mlm", bert_tokenizer, mlm_probability=0)


def test_prepare_datasets_end_to_end(gpt2_tokenizer):
    raw = data.load_raw_dataset("embedded:docstrings")
    cols = data.check_columns(raw, task="clm")
    prepared = data.prepare_datasets(
        raw, gpt2_tokenizer, task="clm", columns=cols, block_size=64, eval_fraction=0.05,
        max_train_samples=100,
    )  # fmt: skip
    assert len(prepared.train) == 100 and len(prepared.eval) > 10
    assert set(prepared.train.column_names) == {"input_ids", "attention_mask", "labels"}
    with pytest.raises(data.DataError, match="--max_train_samples must be a positive number"):
        data.prepare_datasets(raw, gpt2_tokenizer, task="clm", columns=cols, max_train_samples=0)


def test_import_hf_zero_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, hf_zero; heavy = [m for m in ('transformers', 'datasets', 'accelerate') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
