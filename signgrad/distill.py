"""Distillation from a full-precision teacher (``--teacher RUN``): ReActNet's
distributional loss.

The teacher is a trained signgrad run (or its ``checkpoint.pt``) for the same classes
and input shape. It runs in eval mode without gradients on every training batch, on the
input the student sees, renormalised to the teacher's own mean/std when they differ.
The student's loss becomes

    (1 - w) * CE(z_s, y) + w * T**2 * KL(softmax(z_t / T) || softmax(z_s / T))

with ``w`` = ``--distill-weight`` and ``T`` = ``--distill-temperature``. ReActNet's
loss is ``w = 1, T = 1``: the KL divergence alone (the defaults). ``T**2`` keeps the
gradient's size independent of ``T`` (Hinton et al. 2015). The epoch's mean KL term is
recorded as ``distill_kl`` in ``metrics.jsonl``; ``train_loss`` stays the cross-entropy.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from signgrad import builders
from signgrad.config import check_distillation
from signgrad.errors import SigngradError
from signgrad.hooks import Step, StepHook

__all__ = ["DistillationLoss", "Teacher", "kl_loss", "load_teacher"]


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch, in
    float32 whatever the logits' dtype."""
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    s = F.log_softmax(student.float() / temperature, dim=1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


class Teacher(nn.Module):
    """A frozen model whose inputs are renormalised from the student's normalisation
    (``mean``/``std`` of the batches) to its own."""

    def __init__(
        self,
        model: nn.Module,
        own: tuple[list[float], list[float]],
        student: tuple[list[float], list[float]],
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        shape = (1, -1, 1, 1)
        # x_teacher = (x * std_s + mean_s - mean_t) / std_t = x * scale + shift
        mean_s, std_s = (torch.tensor(v, dtype=torch.float32).view(shape) for v in student)
        mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(shape) for v in own)
        self.register_buffer("scale", std_s / std_t)
        self.register_buffer("shift", (mean_s - mean_t) / std_t)
        self.same = bool(torch.equal(mean_s, mean_t) and torch.equal(std_s, std_t))

    def train(self, mode: bool = True) -> Teacher:  # the teacher always evaluates
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.same:
            x = x * self.scale + self.shift
        return self.model(x)


def load_teacher(
    path: str | os.PathLike,
    *,
    classes: list[str],
    shape: tuple[int, int, int],
    mean: Any,
    std: Any,
    device: torch.device,
) -> Teacher:
    """The teacher of the checkpoint or run directory ``path``, checked against the
    student's classes and input ``shape`` (C, H, W); ``mean``/``std``: the student's
    normalisation."""
    if not os.path.exists(path):
        raise SigngradError(f"--teacher {path}: no such run directory or checkpoint")
    t = builders.load_trained(path, device=str(device), with_data=False)
    d = t.deploy
    if list(d["classes"]) != list(classes):
        raise SigngradError(
            f"--teacher {path} was trained on other classes ({len(d['classes'])}: "
            f"{', '.join(d['classes'][:3])}, ...) than this run's ({len(classes)}: "
            f"{', '.join(classes[:3])}, ...)"
        )
    if (d["in_channels"], d["height"], d["width"]) != tuple(shape):
        raise SigngradError(
            f"--teacher {path} takes {d['in_channels']}x{d['height']}x{d['width']} inputs, "
            f"this run's are {'x'.join(str(s) for s in shape)}"
        )
    teacher = Teacher(t.model, (d["mean"], d["std"]), (list(mean), list(std)))
    return teacher.to(device)


class DistillationLoss(StepHook):
    """Replaces the step's loss by the distillation loss (module docstring) and records
    the epoch's mean KL term as ``distill_kl``."""

    def __init__(self, teacher: Teacher, weight: float = 1.0, temperature: float = 1.0) -> None:
        check_distillation(weight, temperature)
        self.teacher, self.weight, self.temperature = teacher, weight, temperature
        self.kl_sum: torch.Tensor | None = None
        self.seen = 0

    def begin_epoch(self, epoch: int) -> None:
        self.kl_sum, self.seen = None, 0

    def before_backward(self, step: Step) -> None:
        assert step.logits is not None and step.loss is not None
        kl = kl_loss(step.logits, self.teacher(step.x), self.temperature)
        w, t2 = self.weight, self.temperature**2
        step.loss = (1 - w) * step.loss + w * t2 * kl if w < 1 else t2 * kl
        n = len(step.y)
        part = kl.detach() * n
        self.kl_sum = part if self.kl_sum is None else self.kl_sum + part
        self.seen += n

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self.seen and self.kl_sum is not None:
            record["distill_kl"] = self.kl_sum.item() / self.seen
