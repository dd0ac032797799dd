"""What defines a run, and the rules on it that need no model, data or file.

:class:`Config` is everything ``config.json`` holds; :meth:`Config.resolved` fills the
defaults that depend on other fields and refuses bad names and values. Also here: the
presets (:data:`RECIPES`, :func:`with_recipe`), the check of a configuration read back
from a checkpoint (:func:`check_saved_config`, used by :mod:`signgrad.checkpoint`), and
what may change when a run is resumed (:func:`resumed_config`, :func:`check_resume_epochs`,
:func:`check_stop_after`).

This module builds nothing and reads no file: :mod:`signgrad.builders` turns a
configuration into a model, optimizer and estimator, :mod:`signgrad.train` runs it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from signgrad import (
    __version__,
    convert,
    data,
    estimators,
    hyper,
    layers,
    models,
    optim,
    quantizers,
)
from signgrad.errors import SigngradError
from signgrad.registry import Registry

# The names of the optimizers and schedules and their default learning rates (their
# registries in signgrad.optim are the source).
OPTIMIZERS = tuple(optim.OPTIMIZERS)
LR_SCHEDULES = tuple(optim.LR_SCHEDULES)
DEFAULT_LR = {name: optim.OPTIMIZERS.parameters(name)["lr"] for name in optim.OPTIMIZERS}


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
    accumulate: int = 1  # optimizer step every N batches, on the sum of their gradients
    seed: int = 0
    bf16: bool = False
    fp16: bool = False  # fp16 autocast with dynamic loss scaling (torch.amp.GradScaler)
    compile: bool = False  # torch.compile the model's forward pass
    channels_last: bool = False
    sync_bn: bool = False  # data-parallel runs: batch norm over the global batch
    diagnostics: bool = False  # record gradient-fidelity diagnostics (signgrad.diagnostics)
    init: str | None = None
    teacher: str | None = None  # a full-precision run to distil from (signgrad.distill)
    distill_weight: float = 1.0  # the KL term's share of the loss (1: KL alone)
    distill_temperature: float = 1.0
    mean: list[float] | None = None  # input normalisation; None: the data set's own
    std: list[float] | None = None
    data_root: str | None = None
    download: bool = True
    augment: bool | None = None  # the data set's standard augmentation; None: its default
    data_mode: str = "auto"  # image folders: auto, memory, stream (signgrad.folders)
    image_size: int | None = None  # image folders: S x S inputs; None: from the data
    workers: int | None = None  # image folders: decoding processes; None: from the cores
    skip_bad_images: bool = False  # image folders: leave unreadable files out, counted
    device: str = "auto"
    out: str | None = None
    recipe: str | None = None  # the preset the values came from, for the record
    version: str = __version__

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resolved(self) -> Config:
        """Fill the defaults that depend on other fields and check every name and value.

        Whether the run fits its device's memory is a separate check that builds a stand-in
        model: :func:`signgrad.builders.check_sizes` (``train()`` runs both)."""
        # Every name in its registered spelling: what config.json and checkpoints hold.
        c = dataclasses.replace(self, **canonical_names(dataclasses.asdict(self)))
        if c.model.startswith(HYPER_PREFIX):
            c.model, c.hyper = c.model[len(HYPER_PREFIX) :], True
        if c.hyper and (isinstance(c.z_dim, bool) or not isinstance(c.z_dim, int) or c.z_dim < 1):
            raise SigngradError(f"z_dim must be an integer >= 1, got {c.z_dim!r}")
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
        if (c.mean is None) != (c.std is None):
            raise SigngradError("--mean and --std go together: give both or neither")
        if c.mean is not None and (
            len(c.mean) != len(c.std)
            or not all(math.isfinite(m) for m in c.mean)
            or not all(s > 0 and math.isfinite(s) for s in c.std)
        ):
            raise SigngradError(
                f"mean and std must be finite, one per channel, std > 0; got {c.mean}, {c.std}"
            )
        _check_folder_fields(c)
        if c.teacher is not None:
            check_distillation(c.distill_weight, c.distill_temperature)
        if c.bn_momentum is not None and not 0 < c.bn_momentum <= 1:
            raise SigngradError(f"bn_momentum must be in (0, 1], got {c.bn_momentum}")
        if c.input_quantizer == "none":
            c.input_quantizer = None
        if c.lr is None:
            c.lr = DEFAULT_LR[c.optimizer]
        if c.activation is None:
            c.activation = models.default_activation(c.model, bool(c.input_quantizer))
        sizes = [("epochs", c.epochs), ("batch_size", c.batch_size), ("accumulate", c.accumulate)]
        for name, value in sizes:
            if value < 1:
                raise SigngradError(f"{name} must be at least 1, got {value}")
        if c.bf16 and c.fp16:
            raise SigngradError("--bf16 and --fp16 exclude each other: choose one")
        if c.fp16 and c.accumulate > 1:
            # The loss scale may change between the batches of one accumulated step.
            raise SigngradError("--fp16 does not combine with --accumulate; use --bf16")
        if c.accumulate > 1 and c.estimator is not None:
            # A learned estimator's meta step and late update belong to every batch.
            raise SigngradError("--accumulate does not combine with a learned --estimator")
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


def check_distillation(weight: float, temperature: float) -> None:
    """The distillation settings (:mod:`signgrad.distill`): ``weight`` in (0, 1],
    ``temperature`` positive and finite, else SigngradError."""
    if not (0 < weight <= 1):
        raise SigngradError(f"distill_weight must be in (0, 1], got {weight}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise SigngradError(f"distill_temperature must be positive and finite, got {temperature}")


def _check_folder_fields(c: Config) -> None:
    """The image-folder settings: valid values, and only with ``imagefolder:PATH``."""
    from signgrad import folders

    if c.data_mode not in folders.MODES:
        raise SigngradError(
            f"unknown data mode {c.data_mode!r}; choose one of {', '.join(folders.MODES)}"
        )
    folder = c.data.startswith("imagefolder:")
    given = [
        flag
        for flag, set_ in (
            ("--data-mode", c.data_mode != "auto"),
            ("--image-size", c.image_size is not None),
            ("--workers", c.workers is not None),
            ("--skip-bad-images", c.skip_bad_images),
        )
        if set_
    ]
    if given and not folder:
        raise SigngradError(f"{', '.join(given)} only apply to --data imagefolder:PATH")
    for name, value, lo, hi in (
        ("image_size", c.image_size, 8, 4096),
        ("workers", c.workers, 0, 64),
    ):
        ok = not isinstance(value, bool) and isinstance(value, int) and lo <= value <= hi
        if value is not None and not ok:
            raise SigngradError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")


HYPER_PREFIX = "hyper-"


def canonical_model(name: str) -> str:
    """The registered spelling of a model name, ``hyper-MODEL`` (its Hyper-BinaryNet
    form) included; unknown names are an error listing the valid ones."""
    also = [HYPER_PREFIX + "MODEL"]
    if isinstance(name, str) and name.strip().lower().replace("_", "-").startswith(HYPER_PREFIX):
        base = name.strip()[len(HYPER_PREFIX) :]
        if base in models.MODELS:
            return HYPER_PREFIX + models.MODELS.canonical(base)
        raise SigngradError(f"unknown model {name!r}; valid: {models.MODELS.help(also=also)}")
    return models.MODELS.canonical(name, also=also)


def name_fields() -> dict[str, Callable[[str], str]]:
    """The configuration fields that hold a name, each with the function giving its
    registered spelling (the command line's flags use them too)."""
    return {
        "model": canonical_model,
        "data": data.canonical,
        "quantizer": quantizers.QUANTIZERS.canonical,
        "input_quantizer": quantizers.QUANTIZERS.canonical,
        "scaling": layers.SCALINGS.canonical,
        "keep": convert.KEEP_POLICIES.canonical,
        "activation": models.ACTIVATIONS.canonical,
        "generator": hyper.GENERATORS.canonical,
        "estimator": estimators.ESTIMATORS.canonical,
        "optimizer": optim.OPTIMIZERS.canonical,
        "schedule": optim.LR_SCHEDULES.canonical,
        "recipe": RECIPES.canonical,
    }


def canonical_names(values: dict[str, Any]) -> dict[str, Any]:
    """The name fields of ``values`` (a Config's fields, or some of them) in their
    registered spelling, so that ``vgg_small`` and ``vgg-small`` are one model in Python
    and on the command line alike; an unknown name is an error listing the valid ones."""
    return {
        k: canon(values[k]) for k, canon in name_fields().items() if isinstance(values.get(k), str)
    }


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
    of its type, and every name valid; a one-line error otherwise."""
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
    # The names a reader builds from. Not Config.resolved() with builders.check_sizes: that
    # also checks the device and memory of the training machine, which a reader need not be.
    valid = {
        "model": models.names(),
        "quantizer": quantizers.names(),
        "input_quantizer": [None, *quantizers.names()],
        "estimator": [None, *estimators.names()],
        "optimizer": optim.OPTIMIZERS.names(),
        "schedule": optim.LR_SCHEDULES.names(),
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


#: Presets of Config values by name; flags given with a preset override it.
RECIPES: Registry[dict[str, Any]] = Registry("recipe")
RECIPES.register(
    "hyper-binarynet",
    # The authors' code: Adam 1e-2 with betas (0.5, 0.99), no weight decay, lr x0.5 every
    # 60 epochs, gradient norm clipped at 5 after every backward pass, BN momentum 0.5, an
    # optimizer step every second batch on the sum of the two batches' gradients.
    summary="Hyper-BinaryNet's CIFAR optimizer settings",
    obj={
        "optimizer": "adam",
        "lr": 1e-2,
        "betas": [0.5, 0.99],
        "weight_decay": 0.0,
        "schedule": "step",
        "milestones": list(range(60, 1000, 60)),
        "gamma": 0.5,
        "grad_clip": 5.0,
        "bn_momentum": 0.5,
        "accumulate": 2,
    },
)


RECIPES.register(
    "reactnet",
    # ReActNet's second stage (both binary): Adam 5e-4 for batch 256, the learning rate
    # decayed linearly to 0 (per step here, per epoch in the authors' code), no weight
    # decay, 256 epochs; with --teacher, the KL divergence alone as the loss.
    summary="ReActNet's ImageNet optimizer settings (stage 2)",
    obj={
        "optimizer": "adam",
        "lr": 5e-4,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "schedule": "linear",
        "batch_size": 256,
        "epochs": 256,
        "distill_weight": 1.0,
        "distill_temperature": 1.0,
    },
)


def with_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` on top of the recipe they name (``values["recipe"]``), if any."""
    name = values.get("recipe")
    if name is None:
        return values
    preset = copy.deepcopy(RECIPES.get(name))  # its lists are not the caller's to change
    return {**preset, **values, "recipe": RECIPES.canonical(name)}


#: What ``--resume`` may change: the rest of the saved configuration is the run.
RESUME_CHANGEABLE = (
    "epochs", "device", "data_root", "download", "out", "diagnostics", "workers", "compile",
)  # fmt: skip


def resumed_config(
    run_dir: str | os.PathLike, saved: dict[str, Any], done: int, overrides: dict[str, Any]
) -> Config:
    """The saved configuration of the run in ``run_dir`` (``done`` epochs finished) with
    ``overrides`` applied; only the number of epochs, the device, the data root and the
    diagnostics switch may change on resume. :func:`signgrad.rundir.resume_config` reads
    them from the checkpoint."""
    flags = "--epochs, --device, --data-root, --no-download, --diagnostics, --workers and --compile"
    overrides = {**overrides, **canonical_names(overrides)}  # any spelling of a name
    clash = sorted(
        k for k, v in overrides.items() if k not in RESUME_CHANGEABLE and saved.get(k) != v
    )
    if clash:
        raise SigngradError(
            f"--resume continues the saved configuration; these flags differ from it: "
            f"{', '.join(clash)} (only {flags} may change)"
        )
    cfg = Config.from_dict({**saved, **overrides, "out": str(run_dir)})
    check_resume_epochs(run_dir, done, cfg.epochs)  # before any file is touched
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
