"""Tier 2: the misuse scenarios of the reliability report (scripts/harness/faults.py, section 5),
on 2 gloo ranks at every stage in one job: each does what torch/DDP does or fails on every rank
with an error that names the fix."""

from __future__ import annotations

from scripts.harness import faults


def test_every_misuse_behaves_as_required_at_every_stage():
    records = faults.misuse(stages=(0, 1, 2, 3))
    assert len(records) == len(faults.MISUSES) * 4
    for record in records:
        assert not record.problems, (record.fault, record.stage, record.problems, record.run_error)
        assert record.message, (record.fault, record.stage)
    by = {(r.fault, r.stage): r for r in records}
    clip = by[("misuse: " + faults.MISUSES["torch-clip"], 2)]
    assert clip.message.startswith("torch.nn.utils.clip_grad_norm_ was given the parameters")
    nan = by[("misuse: " + faults.MISUSES["fp16-nan"], 1)]
    assert nan.message.startswith("fp16 loss scale 5.96046e-08 cannot back off further")
    saving = {s: by[("misuse: " + faults.MISUSES["save-pretrained"], s)].message for s in range(4)}
    assert saving[3].startswith("GPT2LMHeadModel.save_pretrained cannot write a stage-3 model")
    assert saving[0] == "the model's own save_pretrained (full parameters)"
