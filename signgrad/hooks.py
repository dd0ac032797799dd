"""The step protocol: what plugs into the training loop of :mod:`signgrad.train`.

The loop itself only sets the learning rate, runs forward, backward and the optimizer;
everything a configuration adds to a step is a :class:`StepHook`, called at fixed
points. One training step, in this order::

    lr = learning_rate(...); every param group's "lr" = lr
    hook.before_forward(step)       # each hook, in list order; may replace step.x
    logits = model(step.x); loss = cross_entropy(logits, y)
    optimizer.zero_grad()           # at the first batch of each accumulated step
    hook.before_backward(step)      # may replace step.loss (what backward runs on)
    scaler.scale(step.loss).backward()   # DDP averages the gradients over the ranks here
    scaler.unscale_(optimizer)      # if step.update (fp16 only; a no-op otherwise)
    hook.after_backward(step)       # gradients are in .grad; may change them
    scaler.step(optimizer)          # if step.update: the last batch of an accumulated step
    hook.after_step(step)           # the weights are updated (if step.update)

and per epoch ``hook.begin_epoch(epoch)`` before its first step and
``hook.end_epoch(record)`` on its metrics record (a hook may add fields to it). The
recorded training loss is the cross-entropy the loop computed, whatever ``step.loss``
became. :func:`for_config` builds the hooks of a configuration in the order that keeps
today's results bit for bit: per-step sharpness, channels_last input, distillation, the
learned estimator, gradient clipping, the quantizers' post-step (ProxQuant's prox step),
diagnostics.

What the loop itself owns, not a hook: data-parallel training (the DDP wrapper reduces
the gradients during ``backward``; between the batches of an accumulated step it does
not), and fp16 loss scaling (``scaler``; with it the learned estimator's hook divides the
gradients it reads by the scale, and a step whose gradients overflowed is skipped by the
scaler's ``step``). A distillation teacher runs its model in ``before_forward`` and adds
its term to ``step.loss`` in ``before_backward``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from signgrad import diagnostics, distributed, estimators, layers
from signgrad.config import Config
from signgrad.errors import SigngradError


@dataclass
class Step:
    """One training step as the hooks see it."""

    epoch: int  # 0-based
    index: int  # the step within the epoch, 0-based
    steps: int  # steps per epoch
    lr: float  # the learning rate of this step (already set on the optimizer)
    x: torch.Tensor  # the input batch; before_forward may replace it
    y: torch.Tensor
    logits: torch.Tensor | None = None  # set after the forward pass
    loss: torch.Tensor | None = None  # what backward runs on; before_backward may replace it
    train_loss: torch.Tensor | None = None  # the cross-entropy itself, whatever loss becomes
    update: bool = True  # whether the optimizer steps after this batch (see ``accumulate``)


class StepHook:
    """A per-step extension of the training loop; every method does nothing unless
    overridden. See the module's docstring for when each is called."""

    def begin_epoch(self, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def before_forward(self, step: Step) -> None:
        """After the learning rate is set, before ``model(step.x)``."""

    def before_backward(self, step: Step) -> None:
        """After ``optimizer.zero_grad()``, before ``step.loss.backward()``."""

    def after_backward(self, step: Step) -> None:
        """After the backward pass, before ``optimizer.step()``."""

    def after_step(self, step: Step) -> None:
        """After ``optimizer.step()``."""

    def end_epoch(self, record: dict[str, Any]) -> None:
        """On the metrics record of the epoch just trained, before it is saved."""


class PerStepSharpness(StepHook):
    """Move the quantizers' sharpness schedules every step (``sharpness_per_step``), not
    only at the epoch's start (which the loop does for every run)."""

    def __init__(self, model: nn.Module, total_epochs: int) -> None:
        self.model, self.total_epochs = model, total_epochs

    def before_forward(self, step: Step) -> None:
        if step.index > 0:  # step 0 is the epoch's start: already set
            layers.set_epoch(self.model, step.epoch + step.index / step.steps, self.total_epochs)


class ChannelsLastInput(StepHook):
    """Give the model its input in channels_last memory format (``channels_last``)."""

    def before_forward(self, step: Step) -> None:
        step.x = step.x.contiguous(memory_format=torch.channels_last)


class LearnedEstimatorStep(StepHook):
    """A learned gradient estimator's step (:mod:`signgrad.estimators`): look-ahead
    weights before the forward pass (the loss depends on its parameters), its gradients
    cleared with the model's, and the learned gradient handed to the optimizer after the
    backward pass. Records ``fallback_steps``: the steps of the epoch in which some
    layer's learned gradient was not finite (the straight-through one was used)."""

    def __init__(
        self,
        estimator: estimators.LearnedEstimator,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.estimator = estimator
        self.scaler = scaler  # fp16: the gradients it sees are those of the scaled loss
        self.fallback_steps = 0

    def begin_epoch(self, epoch: int) -> None:
        self.fallback_steps = 0

    def before_forward(self, step: Step) -> None:
        self.estimator.begin_step(step.lr)

    def before_backward(self, step: Step) -> None:
        self.estimator.zero_grad()

    def after_backward(self, step: Step) -> None:
        scale = 1.0
        if self.scaler is not None and self.scaler.is_enabled():
            scale = float(self.scaler.get_scale())
        self.fallback_steps += self.estimator.end_step(grad_scale=scale) > 0

    def end_epoch(self, record: dict[str, Any]) -> None:
        record["fallback_steps"] = self.fallback_steps


class GradClip(StepHook):
    """Clip the gradient norm of the model's parameters (``grad_clip``)."""

    def __init__(self, model: nn.Module, max_norm: float) -> None:
        self.model, self.max_norm = model, max_norm

    def after_backward(self, step: Step) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)


class QuantizerPostStep(StepHook):
    """Every binary layer's post-step on the updated weights (ProxQuant's prox step; a
    no-op for the other quantizers)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def after_step(self, step: Step) -> None:
        if step.update:  # (not between the batches of an accumulated step)
            layers.post_step(self.model, step.lr)


class GradientDiagnostics(StepHook):
    """Record, every step and for every binarized layer, how the applied gradient compares
    with the straight-through one (``diagnostics``; what is recorded:
    :mod:`signgrad.diagnostics`). Last in the list: it reads the gradient the optimizer
    will apply, after the estimator and clipping, and the weights after every update.
    It changes nothing: a run with it computes exactly what a run without it does."""

    def __init__(
        self,
        model: nn.Module,
        estimator: estimators.LearnedEstimator | None,
        run_dir: str | os.PathLike,
        first_step: int,
    ) -> None:
        self.estimator = estimator
        if estimator is not None:
            named = list(zip(estimator.layer_names, estimator.layers, strict=True))
        else:
            named = [(n, m) for n, m in layers.binary_layers(model)
                     if m.weight_quantizer.precision < 32]  # fmt: skip
        if any(m.generated_kernel for _, m in named):
            raise SigngradError("--diagnostics does not support hyper layers yet")
        self.layers = [m for _, m in named]
        self.writer = diagnostics.Writer(run_dir, [n for n, _ in named], first_step)
        self._signs: list[torch.Tensor] = []
        self._values: torch.Tensor | None = None

    def after_backward(self, step: Step) -> None:
        est = self.estimator
        rows = []
        for i, layer in enumerate(self.layers):
            w = layer.weight
            applied = w.grad
            if applied is None:
                rows.append(torch.full((4,), math.nan, device=w.device))
                continue
            applied = applied.detach().flatten().float()
            if est is None:
                ste = applied
            else:  # the natural gradient of this batch, as plain STE would apply it
                ste = est.calibrate(i, est.histories[i].latest()).flatten().float()
            rms = applied.pow(2).mean().sqrt()
            rows.append(
                torch.stack(
                    [
                        F.cosine_similarity(applied, ste, dim=0),
                        applied.norm() / ste.norm(),
                        applied.mean().abs() / rms,
                        torch.zeros((), device=w.device),  # flips, after the step
                    ]
                )
            )
        self._values = torch.stack(rows)
        self._signs = [layer.weight.detach() >= 0 for layer in self.layers]

    def after_step(self, step: Step) -> None:
        assert self._values is not None
        flips = [
            ((layer.weight.detach() >= 0) != before).float().mean()
            for layer, before in zip(self.layers, self._signs, strict=True)
        ]
        values = self._values
        values[:, 3] = torch.where(torch.isnan(values[:, 0]), math.nan, torch.stack(flips))
        table = values.cpu().tolist()  # one device synchronisation per step
        record: dict[str, Any] = {
            "step": step.epoch * step.steps + step.index,
            "loss": float(step.train_loss) if step.train_loss is not None else None,
            "fallbacks": 0 if self.estimator is None else self.estimator.last_fallbacks,
        }
        for k, key in enumerate(diagnostics.SERIES):
            record[key] = [None if math.isnan(row[k]) else row[k] for row in table]
        self.writer.add(record)
        self._signs, self._values = [], None

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.writer.flush()


def for_config(
    cfg: Config,
    model: nn.Module,
    estimator: estimators.LearnedEstimator | None,
    run_dir: str | os.PathLike | None = None,
    first_step: int = 0,
    distillation: StepHook | None = None,
    *,
    ctx: distributed.Context | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> list[StepHook]:
    """The hooks of a run of ``cfg``, in the order they are called (``run_dir`` and the
    run's ``first_step``: where and from when ``diagnostics`` records; ``distillation``:
    the ``--teacher``'s :class:`signgrad.distill.DistillationLoss`, whose loss term comes
    before anything reads the loss; ``ctx``: with several ranks, only rank 0 records
    diagnostics, from gradients that are already the global batch's; ``scaler``: fp16's
    loss scaling, which the estimator undoes on the gradients it reads)."""
    hooks: list[StepHook] = []
    if cfg.sharpness_per_step:
        hooks.append(PerStepSharpness(model, cfg.epochs))
    if cfg.channels_last:
        hooks.append(ChannelsLastInput())
    if distillation is not None:
        hooks.append(distillation)
    if estimator is not None:
        hooks.append(LearnedEstimatorStep(estimator, scaler))
    if cfg.grad_clip is not None:
        hooks.append(GradClip(model, cfg.grad_clip))
    hooks.append(QuantizerPostStep(model))
    if cfg.diagnostics and (ctx is None or ctx.is_main):
        if run_dir is None:
            raise SigngradError("diagnostics need the run directory to write to")
        hooks.append(GradientDiagnostics(model, estimator, run_dir, first_step))
    return hooks
