"""The training loop: one configuration in, one run directory out.

Read top to bottom: resolve the configuration, build data / model / optimizer, then per
epoch: advance the quantizers' schedules, train, evaluate, write metrics and an atomic
checkpoint. A run directory holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``
and ``curves.png``; ``resume`` continues it exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from signgrad import (
    __version__,
    checkpoint,
    data,
    estimators,
    hyper,
    layers,
    memory,
    models,
    quantizers,
    report,
    rundir,
)
from signgrad.errors import SigngradError

log = logging.getLogger("signgrad.train")

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("cosine", "step", "constant")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}


@dataclass
class Config:
    """Everything that defines a run (what ``config.json`` holds)."""

    model: str = "resnet20"
    data: str = "cifar10"
    quantizer: str = "bnn"
    input_quantizer: str | None = None
    scaling: str = "none"
    keep: str = "first_last"
    sharpness: str | None = None
    exact_sign_after: int | None = None
    activation: str | None = None  # None: relu, or hardtanh when activations are binary
    hyper: bool = False  # Hyper-BinaryNet layers (signgrad.hyper); a "hyper-" model sets it
    z_dim: int = 9  # hyper layers: embedding size per kernel
    generator: str = "linear"  # hyper layers: linear, mlp-elu, mlp-hardtanh
    sharpness_per_step: bool = False  # move sharpness schedules every step, not per epoch
    input_sharpness: str | None = None  # schedule of the input quantizer's sharpness
    estimator: str | None = None  # a learned gradient estimator (signgrad.estimators)
    estimator_params: list[str] = field(default_factory=list)  # KEY=VALUE
    optimizer: str = "adam"
    lr: float | None = None  # None: 1e-3 for Adam, 0.1 for SGD
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam
    weight_decay: float = 0.0
    grad_clip: float | None = None  # clip the gradient norm of the model to this
    bn_momentum: float | None = None  # None: PyTorch's 0.1
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)  # step schedule; empty: 50%, 75%
    gamma: float = 0.1
    epochs: int = 30
    batch_size: int = 128
    seed: int = 0
    bf16: bool = False
    channels_last: bool = False
    init: str | None = None
    data_root: str | None = None
    download: bool = True
    device: str = "auto"
    out: str | None = None
    recipe: str | None = None  # the preset the values came from, for the record
    version: str = __version__

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resolved(self) -> Config:
        """Fill the defaults that depend on other fields and check every name."""
        c = dataclasses.replace(self)
        if c.optimizer not in OPTIMIZERS:
            raise SigngradError(
                f"unknown optimizer '{c.optimizer}'; valid: {', '.join(OPTIMIZERS)}"
            )
        if c.schedule not in LR_SCHEDULES:
            raise SigngradError(
                f"unknown lr schedule '{c.schedule}'; valid: {', '.join(LR_SCHEDULES)}"
            )
        if c.model.startswith(HYPER_PREFIX):
            c.model, c.hyper = c.model[len(HYPER_PREFIX) :], True
        if c.model not in models.names():
            valid = models.names() + [HYPER_PREFIX + "MODEL"]
            raise SigngradError(f"unknown model '{self.model}'; valid: {', '.join(valid)}")
        if c.hyper:
            # The name only: a generator z_dim wide is built once its memory is checked.
            hyper.make_generator(c.generator, 1, 9)
            if isinstance(c.z_dim, bool) or not isinstance(c.z_dim, int) or c.z_dim < 1:
                raise SigngradError(f"z_dim must be an integer >= 1, got {c.z_dim!r}")
        if c.recipe is not None and c.recipe not in RECIPES:
            raise SigngradError(f"unknown recipe '{c.recipe}'; valid: {', '.join(RECIPES)}")
        if len(c.betas) != 2 or not all(0 <= b < 1 for b in c.betas):
            raise SigngradError(f"betas must be two numbers in [0, 1), got {c.betas}")
        if not 0 <= c.momentum < 1:  # NaN fails too; torch raises on < 0, diverges at >= 1
            raise SigngradError(f"momentum must be a number in [0, 1), got {c.momentum}")
        if c.grad_clip is not None and not (c.grad_clip > 0 and math.isfinite(c.grad_clip)):
            raise SigngradError(f"grad_clip must be positive and finite, got {c.grad_clip}")
        if not (c.gamma > 0 and math.isfinite(c.gamma)):
            # gamma <= 0 makes the learning rate negative or zero: gradient ascent or no step.
            raise SigngradError(f"gamma must be a positive finite number, got {c.gamma}")
        bad = [m for m in c.milestones if isinstance(m, bool) or not isinstance(m, int) or m < 1]
        if bad:
            raise SigngradError(f"milestones must be whole epochs >= 1, got {bad[0]!r}")
        # torch's generators take seeds in [-2**63, 2**64); a negative seed is just a typo.
        if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not 0 <= c.seed < 2**64:
            raise SigngradError(f"seed must be an integer in [0, 2**64), got {c.seed!r}")
        if c.bn_momentum is not None and not 0 < c.bn_momentum <= 1:
            raise SigngradError(f"bn_momentum must be in (0, 1], got {c.bn_momentum}")
        data.check_name(c.data)
        if c.input_quantizer == "none":
            c.input_quantizer = None
        if c.lr is None:
            c.lr = DEFAULT_LR[c.optimizer]
        if c.activation is None:
            c.activation = "hardtanh" if c.input_quantizer else "relu"
        for name, value in [("epochs", c.epochs), ("batch_size", c.batch_size)]:
            if value < 1:
                raise SigngradError(f"{name} must be at least 1, got {value}")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise SigngradError(f"lr must be a positive number, got {c.lr}")
        if not (c.weight_decay >= 0 and math.isfinite(c.weight_decay)):
            raise SigngradError(f"weight_decay must be a finite number >= 0, got {c.weight_decay}")
        # Build the quantizers once so that bad names and parameters fail before any work.
        quantizers.get(c.quantizer, **self.weight_params())
        if c.estimator is not None:
            if c.estimator not in estimators.names():
                raise SigngradError(
                    f"unknown estimator '{c.estimator}'; valid: {', '.join(estimators.names())}"
                )
            if c.quantizer == "none":
                raise SigngradError("a learned estimator needs binarized weights (--quantizer)")
            estimators.parse_params(c.estimator_params, c.estimator)
        elif c.estimator_params:
            raise SigngradError("--estimator-param given without --estimator")
        if c.input_quantizer and not quantizers.get(c.input_quantizer).for_activations:
            raise SigngradError(
                f"quantizer '{c.input_quantizer}' works on weights only, not on activations"
            )
        if c.input_sharpness is not None:
            if not c.input_quantizer:
                raise SigngradError("--input-sharpness given without --input-quantizer")
            quantizers.get(c.input_quantizer, **c.input_params())
        _check_sizes(c)
        return c

    def input_params(self) -> dict[str, Any]:
        return {} if self.input_sharpness is None else {"sharpness": self.input_sharpness}

    def weight_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.sharpness is not None:
            params["sharpness"] = self.sharpness
        if self.exact_sign_after is not None:
            params["exact_sign_after"] = self.exact_sign_after
        return params


def _activations_per_image(model: nn.Module, shape: tuple[int, int, int]) -> int:
    """Numbers the modules of ``model`` output for one image: what autograd keeps for the
    backward pass, about (every such output is some operation's saved input)."""
    total = 0

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    # Leaves, and layers that compute with their own weights (binary layers hold quantizers).
    hooks = [
        m.register_forward_hook(count)
        for m in model.modules()
        if not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))  # eval: BatchNorm1d refuses a batch of 1
    finally:
        for h in hooks:
            h.remove()
    return total


def _check_sizes(c: Config) -> None:
    """Refuse, before any data is read or memory taken, a run whose model, batch or learned
    estimator cannot fit in its device's memory (lower bounds, see :mod:`signgrad.memory`).

    Built-in data sets only: an image folder's shape is known once it is read (a learned
    estimator still checks itself when it is built). The stand-in model is built for real
    on the CPU (milliseconds) with ``z_dim=1``, so that a huge --z-dim is counted, not
    allocated.
    """
    if c.data.startswith("imagefolder:"):
        return
    classes, (ch, h, w) = data.describe(c.data)
    device = pick_device(c.device)
    probe = build_architecture(dataclasses.replace(c, init=None, z_dim=1), classes, ch, h)
    kernels = sum(m.embedding.shape[0] for m in probe.modules() if isinstance(m, hyper._HyperMixin))
    params = sum(p.numel() for p in probe.parameters()) + kernels * (c.z_dim - 1)
    # Each parameter: itself, its gradient, and Adam's two moments or SGD's momentum.
    copies = 4 if c.optimizer == "adam" else (3 if c.momentum > 0 else 2)
    act_bytes = 2 if c.bf16 else 4
    acts = _activations_per_image(probe, (ch, h, w))
    needed = 4 * copies * params + c.batch_size * act_bytes * acts
    what = f"training {c.model} ({params:,} parameters) with batch size {c.batch_size}"
    if c.hyper:
        what += f" and z_dim {c.z_dim}"
    memory.check_fits(needed, what, device)
    if c.estimator is not None:
        params_e = estimators.parse_params(c.estimator_params, c.estimator)
        estimators.check(c.estimator, probe, params_e, device)


HYPER_PREFIX = "hyper-"

#: Fields a saved configuration must have: they define what was trained. The others take
#: their defaults when missing (a configuration from before they existed).
SAVED_REQUIRED = ("model", "data", "quantizer", "input_quantizer", "epochs")


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON-like ``value`` is of the annotated type ``tp`` (bool is not a number)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list | tuple) and all(_fits(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def check_saved_config(saved: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The configuration dict of the checkpoint at ``path``, checked: every field known,
    of its type, and valid by :meth:`Config.resolved`; a one-line error otherwise."""
    where = f"{path} is a damaged checkpoint"
    if not isinstance(saved, dict):
        raise SigngradError(f"{where}: its config is a {type(saved).__name__}, not a dict")
    hints = typing.get_type_hints(Config)
    unknown = sorted(str(k) for k in saved if k not in hints)
    if unknown:
        raise SigngradError(f"{where}: its config has unknown fields: {', '.join(unknown)}")
    missing = [k for k in SAVED_REQUIRED if k not in saved]
    if missing:
        raise SigngradError(f"{where}: its config has no {', '.join(missing)}")
    for k, v in saved.items():
        if not _fits(v, hints[k]):
            raise SigngradError(
                f"{where}: its config's {k} is {v!r}, not of type {_type_name(hints[k])}"
            )
    # The names a reader builds from. Not Config.resolved(): that also checks the device
    # and memory of the training machine, which a reader need not be.
    valid = {
        "model": models.names(),
        "quantizer": quantizers.names(),
        "input_quantizer": [None, *quantizers.names()],
        "estimator": [None, *estimators.names()],
        "optimizer": list(OPTIMIZERS),
        "schedule": list(LR_SCHEDULES),
    }
    for k, names in valid.items():
        if k in saved and saved[k] not in names:
            shown = ", ".join(str(n) for n in names if n is not None)
            raise SigngradError(f"{where}: its config's {k} is {saved[k]!r}; valid: {shown}")
    try:
        data.check_name(saved["data"])
    except SigngradError as e:
        raise SigngradError(f"{where}: its config's data: {e}") from None
    for k in ("epochs", "batch_size"):
        if k in saved and saved[k] < 1:
            raise SigngradError(f"{where}: its config's {k} is {saved[k]}, not >= 1")
    return saved


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


#: Presets of Config values; flags given with a preset override it.
RECIPES: dict[str, dict[str, Any]] = {
    # Hyper-BinaryNet's CIFAR recipe (the authors' code): Adam 1e-2 with betas (0.5, 0.99),
    # no weight decay, lr x0.5 every 60 epochs, gradient norm clipped at 5, BN momentum 0.5.
    "hyper-binarynet": {
        "optimizer": "adam",
        "lr": 1e-2,
        "betas": [0.5, 0.99],
        "weight_decay": 0.0,
        "schedule": "step",
        "milestones": list(range(60, 1000, 60)),
        "gamma": 0.5,
        "grad_clip": 5.0,
        "bn_momentum": 0.5,
    },
}


def with_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` on top of the recipe they name (``values["recipe"]``), if any."""
    name = values.get("recipe")
    if name is None:
        return values
    if name not in RECIPES:
        raise SigngradError(f"unknown recipe '{name}'; valid: {', '.join(RECIPES)}")
    return {**RECIPES[name], **values}


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SigngradError(f"unknown device '{name}'; try auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SigngradError(f"device '{name}' asked for, but CUDA is not available here")
    return device


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_model(cfg: Config, ds: data.DataSet) -> nn.Module:
    """The architecture of ``cfg`` sized for ``ds``, binarized as ``cfg`` says."""
    return build_architecture(cfg, ds.num_classes, ds.in_channels, ds.image_size[0])


def build_architecture(
    cfg: Config, num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """The architecture of ``cfg`` for images of that size, binarized as ``cfg`` says."""
    model = models.get(
        cfg.model,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=cfg.activation,
    )
    if cfg.init:
        with torch.random.fork_rng(devices=[]):  # checking it leaves the run's stream alone
            state = checkpoint.load(cfg.init)
            _check_init(state, cfg, num_classes, in_channels, image_size)
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, ValueError, TypeError, KeyError) as e:
            raise SigngradError(
                f"--init {cfg.init} ({state['config'].get('model')}) does not fit "
                f"{cfg.model}: {_first_line(e)}"
            ) from None
    if cfg.quantizer != "none" or cfg.input_quantizer or cfg.hyper:
        layers.binarize(
            model,
            cfg.quantizer,
            cfg.input_quantizer,
            scaling=cfg.scaling,
            keep=cfg.keep,
            weight_params=cfg.weight_params(),
            input_params=cfg.input_params(),
            hyper=cfg.hyper,
            hyper_params={"z_dim": cfg.z_dim, "generator": cfg.generator},
        )
    if cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    return model


def _check_init(
    state: dict[str, Any], cfg: Config, num_classes: int, in_channels: int, image_size: int
) -> None:
    """An --init checkpoint is checked as a whole like any other (its states must fit the
    run it describes), though only its weights are used: rebuild that run's model."""
    own = dataclasses.replace(Config.from_dict(state["config"]), init=None)
    if own.data == cfg.data:
        shape = num_classes, in_channels, image_size
    else:
        try:
            classes, (c, h, _) = data.describe(own.data)
        except SigngradError:
            return  # an image folder's shape is only known once read: the weights decide
        shape = classes, c, h
    model = build_architecture(own, *shape)
    restore(state, cfg.init, model, make_optimizer(own, model))


def build_estimator(cfg: Config, model: nn.Module) -> estimators.LearnedEstimator | None:
    """The learned gradient estimator of ``cfg`` for ``model``'s binarized layers."""
    if cfg.estimator is None:
        return None
    params = estimators.parse_params(cfg.estimator_params, cfg.estimator)
    return estimators.build(cfg.estimator, model, **params)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    # Weight decay on conv/linear weights only: decaying BN scales and biases only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def learning_rate(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate at a global step: a pure function, so resume needs no state."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
    milestones = cfg.milestones or [cfg.epochs // 2, (3 * cfg.epochs) // 4]
    epoch = step // steps_per_epoch
    return cfg.lr * cfg.gamma ** sum(epoch >= m for m in milestones)


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: data.Loader, *, bf16: bool = False, channels_last: bool = False
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode over ``loader``."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, bf16):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        n += len(y)
    return loss_sum.item() / n, correct.item() / n


def _prepare_run_dir(cfg: Config, resume: bool) -> tuple[Path, rundir.RunLock]:
    """The run directory, created if new, and its lock, taken before the checkpoint is
    looked at so that of two runs started on one directory exactly one goes on."""
    if cfg.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.out = str(Path("runs") / f"{cfg.model}-{cfg.data}-{cfg.quantizer}-s{cfg.seed}-{stamp}")
    run_dir = Path(cfg.out)
    ckpt = run_dir / checkpoint.CHECKPOINT_NAME
    if resume and not ckpt.is_file():  # before creating anything; checked again below
        rundir.check_not_busy(run_dir)
        raise SigngradError(f"--resume: no checkpoint in {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SigngradError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise SigngradError(f"run directory {run_dir} is not writable")
    lock = rundir.lock(run_dir)
    try:
        if resume and not ckpt.is_file():
            raise SigngradError(f"--resume: no checkpoint in {run_dir}")
        if not resume and ckpt.exists():
            raise SigngradError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
        rundir.remove_leftovers(run_dir)
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def _first_line(e: BaseException) -> str:
    """The cause of ``e`` on one line: its first line, and the second where the first only
    introduces it ("Error(s) in loading state_dict for ConvNet:"), cut to a readable size."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


def restore(
    state: dict[str, Any],
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    estimator: estimators.LearnedEstimator | None = None,
    generator: torch.Generator | None = None,
    global_rng: bool = False,
) -> None:
    """Load a checkpoint's states into the objects of a run built from its configuration:
    a state that does not fit is one error naming the checkpoint. ``global_rng`` also
    sets PyTorch's global random state (resume); without it that state is only checked."""
    if Path(path).is_dir():
        path = Path(path) / checkpoint.CHECKPOINT_NAME
    where = f"{path} does not fit the run it describes"
    part = "model"
    try:
        model.load_state_dict(state["model"])
        part = "optimizer state"
        optimizer.load_state_dict(state["optimizer"])
        _check_optimizer_state(optimizer)
        if estimator is not None:
            part = "estimator state"
            estimator.load_state_dict(state["estimator"])
        part = "random state"
        (generator or torch.Generator()).set_state(state["rng"]["data"])
        if global_rng:
            torch.set_rng_state(state["rng"]["torch"])
        else:
            torch.Generator().set_state(state["rng"]["torch"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise SigngradError(f"{where}: its {part}: {_first_line(e)}") from None


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """``load_state_dict`` checks the group sizes only; a moment of the wrong shape or a
    setting of the wrong kind would fail in the middle of the next step instead."""
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():
            if key not in group or not _same_kind(default, group[key]):
                raise ValueError(f"parameter group setting '{key}' is {group.get(key)!r}")
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape != p.shape:
                    raise ValueError(
                        f"'{key}' has shape {list(v.shape)} for a parameter of {list(p.shape)}"
                    )


def _same_kind(default: Any, value: Any) -> bool:
    """Whether an optimizer setting ``value`` is of the kind of its ``default``."""
    if default is None or isinstance(default, bool):
        return value is None or isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float | torch.Tensor) and not isinstance(value, bool)
    if isinstance(default, tuple | list):
        return (
            isinstance(value, tuple | list)
            and len(value) == len(default)
            and all(_same_kind(d, v) for d, v in zip(default, value, strict=True))
        )
    return isinstance(value, type(default))


def resume_config(run_dir: str | os.PathLike, overrides: dict[str, Any]) -> Config:
    """The configuration of the run in ``run_dir`` with ``overrides`` applied; only the
    number of epochs, the device and the data root may change on resume."""
    try:
        state = checkpoint.load(run_dir)
    except SigngradError:
        rundir.check_not_busy(Path(run_dir))  # a new run before its first checkpoint
        raise
    saved = state["config"]
    changeable = {"epochs", "device", "data_root", "download", "out"}
    flags = "--epochs, --device, --data-root and --no-download"
    clash = sorted(k for k, v in overrides.items() if k not in changeable and saved.get(k) != v)
    if clash:
        raise SigngradError(
            f"--resume continues the saved configuration; these flags differ from it: "
            f"{', '.join(clash)} (only {flags} may change)"
        )
    cfg = Config.from_dict({**saved, **overrides, "out": str(run_dir)})
    check_resume_epochs(run_dir, state["epoch"], cfg.epochs)  # before any file is touched
    return cfg


def check_resume_epochs(run_dir: str | os.PathLike, done: int, epochs: Any) -> None:
    """A resumed run cannot have fewer epochs than it has finished."""
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs < done:
        raise SigngradError(
            f"--epochs {epochs} is below the {done} epochs the run in {run_dir} has done; "
            f"give --epochs {done} or more, or leave it out"
        )


def check_stop_after(stop_after: Any) -> None:
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1
    ):
        raise SigngradError(f"--stop-after must be at least 1, got {stop_after}")


def train(
    cfg: Config, *, resume: bool = False, stop_after: int | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Train as ``cfg`` says; return the per-epoch metrics of the whole run.

    ``stop_after`` ends this call after that many finished epochs (counting the resumed
    ones) while keeping the schedules of ``cfg.epochs``, so a run can be split into
    pieces that together equal one uninterrupted run.
    """
    cfg = cfg.resolved()
    check_stop_after(stop_after)
    run_dir, lock = _prepare_run_dir(cfg, resume)
    with lock:  # one writer per run directory, released however the run ends
        return _train_locked(cfg, run_dir, resume, stop_after, progress)


def _train_locked(
    cfg: Config, run_dir: Path, resume: bool, stop_after: int | None, progress: bool
) -> list[dict[str, Any]]:
    """The body of :func:`train`, run holding the lock of ``run_dir``."""
    state = None
    if resume:
        # Read under the lock: no other writer can replace it from here on.
        state = checkpoint.load(run_dir)
        check_resume_epochs(run_dir, state["epoch"], cfg.epochs)
    device = pick_device(cfg.device)
    if cfg.bf16 and device.type == "cpu" and not _cpu_has_fast_bf16():
        log.warning(
            "--bf16 on a CPU without AVX-512 BF16 or AMX emulates bf16 and is many times "
            "slower than fp32 (see benchmarks/train_step.py)"
        )
    ds = data.load(cfg.data, root=cfg.data_root, download=cfg.download)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    estimator = build_estimator(cfg, model)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = data.Loader(
        ds.train_images, ds.train_labels, batch_size=cfg.batch_size, mean=ds.mean, std=ds.std,
        train=True, augment=ds.augment, device=device, generator=generator, drop_last=True,
    )  # fmt: skip
    test_loader = data.Loader(
        ds.test_images, ds.test_labels, batch_size=500, mean=ds.mean, std=ds.std,
        train=False, augment=False, device=device,
    )  # fmt: skip
    steps = len(train_loader)
    if steps == 0:
        raise SigngradError(
            f"batch size {cfg.batch_size} exceeds the {len(ds.train_labels)} training images"
        )

    history: list[dict[str, Any]] = []
    start_epoch = 0
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    if state is not None:
        ckpt = run_dir / checkpoint.CHECKPOINT_NAME
        restore(state, ckpt, model, optimizer, estimator, generator, global_rng=True)
        history = list(state["history"])
        start_epoch = state["epoch"]
        if start_epoch >= end_epoch:
            # Nothing to train: every file stays as it is (config.json keeps its epochs).
            log.info("%s has done %d epochs; nothing to train", run_dir, start_epoch)
            return history
        # metrics.jsonl may hold a line written after the last checkpoint; the checkpoint wins.
        checkpoint.write_jsonl(run_dir / checkpoint.METRICS_NAME, history)
        log.info("resuming %s at epoch %d of %d", run_dir, start_epoch, cfg.epochs)
    config_dict = dataclasses.asdict(cfg)
    checkpoint.write_json(run_dir / checkpoint.CONFIG_NAME, config_dict)

    for epoch in range(start_epoch, end_epoch):
        sharpness = layers.set_epoch(model, epoch, cfg.epochs)
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = fallback_steps = 0
        bar = tqdm(
            train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
            disable=not progress, dynamic_ncols=True,
        )  # fmt: skip
        for i, (x, y) in enumerate(bar):
            lr = learning_rate(cfg, epoch * steps + i, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if cfg.sharpness_per_step and i > 0:
                layers.set_epoch(model, epoch + i / steps, cfg.epochs)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if estimator is not None:
                estimator.begin_step(lr)  # look-ahead weights: the loss depends on phi
            with _autocast(device, cfg.bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            if estimator is not None:
                estimator.zero_grad()
            loss.backward()
            if estimator is not None:
                fallback_steps += estimator.end_step() > 0  # hands g^ to the optimizer
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            layers.post_step(model, lr)
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if progress and i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        train_loss = loss_sum.item() / seen
        if not math.isfinite(train_loss):
            raise SigngradError(
                f"the training loss became {train_loss} in epoch {epoch + 1}; the last good "
                f"checkpoint in {run_dir} is kept (try a lower --lr)"
            )
        test_loss, test_acc = evaluate(
            model, test_loader, bf16=cfg.bf16, channels_last=cfg.channels_last
        )
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": correct.item() / seen,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "time_s": time.perf_counter() - t0,
            "lr": lr,
            "sharpness": sharpness,
        }
        if estimator is not None:
            # Steps in which some layer's learned gradient was not finite (STE used).
            record["fallback_steps"] = fallback_steps
        history.append(record)
        checkpoint.save(
            run_dir / checkpoint.CHECKPOINT_NAME,
            {
                "config": config_dict,
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": {"data": generator.get_state(), "torch": torch.get_rng_state()},
                "history": history,
                "estimator": None if estimator is None else estimator.state_dict(),
            },
        )
        metrics = run_dir / checkpoint.METRICS_NAME
        try:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise SigngradError(
                f"cannot write {metrics}: {e.strerror or e}; the checkpoint of epoch "
                f"{epoch + 1} is kept (--resume rewrites the metrics from it)"
            ) from None
        log.info(
            "epoch %d/%d  train loss %.4f  acc %.2f%%  test loss %.4f  acc %.2f%%  "
            "lr %.2e  %.1fs",
            epoch + 1, cfg.epochs, train_loss, 100 * record["train_acc"], test_loss,
            100 * test_acc, lr, record["time_s"],
        )  # fmt: skip
    if history:
        report.plot_run(run_dir)
    return history


@dataclass
class Trained:
    """A trained model rebuilt from its checkpoint, with what it was trained on."""

    model: nn.Module
    config: Config
    checkpoint: dict[str, Any]
    data: data.DataSet


def load_trained(
    path: str | os.PathLike, device: str = "cpu", data_root: str | None = None
) -> Trained:
    """Rebuild the model of a checkpoint (or run directory) in its final state: weights
    loaded, quantizers at the epoch the checkpoint was written."""
    state = checkpoint.load(path)
    cfg = Config.from_dict(state["config"])
    if data_root is not None:
        cfg.data_root = data_root
    ds = data.load(cfg.data, root=cfg.data_root, download=cfg.download)
    model = build_model(dataclasses.replace(cfg, init=None), ds)
    # The whole checkpoint must fit, not only the weights: a run that cannot be resumed
    # from it is damaged, and a reader says so rather than trusting half of it.
    restore(state, path, model, make_optimizer(cfg, model))
    layers.set_epoch(model, state["epoch"] - 1, cfg.epochs)
    return Trained(model.to(pick_device(device)), cfg, state, ds)
