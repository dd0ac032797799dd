"""Distillation from a full-precision teacher (signgrad.distill, ``--teacher``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from signgrad import distill, hooks, models


def test_kl_loss_is_the_kl_divergence_of_the_softmaxes():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 3
    for temp in (1.0, 2.5):
        p_t, p_s = (t / temp).softmax(1).double(), (s / temp).softmax(1).double()
        want = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        assert distill.kl_loss(s, t, temp).item() == pytest.approx(want.item(), rel=1e-5)
    assert distill.kl_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert distill.kl_loss(s, t).item() > 0


def test_teacher_sees_its_own_normalisation_and_no_gradients():
    torch.manual_seed(0)
    net = models.get("convnet", num_classes=3, in_channels=3)
    own = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    student = ([0.45, 0.45, 0.45], [0.25, 0.25, 0.25])
    teacher = distill.Teacher(net, own, student)
    pixels = torch.rand(4, 3, 12, 12)
    as_student = (pixels - torch.tensor(student[0]).view(1, 3, 1, 1)) / torch.tensor(
        student[1]
    ).view(1, 3, 1, 1)
    as_teacher = (pixels - torch.tensor(own[0]).view(1, 3, 1, 1)) / torch.tensor(own[1]).view(
        1, 3, 1, 1
    )
    teacher.train()  # stays in eval mode: its batch norm uses the running statistics
    assert not teacher.model.training
    out = teacher(as_student)
    torch.testing.assert_close(out, net.eval()(as_teacher), rtol=1e-5, atol=1e-5)
    assert not out.requires_grad and all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(("weight", "temp"), [(1.0, 1.0), (0.25, 3.0)])
def test_the_hook_mixes_cross_entropy_and_kl(weight, temp):
    torch.manual_seed(0)
    teacher = distill.Teacher(nn.Linear(4, 3), ([0.0] * 4, [1.0] * 4), ([0.0] * 4, [1.0] * 4))
    hook = distill.DistillationLoss(teacher, weight, temp)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    student = nn.Linear(4, 3)
    logits = student(x)
    ce = nn.functional.cross_entropy(logits, y)
    step = hooks.Step(0, 0, 1, 1e-3, x, y, logits=logits, loss=ce, train_loss=ce.detach())
    hook.begin_epoch(0)
    hook.before_backward(step)
    kl = distill.kl_loss(logits, teacher(x), temp)
    want = (1 - weight) * ce + weight * temp**2 * kl
    assert step.loss.item() == pytest.approx(want.item(), rel=1e-6)
    step.loss.backward()
    assert student.weight.grad.abs().sum() > 0
    record: dict = {}
    hook.end_epoch(record)
    assert record["distill_kl"] == pytest.approx(kl.item(), rel=1e-6)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_training_with_a_teacher(pictures, tmp_path, run_cli, run_child, one_line_error):
    folder = ["--data", f"imagefolder:{pictures}", "--batch-size", "8", "--no-progress"]
    teacher = tmp_path / "teacher"
    assert run_cli("train", "--model", "convnet", "--quantizer", "none", "--epochs", "3",
                   *folder, "--out", teacher) == 0  # fmt: skip
    student = ["--model", "convnet", "--quantizer", "bnn", "--epochs", "2", *folder,
               "--teacher", teacher, "--distill-weight", "0.5"]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("train", *student, "--out", whole) == 0
    assert run_cli("train", *student, "--out", split, "--stop-after", "1") == 0
    assert run_cli("train", *student, "--out", split, "--resume") == 0
    rows = _metrics(whole)
    assert rows == _metrics(split) and len(rows) == 2
    assert all(r["distill_kl"] > 0 for r in rows)
    plain = tmp_path / "plain"
    assert run_cli("train", *student[:-4], "--out", plain) == 0
    assert "distill_kl" not in _metrics(plain)[0]
    assert _metrics(plain)[0]["train_loss"] != rows[0]["train_loss"]  # the term changed it

    proc = run_child("train", "--model", "convnet", "--data", "fashion-mnist", "--epochs",
                     "1", "--teacher", str(teacher), "--out", str(tmp_path / "x"))  # fmt: skip
    one_line_error(proc, "was trained on other classes")
    proc = run_child("train", *[str(a) for a in student], "--distill-weight", "0",
                     "--out", str(tmp_path / "y"))  # fmt: skip
    one_line_error(proc, "distill_weight must be in (0, 1]")
