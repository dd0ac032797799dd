"""From a configuration to the objects of a run: device, model, optimizer, estimator.

Every builder takes a resolved :class:`~signgrad.config.Config`. Also here: the memory
check that builds a stand-in model (:func:`check_sizes`), loading a checkpoint's states
into the objects built from its configuration (:func:`restore`), and a trained model
rebuilt from its checkpoint (:func:`load_trained`). :mod:`signgrad.train` runs them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signgrad import checkpoint, convert, data, estimators, hyper, layers, memory, models, optim
from signgrad.config import Config
from signgrad.errors import SigngradError, first_line
from signgrad.estimators.base import saved_settings

log = logging.getLogger(__name__)


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


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: do not warn
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_data(cfg: Config) -> Any:
    """The data set of ``cfg`` (a :class:`signgrad.data.DataSet`, or a streamed
    :class:`signgrad.folders.StreamSet` for an image folder), with the augmentation and
    normalisation ``cfg`` asks for."""
    folder: dict[str, Any] = {}
    if cfg.data.startswith("imagefolder:"):
        folder = {
            "mode": cfg.data_mode,
            "image_size": cfg.image_size,
            "workers": cfg.workers,
            "skip_bad": cfg.skip_bad_images,
            "augment": cfg.augment is not False,
        }
    ds = data.load(cfg.data, root=cfg.data_root, download=cfg.download, **folder)
    if cfg.augment is not None:
        ds = dataclasses.replace(ds, augment=cfg.augment)
    return normalised(cfg, ds)


def normalised(cfg: Config, ds: data.DataSet) -> data.DataSet:
    """``ds`` with the normalisation ``cfg`` asks for (``mean``/``std``, e.g. that of a
    pretrained model given to ``--init``), else its own."""
    if cfg.mean is None:
        return ds
    return dataclasses.replace(ds, mean=tuple(cfg.mean), std=tuple(cfg.std))


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
            state, weights = checkpoint.read_init(cfg.init)
            if state is not None:
                _check_init(state, cfg, num_classes, in_channels, image_size)
        source = f"--init {cfg.init}"
        if state is not None:
            source += f" ({state['config'].get('model')})"
        _check_fits(model, weights, f"{source} does not fit {cfg.model}")
        model.load_state_dict(weights)
    if cfg.quantizer != "none" or cfg.input_quantizer or cfg.hyper:
        convert.binarize(
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


def _check_fits(model: nn.Module, weights: dict[str, Any], where: str) -> None:
    """Refuse ``weights`` that are not exactly ``model``'s: a one-line error naming the
    first missing, unexpected or differently shaped tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        raise SigngradError(f"{where}: tensors {'; '.join(parts)}")
    for k, v in own.items():
        w = weights[k]
        if not isinstance(w, torch.Tensor) or w.shape != v.shape:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise SigngradError(f"{where}: {k} is {got}, the model's {tuple(v.shape)}")


def _check_init(
    state: dict[str, Any], cfg: Config, num_classes: int, in_channels: int, image_size: int
) -> None:
    """An --init checkpoint is checked as a whole like any other (its states must fit the
    run it describes), though only its weights are used: rebuild that run's model."""
    own = dataclasses.replace(Config.from_dict(state["config"]), init=None)
    deploy = checkpoint.deploy_of(state)
    if own.data == cfg.data:
        shape = num_classes, in_channels, image_size
    elif deploy is not None:
        shape = len(deploy["classes"]), deploy["in_channels"], deploy["height"]
    else:
        try:
            classes, (c, h, _) = data.describe(own.data)
        except SigngradError:
            return  # an image folder's shape is only known once read: the weights decide
        shape = classes, c, h
    model = build_architecture(own, *shape)
    restore(state, cfg.init, model, make_optimizer(own, model))


def build_estimator(
    cfg: Config, model: nn.Module, state: dict[str, Any] | None = None
) -> estimators.LearnedEstimator | None:
    """The learned gradient estimator of ``cfg`` for ``model``'s binarized layers; with
    the checkpoint ``state`` of a resumed run, built with the settings it was saved with
    (which a later signgrad's defaults may no longer give)."""
    if cfg.estimator is None:
        return None
    params = estimators.parse_params(cfg.estimator_params, cfg.estimator)
    saved = None if state is None else state.get("estimator")
    if isinstance(saved, dict):
        cls = estimators.ESTIMATORS.get(cfg.estimator)
        full = {**estimators.parameters(cfg.estimator), **params}
        params = saved_settings(saved, full, cls)
    return estimators.build(cfg.estimator, model, **params)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    # Weight decay on conv/linear weights only: decaying BN scales and biases only hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The settings the optimizer's builder names (lr, betas, momentum) come from cfg.
    settings = {k: getattr(cfg, k) for k in optim.OPTIMIZERS.parameters(cfg.optimizer)}
    return optim.OPTIMIZERS.build(cfg.optimizer, groups, **settings)


def restore(
    state: dict[str, Any],
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    estimator: estimators.LearnedEstimator | None = None,
    generator: torch.Generator | None = None,
    global_rng: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Load a checkpoint's states into the objects of a run built from its configuration:
    a state that does not fit is one error naming the checkpoint. ``global_rng`` also
    sets PyTorch's global random state (resume); without it that state is only checked.
    ``scaler``: an fp16 run's loss scaler, given the checkpoint's ``scaler`` state."""
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
        if scaler is not None and scaler.is_enabled() and state.get("scaler") is not None:
            part = "loss scaler state"
            saved = state["scaler"]
            if not isinstance(saved, dict) or not all(
                isinstance(saved.get(k), int | float) and not isinstance(saved.get(k), bool)
                for k in ("scale", "growth_factor", "backoff_factor", "growth_interval")
            ):
                raise ValueError("it is not the state of a torch.amp.GradScaler")
            scaler.load_state_dict(saved)
        part = "random state"
        (generator or torch.Generator()).set_state(state["rng"]["data"])
        if global_rng:
            torch.set_rng_state(state["rng"]["torch"])
        else:
            torch.Generator().set_state(state["rng"]["torch"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise SigngradError(f"{where}: its {part}: {first_line(e)}") from None


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


def check_sizes(c: Config) -> None:
    """Refuse, before any data is read or memory taken, a run whose model, batch or learned
    estimator cannot fit in its device's memory (lower bounds, see :mod:`signgrad.memory`).
    ``c`` is resolved (:meth:`Config.resolved`); :func:`signgrad.train.train` runs both.

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
    kernels = sum(m.embedding.shape[0] for m in probe.modules() if isinstance(m, hyper.HyperLayer))
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


@dataclass
class Trained:
    """A trained model rebuilt from its checkpoint, with what it was trained on: ``deploy``
    is the checkpoint's deployment entry (:func:`signgrad.checkpoint.deploy_entry`: class
    names, input shape, normalisation), ``data`` the data set (None when not loaded)."""

    model: nn.Module
    config: Config
    checkpoint: dict[str, Any]
    data: data.DataSet | None
    deploy: dict[str, Any]


def _deploy_of_data(ds: data.DataSet) -> dict[str, Any]:
    return checkpoint.deploy_entry(ds.classes, (ds.in_channels, *ds.image_size), ds.mean, ds.std)


def _images(d: dict[str, Any]) -> str:
    """'10 classes (airplane, automobile, ...) of 3x32x32 images' of a deploy entry."""
    names = ", ".join(d["classes"][:3]) + (", ..." if len(d["classes"]) > 3 else "")
    shape = f"{d['in_channels']}x{d['height']}x{d['width']}"
    return f"{len(d['classes'])} classes ({names}) of {shape} images"


def load_trained(
    path: str | os.PathLike,
    device: str = "cpu",
    data_root: str | None = None,
    with_data: bool = True,
) -> Trained:
    """Rebuild the model of a checkpoint (or run directory) in its final state: weights
    loaded, quantizers at the epoch the checkpoint was written.

    The class names, input shape and normalisation come from the checkpoint's ``deploy``
    entry; ``with_data=False`` does not read the data set (``Trained.data`` is None), so
    exporting needs no data. A checkpoint written before that entry existed is the
    exception: its data set is read (from ``data_root``, else the configuration's) to
    learn them, with a note in the log. With data, the data set must still match the
    recorded classes and shape."""
    state = checkpoint.load(path)
    cfg = Config.from_dict(state["config"])
    if data_root is not None:
        cfg.data_root = data_root
    deploy = checkpoint.deploy_of(state)
    ds = None
    if deploy is None:
        log.info(
            "%s records no deployment entry (it was written by an older signgrad): its "
            "classes, input shape and normalisation are read from its data set %s",
            path, cfg.data,
        )  # fmt: skip
    if with_data or deploy is None:
        ds = load_data(cfg)
        own = _deploy_of_data(ds)
        if deploy is None:
            deploy = own
        elif any(own[k] != deploy[k] for k in ("classes", "in_channels", "height", "width")):
            raise SigngradError(
                f"{path} was trained on {_images(deploy)}, but its data set {cfg.data} now "
                f"holds {_images(own)}"
            )
    model = build_architecture(
        dataclasses.replace(cfg, init=None),
        len(deploy["classes"]),
        deploy["in_channels"],
        deploy["height"],
    )
    # The whole checkpoint must fit, not only the weights: a run that cannot be resumed
    # from it is damaged, and a reader says so rather than trusting half of it.
    restore(state, path, model, make_optimizer(cfg, model))
    layers.set_epoch(model, state["epoch"] - 1, cfg.epochs)
    return Trained(model.to(pick_device(device)), cfg, state, ds, deploy)
