"""The training loop: one configuration in, one run directory out.

The package's training code, one job per module:

- :mod:`signgrad.config`: :class:`Config` (what ``config.json`` holds), its checks,
  recipes, the check of a saved configuration and what may change on resume;
- :mod:`signgrad.builders`: device, model, optimizer, learned estimator, the memory check,
  loading a checkpoint into them, and a trained model rebuilt from its checkpoint;
- :mod:`signgrad.rundir`: the run directory: its lock, how a run starts or resumes there;
- :mod:`signgrad.hooks`: the step protocol, through which a configuration's extras
  (learned estimator, per-step sharpness, gradient clipping, ProxQuant's prox step,
  channels_last input) plug into the loop;
- this module: the loop itself, the learning rate schedule and the evaluation.

Read :func:`train` top to bottom: resolve and check the configuration, take the run
directory, build data / model / optimizer / hooks, restore a checkpoint on resume, then
per epoch: advance the quantizers' schedules, train (:func:`train_epoch`), evaluate,
write an atomic checkpoint and the metrics. A run directory holds ``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` and ``curves.png``; ``resume`` continues it exactly
where it stopped.

The names that lived here before the split (``train.Config``, ``train.load_trained``,
``train.build_architecture``, ``train.resume_config``, ...) are still importable from
this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from signgrad import (
    checkpoint,
    data,
    distill,
    distributed,
    estimators,
    folders,
    hooks,
    layers,
    optim,
    report,
    rundir,
)
from signgrad.builders import (
    Trained,
    build_architecture,
    build_estimator,
    build_model,
    check_sizes,
    cpu_has_fast_bf16,
    load_data,
    load_trained,
    make_optimizer,
    pick_device,
    restore,
)
from signgrad.config import (
    DEFAULT_LR,
    HYPER_PREFIX,
    LR_SCHEDULES,
    OPTIMIZERS,
    RECIPES,
    SAVED_REQUIRED,
    Config,
    check_resume_epochs,
    check_saved_config,
    check_stop_after,
    with_recipe,
)
from signgrad.errors import SigngradError
from signgrad.rundir import resume_config

__all__ = [
    # the loop
    "train", "train_epoch", "learning_rate", "evaluate", "test_loader",
    # re-exported from signgrad.config, signgrad.builders and signgrad.rundir
    "Config", "OPTIMIZERS", "LR_SCHEDULES", "DEFAULT_LR", "HYPER_PREFIX", "RECIPES",
    "SAVED_REQUIRED", "with_recipe", "check_saved_config", "check_resume_epochs",
    "check_stop_after", "resume_config", "pick_device", "build_model", "build_architecture",
    "build_estimator", "make_optimizer", "check_sizes", "restore", "Trained", "load_trained",
]  # fmt: skip

log = logging.getLogger("signgrad.train")


def train(
    cfg: Config, *, resume: bool = False, stop_after: int | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Train as ``cfg`` says; return the per-epoch metrics of the whole run.

    ``stop_after`` ends this call after that many finished epochs (counting the resumed
    ones) while keeping the schedules of ``cfg.epochs``, so a run can be split into
    pieces that together equal one uninterrupted run.
    """
    cfg = cfg.resolved()
    check_sizes(cfg)  # before any data is read or memory taken
    check_stop_after(stop_after)
    ctx = distributed.from_environment()  # torchrun's ranks, or a single process
    device = ctx.device(pick_device(cfg.device))
    if ctx.enabled:
        distributed.check_shard((ctx.rank, ctx.world_size), cfg.batch_size, train=True)
    created = distributed.setup(ctx, device)
    try:
        run_dir, lock = _prepare(cfg, resume, ctx)
        with lock:  # one writer per run directory, released however the run ends
            return _train_locked(
                cfg, run_dir, resume, stop_after, progress and ctx.is_main, ctx, device
            )
    finally:
        distributed.teardown(created)


def _prepare(
    cfg: Config, resume: bool, ctx: distributed.Context
) -> tuple[Path, rundir.RunLock | contextlib.nullcontext]:
    """The run directory and its lock (:func:`signgrad.rundir.prepare`), taken by rank 0
    only; the other ranks learn its name, or its error, from rank 0."""
    if not ctx.is_main:
        name = distributed.broadcast_outcome(ctx)
        cfg.out = name
        return Path(name), contextlib.nullcontext()
    try:
        run_dir, lock = rundir.prepare(cfg, resume)
    except SigngradError as e:
        distributed.broadcast_outcome(ctx, error=str(e))  # raises it on every rank
        raise
    distributed.broadcast_outcome(ctx, str(run_dir))
    return run_dir, lock


def _train_locked(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    stop_after: int | None,
    progress: bool,
    ctx: distributed.Context,
    device: torch.device,
) -> list[dict[str, Any]]:
    """The body of :func:`train`, run holding the lock of ``run_dir`` (rank 0's)."""
    main = ctx.is_main
    state = None
    if resume:
        # Read under the lock: no other writer can replace it from here on. Every rank
        # reads it (a run directory on a file system that every machine sees).
        state = checkpoint.load(run_dir)
        check_resume_epochs(run_dir, state["epoch"], cfg.epochs)
    _warn_if_slow_bf16(cfg, device)
    ds = load_data(cfg)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds).to(device)
    if cfg.sync_bn and ctx.enabled:
        model = distributed.convert_sync_batchnorm(model, device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    estimator = build_estimator(cfg, model, state)  # a resumed run: its saved settings
    if estimator is not None and ctx.enabled:
        estimator.reduce_gradients = functools.partial(distributed.all_reduce_mean_, ctx)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader, test_loader = _loaders(cfg, ds, device, generator, ctx)
    # fp16's loss scaling; disabled (every call passes through) without --fp16.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.fp16)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    if state is not None:
        restore(
            state,
            run_dir / checkpoint.CHECKPOINT_NAME,
            model,
            optimizer,
            estimator,
            generator,
            global_rng=True,
            scaler=scaler,
        )
        history, start_epoch = list(state["history"]), state["epoch"]
        if start_epoch >= end_epoch:  # nothing to train: every file stays as it is
            log.info("%s has done %d epochs; nothing to train", run_dir, start_epoch)
            return history
        if main:
            _continue_metrics(cfg, run_dir, history)
    # The forward pass goes through DistributedDataParallel (gradients averaged over the
    # ranks during backward); everything else (hooks, checkpoints) sees the model itself.
    net = distributed.wrap(model, ctx, device)
    if cfg.compile:
        net = torch.compile(net)  # after DDP, as PyTorch advises: it sees the buckets
    if ctx.enabled:
        log.info("data-parallel over %d ranks: %d images per rank and step",
                 ctx.world_size, cfg.batch_size // ctx.world_size)  # fmt: skip
    first_step = start_epoch * len(train_loader)
    distillation = None
    if cfg.teacher is not None:
        teacher = distill.load_teacher(
            cfg.teacher, classes=ds.classes, shape=(ds.in_channels, *ds.image_size),
            mean=ds.mean, std=ds.std, device=device,
        )  # fmt: skip
        distillation = distill.DistillationLoss(
            teacher, cfg.distill_weight, cfg.distill_temperature
        )
    step_hooks = hooks.for_config(cfg, model, estimator, run_dir, first_step, distillation, ctx=ctx)
    config_dict = dataclasses.asdict(cfg)
    crop = getattr(ds, "crop", None)  # streamed ImageNet-sized folders: the centre crop
    deploy = checkpoint.deploy_entry(
        ds.classes, (ds.in_channels, *ds.image_size), ds.mean, ds.std, crop
    )
    if main:
        checkpoint.write_json(run_dir / checkpoint.CONFIG_NAME, config_dict)

    for epoch in range(start_epoch, end_epoch):
        sharpness = layers.set_epoch(model, epoch, cfg.epochs)
        t0 = time.perf_counter()
        skipped = getattr(train_loader, "skipped", 0) + getattr(test_loader, "skipped", 0)
        train_loss, train_acc, lr = train_epoch(
            cfg, net, optimizer, train_loader, step_hooks, epoch, progress=progress, ctx=ctx,
            scaler=scaler,
        )  # fmt: skip
        if not math.isfinite(train_loss):
            raise SigngradError(
                f"the training loss became {train_loss} in epoch {epoch + 1}; the last good "
                f"checkpoint in {run_dir} is kept (try a lower --lr)"
            )
        distributed.broadcast_buffers(ctx, model)  # one set of running statistics
        test_loss, test_acc = evaluate(
            model, test_loader, bf16=cfg.bf16, fp16=cfg.fp16, channels_last=cfg.channels_last,
            ctx=ctx,
        )  # fmt: skip
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "time_s": time.perf_counter() - t0,
            "lr": lr,
            "sharpness": sharpness,
        }
        if cfg.skip_bad_images:  # unreadable images left out in this epoch
            now = getattr(train_loader, "skipped", 0) + getattr(test_loader, "skipped", 0)
            record["skipped_images"] = int(
                distributed.all_reduce_sum(ctx, torch.tensor(now - skipped, device=device)).item()
            )
        for hook in step_hooks:
            hook.end_epoch(record)  # e.g. the estimator's fallback_steps
        history.append(record)
        ckpt = _checkpoint_state(
            config_dict, history, model, optimizer, estimator, generator, deploy
        )
        if cfg.fp16:
            ckpt["scaler"] = scaler.state_dict()
        if ctx.enabled:  # the proof that no rank drifted: before anything is written
            digest = distributed.state_digest(
                ckpt["model"], ckpt["optimizer"], ckpt["estimator"], ckpt["rng"]
            )
            distributed.check_identical(ctx, digest, "model, optimizer and estimator states")
            log.info("the %d ranks' states agree (sha256 %s)", ctx.world_size, digest)
        if main:
            checkpoint.save(run_dir / checkpoint.CHECKPOINT_NAME, ckpt)
            _append_metrics(run_dir, record)
            _log_epoch(cfg, record)
        ctx.barrier()  # no rank runs ahead of a checkpoint that may yet fail to be written
    if history and main:
        report.plot_run(run_dir)
    return history


def train_epoch(
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: data.Loader,
    step_hooks: list[hooks.StepHook],
    epoch: int,
    *,
    progress: bool = True,
    ctx: distributed.Context | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, float, float]:
    """Train ``model`` for one epoch (0-based ``epoch``); return (mean training loss,
    training accuracy, the last step's learning rate). The order of one step and where
    the hooks are called: :mod:`signgrad.hooks`. With several ranks (``ctx``), ``model``
    is the DistributedDataParallel wrapper, ``loader`` serves this rank's shard, and the
    figures returned are those of the whole global batch. ``scaler``: fp16's loss
    scaling (the gradients are unscaled before the hooks' ``after_backward``)."""
    ctx = ctx or distributed.Context()
    model.train()
    for hook in step_hooks:
        hook.begin_epoch(epoch)
    device = next(model.parameters()).device
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    steps = len(loader)
    lr = float("nan")
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    )
    for i, (x, y) in enumerate(bar):
        lr = learning_rate(cfg, epoch * steps + i, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # With accumulate N: the gradients of N batches add up, then one optimizer step.
        first, update = i % cfg.accumulate == 0, (i + 1) % cfg.accumulate == 0 or i == steps - 1
        step = hooks.Step(epoch, i, steps, lr, x, y, update=update)
        # Between the batches of an accumulated step the ranks need not exchange gradients:
        # they add up locally and the update batch's backward pass averages the sums.
        with _no_sync(model, not update):
            for hook in step_hooks:
                hook.before_forward(step)
            with _autocast(device, cfg.bf16, cfg.fp16):
                logits = model(step.x)
            loss = F.cross_entropy(logits.float(), y)
            step.logits, step.loss, step.train_loss = logits, loss, loss.detach()
            if ctx.enabled and cfg.diagnostics:  # the per-step record holds the global loss
                step.train_loss = distributed.all_reduce_sum(ctx, loss.detach()) / ctx.world_size
            if first:
                optimizer.zero_grad(set_to_none=True)
            for hook in step_hooks:
                hook.before_backward(step)
            scaler.scale(step.loss).backward()
        if update:
            scaler.unscale_(optimizer)  # clipping and the hooks see the true gradients
        for hook in step_hooks:
            hook.after_backward(step)
        if update:
            scaler.step(optimizer)  # skipped (and the scale lowered) on fp16 overflow
            scaler.update()
        for hook in step_hooks:
            hook.after_step(step)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress and i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    loss, acc = _means_over_ranks(ctx, loss_sum, correct, seen)
    return loss, acc, lr


def _loaders(
    cfg: Config,
    ds: Any,
    device: torch.device,
    generator: torch.Generator,
    ctx: distributed.Context,
) -> tuple[Any, Any]:
    """The shuffled training batches (drawn with ``generator``) and the test batches,
    this rank's shard of each."""
    shard = (ctx.rank, ctx.world_size)
    if isinstance(ds, folders.StreamSet):
        train_loader: Any = folders.StreamLoader(
            ds, split="train", batch_size=cfg.batch_size, train=True, device=device,
            generator=generator, drop_last=True, shard=shard,
        )  # fmt: skip
        n = len(ds.folder.train)
    else:
        train_loader = data.Loader(
            ds.train_images, ds.train_labels, batch_size=cfg.batch_size, mean=ds.mean,
            std=ds.std, train=True, augment=ds.augment, device=device, generator=generator,
            drop_last=True, shard=shard,
        )  # fmt: skip
        n = len(ds.train_labels)
    if len(train_loader) == 0:
        raise SigngradError(f"batch size {cfg.batch_size} exceeds the {n} training images")
    return train_loader, test_loader(ds, device, shard=shard)


def test_loader(
    ds: Any, device: torch.device, batch_size: int = 500, shard: tuple[int, int] = (0, 1)
) -> Any:
    """The evaluation batches of ``ds`` (a DataSet or a streamed image folder), in order
    (``shard``: one rank's part of each)."""
    if isinstance(ds, folders.StreamSet):
        return folders.StreamLoader(
            ds, split="test", batch_size=min(batch_size, 128), train=False, device=device,
            shard=shard,
        )  # fmt: skip
    return data.Loader(
        ds.test_images, ds.test_labels, batch_size=batch_size, mean=ds.mean, std=ds.std,
        train=False, augment=False, device=device, shard=shard,
    )  # fmt: skip


def _warn_if_slow_bf16(cfg: Config, device: torch.device) -> None:
    if cfg.bf16 and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning(
            "--bf16 on a CPU without AVX-512 BF16 or AMX emulates bf16 and is many times "
            "slower than fp32 (see benchmarks/train_step.py)"
        )


def _continue_metrics(cfg: Config, run_dir: Path, history: list[dict[str, Any]]) -> None:
    """On resume: metrics.jsonl may hold a line written after the last checkpoint; the
    checkpoint wins. (config.json keeps its epochs until training goes on.)"""
    checkpoint.write_jsonl(run_dir / checkpoint.METRICS_NAME, history)
    log.info("resuming %s at epoch %d of %d", run_dir, len(history), cfg.epochs)


def _checkpoint_state(
    config_dict: dict[str, Any],
    history: list[dict[str, Any]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    estimator: estimators.LearnedEstimator | None,
    generator: torch.Generator,
    deploy: dict[str, Any],
) -> dict[str, Any]:
    """What the checkpoint after the last epoch of ``history`` holds (see
    :mod:`signgrad.checkpoint`); ``deploy`` is :func:`signgrad.checkpoint.deploy_entry` of
    the data set trained on."""
    return {
        "config": config_dict,
        "epoch": len(history),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"data": generator.get_state(), "torch": torch.get_rng_state()},
        "history": history,
        "estimator": None if estimator is None else estimator.state_dict(),
        "deploy": deploy,
    }


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    metrics = run_dir / checkpoint.METRICS_NAME
    try:
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise SigngradError(
            f"cannot write {metrics}: {e.strerror or e}; the checkpoint of epoch "
            f"{record['epoch']} is kept (--resume rewrites the metrics from it)"
        ) from None


def _log_epoch(cfg: Config, r: dict[str, Any]) -> None:
    log.info(
        "epoch %d/%d  train loss %.4f  acc %.2f%%  test loss %.4f  acc %.2f%%  "
        "lr %.2e  %.1fs",
        r["epoch"], cfg.epochs, r["train_loss"], 100 * r["train_acc"], r["test_loss"],
        100 * r["test_acc"], r["lr"], r["time_s"],
    )  # fmt: skip


def learning_rate(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate at a global step: a pure function, so resume needs no state."""
    settings = {k: getattr(cfg, k) for k in optim.LR_SCHEDULES.parameters(cfg.schedule)}
    return optim.LR_SCHEDULES.build(
        cfg.schedule, cfg.lr, step, steps_per_epoch, cfg.epochs, **settings
    )


def _autocast(device: torch.device, bf16: bool, fp16: bool = False) -> torch.autocast:
    """The run's autocast: bf16, fp16 or none."""
    dtype = torch.float16 if fp16 else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=bf16 or fp16)


def _no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DistributedDataParallel's ``no_sync`` when ``skip`` (no gradient exchange in this
    backward pass), else nothing."""
    inner = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
    if skip and isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: data.Loader,
    *,
    bf16: bool = False,
    channels_last: bool = False,
    ctx: distributed.Context | None = None,
    fp16: bool = False,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over ``loader``; with
    several ranks (``ctx``), over the union of their shards."""
    ctx = ctx or distributed.Context()
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, bf16, fp16):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    return _means_over_ranks(ctx, loss_sum, correct, n)


def _means_over_ranks(
    ctx: distributed.Context, loss_sum: torch.Tensor, correct: torch.Tensor, n: int
) -> tuple[float, float]:
    """(mean loss, accuracy) over every rank's images from this rank's sums, in one
    collective (one device synchronisation without ranks)."""
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(float(n))])
    loss_total, correct_total, n_total = distributed.all_reduce_sum(ctx, totals).tolist()
    return loss_total / n_total, correct_total / n_total
