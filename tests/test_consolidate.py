"""Tier 4: `hf_zero.consolidate` and `hf-zero consolidate / inspect` on real checkpoints.

Checkpoints come from 2 or 3 gloo ranks (3: uneven padding) at stages 1, 2 and 3 after two
training steps. The export is checked against what the training run itself holds
(`engine.full_state_dict()`, logits of `engine.module`) and against what `save_pretrained`
writes for the same model class, and it must load with plain `from_pretrained` with every
list of its loading info empty.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_zero
from hf_zero.checkpoint import CheckpointError
from hf_zero.checkpoint.consolidate import _rank_slices, parse_size, plan_shards
from hf_zero.cli import main
from scripts.harness.cases import SEQ, VOCAB, global_batch, make_model, param_groups, rank_slice
from scripts.harness.dist import run_distributed

FIXED_INPUT = (torch.arange(2 * SEQ).reshape(2, SEQ) * 7 + 3) % VOCAB

# name -> (model kind, world size, stage, extra persistent buffers)
CASES = {
    "gpt2-ws2-stage3": ("gpt2", 2, 3, False),
    "gpt2-ws3-stage1": ("gpt2", 3, 1, False),
    "bert-ws2-stage1": ("bert", 2, 1, False),
    "bert-ws3-stage3": ("bert", 3, 3, False),
    "gpt2-ws2-stage2-buffers": ("gpt2", 2, 2, True),
}
MAIN = ["gpt2-ws2-stage3", "gpt2-ws3-stage1", "bert-ws2-stage1", "bert-ws3-stage3"]


def _train_and_save(rank, world_size, kind, stage, path, buffers):
    model = make_model(kind)
    if buffers:  # persistent buffers: saved once, by rank 0, as `buffer:{name}`
        model.register_buffer("step_ids", torch.tensor([7, 8, 9]))
        model.transformer.register_buffer("scale", torch.linspace(0, 1, 5, dtype=torch.float16))
    opt = torch.optim.AdamW(param_groups(model), lr=1e-2)
    engine = hf_zero.initialize(model, opt, config=hf_zero.ZeroConfig(stage=stage))
    for step in range(2):
        loss = engine(**rank_slice(global_batch(kind, step, 0, world_size), rank)).loss
        engine.backward(loss)
        engine.step()
        engine.zero_grad()
    engine.save_checkpoint(path)
    full = engine.full_state_dict()  # collective
    with torch.no_grad():  # the raw model: stage 3 gathers in its own hooks, on every rank
        logits = engine.module(input_ids=FIXED_INPUT).logits
    padded = any(fu.padded_numel != fu.numel for fu in engine._layout.flat_units)
    return full, logits, padded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each case's checkpoint, made on first use: name -> (path, full state dict, logits)."""
    made = {}

    def get(name):
        if name not in made:
            kind, world_size, stage, buffers = CASES[name]
            path = tmp_path_factory.mktemp(name) / "ckpt"
            full, logits, padded = run_distributed(
                _train_and_save, world_size, kind, stage, str(path), buffers
            )[0]
            assert padded or world_size != 3  # ws 3 exercises uneven padding
            made[name] = (path, full, logits)
        return made[name]

    return get


def _auto_class(kind):
    import transformers

    return (
        transformers.AutoModelForCausalLM
        if kind == "gpt2"
        else transformers.AutoModelForSequenceClassification
    )


def _load_clean(kind, folder):
    model, info = _auto_class(kind).from_pretrained(folder, output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}, info
    return model.eval()


def _export_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            assert st.metadata() == {"format": "pt"}
        out.update(load_file(str(f)))
    return out


def _save_pretrained_keys(kind, tmp_path) -> set[str]:
    folder = tmp_path / "reference"
    make_model(kind).save_pretrained(folder)
    return set(load_file(str(folder / "model.safetensors")))


# ---- pure parts -------------------------------------------------------------------------------


def test_parse_size_uses_decimal_units_like_hf():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("10KB") == 10_000
    assert parse_size("1.5gb") == 1_500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match=r"like '5GB'.*got '5 parsecs'"):
        parse_size("5 parsecs")
    with pytest.raises(ValueError, match="at least 1 byte"):
        parse_size(0)


@pytest.mark.parametrize("max_bytes", [1, 10, 25, 40, 1000])
def test_plan_shards_matches_huggingface_hub(max_bytes):
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = [3, 30, 5, 5, 12, 1, 26, 2, 2, 9, 4]
    sd = {f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    want = split_torch_state_dict_into_shards(sd, max_shard_size=max_bytes)
    got = plan_shards([(k, v.numel()) for k, v in sd.items()], max_bytes)
    assert [list(want.filename_to_tensors[f]) for f in want.filename_to_tensors] == got


def test_rank_slices_cover_the_elements_in_order():
    for shard_numel in range(1, 6):
        for offset in range(3 * shard_numel):
            for numel in range(3 * shard_numel - offset + 1):
                got = []
                for rank, start, dst, n in _rank_slices(offset, numel, shard_numel):
                    assert n > 0 and dst == len(got) and start + n <= shard_numel
                    got.extend(rank * shard_numel + start + i for i in range(n))
                assert got == list(range(offset, offset + numel))


# ---- exports of real checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("name", MAIN)
def test_export_is_what_save_pretrained_writes(checkpoints, tmp_path, name):
    kind = CASES[name][0]
    ckpt, full, logits = checkpoints(name)
    out = hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)

    want_files = {"model.safetensors", "config.json", "README.md"} | (
        {"generation_config.json"} if kind == "gpt2" else set()
    )
    assert {p.name for p in out.iterdir()} == want_files
    tensors = _export_tensors(out)
    assert set(tensors) == _save_pretrained_keys(kind, tmp_path)
    if kind == "gpt2":
        assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors
    for key, value in tensors.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, full[key]), key
    fresh = make_model(kind).state_dict()  # the export holds the trained weights, every one
    assert [k for k, v in tensors.items() if torch.equal(v, fresh[k])] == []

    model = _load_clean(kind, out)
    if kind == "gpt2":  # the tie survives the export
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        got = model(input_ids=FIXED_INPUT).logits
    torch.testing.assert_close(got, logits, rtol=0, atol=1e-6)


def test_small_max_shard_size_gives_an_index_that_loads(checkpoints, tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    ckpt, full, logits = checkpoints("gpt2-ws2-stage3")
    out = hf_zero.consolidate(ckpt, tmp_path / "hf", max_shard_size="20KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and "model.safetensors" not in shards
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    tensors = _export_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert index["metadata"]["total_parameters"] == make_model("gpt2").num_parameters()
    # The same split, file by file, as save_pretrained's helper makes of the same state dict.
    model = make_model("gpt2")
    model.load_state_dict(full)
    sd = remove_tied_weights_from_state_dict(model.state_dict(), model)
    want = split_torch_state_dict_into_shards(
        sd, filename_pattern="model{suffix}.safetensors", max_shard_size="20KB"
    )
    assert index["weight_map"] == want.tensor_to_filename
    for shard in shards:
        part = load_file(str(out / shard))
        assert len(part) == 1 or sum(t.nbytes for t in part.values()) <= 20_000, shard
    loaded = _load_clean("gpt2", out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=FIXED_INPUT).logits, logits, rtol=0, atol=1e-6)


def test_bfloat16_and_auto_dtypes(checkpoints, tmp_path):
    ckpt, full, _ = checkpoints("bert-ws2-stage1")
    out = hf_zero.consolidate(ckpt, tmp_path / "bf16", dtype="bfloat16", progress=False)
    tensors = _export_tensors(out)
    for key, value in tensors.items():
        assert value.dtype == torch.bfloat16, key
        assert torch.equal(value, full[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = _load_clean("bert", out)
    assert model.dtype == torch.bfloat16

    manifest = json.loads((ckpt / "zero" / "manifest.json").read_text())
    auto = _export_tensors(
        hf_zero.consolidate(ckpt, tmp_path / "auto", dtype="auto", progress=False)
    )
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in auto.items()} == manifest[
        "hf_export"
    ]["dtypes"]


def test_buffers_come_from_rank_0_and_keep_integer_dtypes(checkpoints, tmp_path):
    ckpt, full, _ = checkpoints("gpt2-ws2-stage2-buffers")
    tensors = _export_tensors(hf_zero.consolidate(ckpt, tmp_path / "fp32", progress=False))
    assert torch.equal(tensors["step_ids"], torch.tensor([7, 8, 9]))
    assert tensors["transformer.scale"].dtype == torch.float32
    assert torch.equal(tensors["transformer.scale"], full["transformer.scale"].float())
    assert set(tensors) == set(full) - {"lm_head.weight"}
    half = _export_tensors(
        hf_zero.consolidate(ckpt, tmp_path / "fp16", dtype="float16", progress=False)
    )
    assert half["step_ids"].dtype == torch.int64
    assert torch.equal(half["transformer.scale"], full["transformer.scale"])
    kept = _export_tensors(hf_zero.consolidate(ckpt, tmp_path / "none", dtype=None, progress=False))
    assert kept["transformer.scale"].dtype == torch.float16
    assert kept["transformer.wte.weight"].dtype == torch.float32


# ---- errors -----------------------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_params_file_is_refused_naming_it(checkpoints, tmp_path):
    src, _, _ = checkpoints("gpt2-ws3-stage1")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    bad = ckpt / "zero" / "params-rank00002-of-00003.safetensors"
    _flip_byte(bad)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: sha256") + ".*corrupted"):
        hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left

    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ".*truncated"):
        hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)
    bad.unlink()
    with pytest.raises(CheckpointError, match="file params-rank00002-of-00003.safetensors is miss"):
        hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)
    with pytest.raises(CheckpointError, match="no manifest"):
        hf_zero.consolidate(tmp_path, tmp_path / "hf", progress=False)


def _edit_manifest(ckpt: Path, edit) -> None:
    path = ckpt / "zero" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_bad_manifest_or_foreign_params_file_names_it(checkpoints, tmp_path):
    src, _, _ = checkpoints("gpt2-ws2-stage3")
    manifest_path = tmp_path / "ckpt" / "zero" / "manifest.json"

    def fresh():
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
        return Path(shutil.copytree(src, tmp_path / "ckpt"))

    ckpt = fresh()
    _edit_manifest(ckpt, lambda m: m["hf_export"]["keys"].append("transformer.extra.weight"))
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"{manifest_path}: export key 'transformer.extra.weight' is neither")
        + ".*in params-rank00000-of-00002.safetensors",
    ):
        hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)

    ckpt = fresh()
    _edit_manifest(ckpt, lambda m: m.pop("hf_export"))
    with pytest.raises(CheckpointError, match=re.escape(f"{manifest_path}: the manifest has no")):
        hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)

    ckpt = fresh()
    _edit_manifest(ckpt, lambda m: m["hf_export"]["dtypes"].clear())
    with pytest.raises(CheckpointError, match="hf_export gives no dtype for 'transformer.wte"):
        hf_zero.consolidate(ckpt, tmp_path / "hf", dtype="auto", progress=False)

    # A params file that passes the checksum (the manifest was rewritten for it) but does not
    # hold what the layout says.
    ckpt = fresh()
    bad = ckpt / "zero" / "params-rank00001-of-00002.safetensors"
    tensors = load_file(str(bad))
    good = tensors["flat00001"].clone()
    tensors["flat00001"] = tensors["flat00001"][:-1].clone()
    save_file(tensors, str(bad), metadata={"format": "pt"})

    def rehash(m):
        digest = hashlib.sha256(bad.read_bytes()).hexdigest()
        m["files"][bad.name] = {"size": bad.stat().st_size, "sha256": digest}

    _edit_manifest(ckpt, rehash)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: tensor 'flat00001' is F32 [")):
        hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)
    tensors["flat00001"] = good  # only the missing tensor is wrong now
    del tensors["flat00002"]
    save_file(tensors, str(bad), metadata={"format": "pt"})
    _edit_manifest(ckpt, rehash)
    with pytest.raises(CheckpointError, match=re.escape(f"{bad}: tensor 'flat00002' is missing")):
        hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False)

    with pytest.raises(ValueError, match="dtype must be 'float32', .* got 'int8'"):
        hf_zero.consolidate(ckpt, tmp_path / "hf", dtype="int8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_optimizer_files_are_not_read(checkpoints, tmp_path):
    src, full, _ = checkpoints("gpt2-ws2-stage3")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    for f in (ckpt / "zero").glob("optim-*"):
        f.unlink()
    tensors = _export_tensors(hf_zero.consolidate(ckpt, tmp_path / "hf", progress=False))
    assert torch.equal(tensors["transformer.wte.weight"], full["transformer.wte.weight"])


def test_overwrite_protection(checkpoints, tmp_path):
    ckpt, _, _ = checkpoints("gpt2-ws2-stage3")
    out = tmp_path / "hf"
    out.mkdir()  # an existing empty folder is fine
    hf_zero.consolidate(ckpt, out, progress=False)
    with pytest.raises(FileExistsError, match=r"not empty; pass overwrite=True \(--overwrite\)"):
        hf_zero.consolidate(ckpt, out, progress=False)
    (out / "model.safetensors").write_bytes(b"stale")
    hf_zero.consolidate(ckpt, out, overwrite=True, progress=False)  # an earlier export: replaced
    assert (out / "model.safetensors").read_bytes() != b"stale"
    (out / "stale.bin").write_text("not an export's")
    with pytest.raises(FileExistsError, match="entries an export does not write: 'stale.bin'"):
        hf_zero.consolidate(ckpt, out, overwrite=True, progress=False)
    assert (out / "stale.bin").read_text() == "not an export's"
    with pytest.raises(ValueError, match="would replace the checkpoint"):
        hf_zero.consolidate(ckpt, ckpt.parent, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="is inside the checkpoint"):
        hf_zero.consolidate(ckpt, ckpt / "zero", overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# ---- command line -----------------------------------------------------------------------------


def test_cli_consolidate(checkpoints, tmp_path, capsys):
    ckpt, full, _ = checkpoints("bert-ws3-stage3")
    out = tmp_path / "hf"
    args = ["consolidate", str(ckpt), str(out), "--dtype", "float16", "--max-shard-size", "30KB"]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    tensors = _export_tensors(out)
    assert (out / "model.safetensors.index.json").is_file()
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert torch.equal(tensors["classifier.weight"], full["classifier.weight"].half())
    assert main(args) == 1
    assert "not empty; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_cli_inspect(checkpoints, tmp_path, capsys):
    src, full, _ = checkpoints("gpt2-ws2-stage3")
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    distinct = make_model("gpt2").num_parameters()
    assert "version 1, ZeRO stage 3, world size 2, mixed precision no" in out
    assert re.search(r"^step\s+2$", out, flags=re.M)
    assert f"GPT2LMHeadModel: {distinct:,} parameters ({distinct:,} trainable)" in out
    assert "torch.optim.adamw.AdamW" in out and "lr=0.01" in out and "weight_decay=0.1" in out
    assert len(re.findall(r"^  OK  \S+-rank0000[01]-of-00002.safetensors", out, flags=re.M)) == 6
    assert "all 6 files match the manifest" in out

    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    _flip_byte(ckpt / "zero" / "params-rank00001-of-00002.safetensors")
    assert main(["inspect", str(ckpt)]) == 1
    captured = capsys.readouterr()
    assert re.search(r"^  BAD params-rank00001-of-00002.safetensors", captured.out, flags=re.M)
    assert "does not match the manifest's" in captured.out and "(corrupted)" in captured.out
    assert len(re.findall(r"^  OK ", captured.out, flags=re.M)) == 5
    assert "1 of 6 files failed verification: params-rank00001-of-00002" in captured.err

    (ckpt / "zero" / "optim-rank00000-of-00002.safetensors").unlink()
    (ckpt / "zero" / "notes.txt").write_text("not ours")
    assert main(["inspect", str(ckpt)]) == 1
    captured = capsys.readouterr()
    assert "file optim-rank00000-of-00002.safetensors is missing" in captured.out
    assert re.search(r"^  \?   notes.txt +not listed in the manifest", captured.out, flags=re.M)
    assert "2 of 6 files failed verification" in captured.err

    assert main(["inspect", str(tmp_path)]) == 1
    assert "no manifest" in capsys.readouterr().err
