"""Checkpoints and run-directory files, written atomically.

A checkpoint is a ``torch.save`` dict of tensors and plain values, read back with
``weights_only=True`` (no arbitrary pickled code runs on load):

``format``       this layout's version (:data:`FORMAT`)
``config``       the resolved training configuration (a JSON-compatible dict)
``epoch``        number of finished epochs
``model``        the model's state_dict (latent weights for binary layers)
``optimizer``    the optimizer's state_dict
``rng``          {"data": generator state, "torch": global CPU RNG state}
``history``      the per-epoch metrics so far (the same records as metrics.jsonl)
``estimator``    the learned gradient estimator's state (None without one)
``deploy``       what using the model needs, without its data set (:func:`deploy_entry`):
                 {"classes": [str, ...], "in_channels": C, "height": H, "width": W,
                 "mean": [C floats], "std": [C floats]} (the normalisation of the
                 [0, 1] pixels). Always written; checkpoints written before it was added
                 have none, and their readers take it from the data set instead.

:func:`load` checks all of it, so every reader (eval, export, summary, --resume, --init)
refuses a damaged checkpoint with the same one-line error.

Every file goes to a temporary name in the same directory first and is renamed over the
old one, so an interrupted write never replaces a good file with half a file; a write
that fails (a full disk, a file size limit) is one error and leaves the old file intact.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from signgrad.config import check_saved_config
from signgrad.errors import SigngradError, first_line

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"


def _write_error(e: BaseException) -> str | None:
    """The reason of a failed write (``strerror`` of the ``OSError`` behind it), or None
    where ``e`` is not a write error. ``torch.save`` wraps the file's ``OSError`` in a
    ``RuntimeError`` ("PytorchStreamWriter failed writing file ..."), keeping the original
    as its context."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    if isinstance(e, RuntimeError) and (
        "PytorchStreamWriter" in text or "inline_container" in text
    ):
        return text.strip().splitlines()[0] if text.strip() else "write failed"
    return None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``.

    Any write error (a full disk, a file size limit, an I/O error) is one
    :class:`SigngradError`; the temporary file is removed and the old ``path`` is intact.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SigngradError(f"cannot write in {path.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        reason = _write_error(e) if isinstance(e, OSError | RuntimeError) else None
        if reason is None:
            raise
        what = "checkpoint" if path.name == CHECKPOINT_NAME else path.name
        kept = f"; the previous {what} is kept" if path.exists() else ""
        raise SigngradError(f"cannot write {path}: {reason}{kept}") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file or the checkpoint of a run directory, checked as a whole
    (:func:`validate`): what it returns has every field a reader needs, of the right kind.
    Whether the tensors fit the model is checked where the model is built."""
    path = _checkpoint_path(path)
    state = _torch_load(path)
    validate(state, path)
    return state


#: Key renamings that let a plain state_dict of another code base load into signgrad's
#: models: the MetaQuant/FSG authors' ResNets call the option-B shortcut ``downsample``.
WEIGHT_ALIASES = (("downsample.", "shortcut."),)


def read_init(path: str | os.PathLike) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """What ``--init`` names: (the checkpoint, its model's weights) for a signgrad
    checkpoint (checked as :func:`load` checks it), or (None, the weights) for a plain
    state_dict of tensors saved by other code (a model's ``torch.save(state_dict())``,
    from any device), its keys renamed by :data:`WEIGHT_ALIASES`. Never unpickles code."""
    path = _checkpoint_path(path)
    state = _torch_load(path)
    if isinstance(state, dict) and "format" in state:
        validate(state, path)
        return state, state["model"]
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise SigngradError(
            f"{path} is neither a signgrad checkpoint nor a state_dict of named tensors"
        )
    weights = {}
    for key, value in state.items():
        for old, new in WEIGHT_ALIASES:
            key = key.replace(old, new)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise SigngradError(f"{path}: its {key} holds NaN or infinite values")
        weights[key] = value
    return None, weights


def _checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise SigngradError(f"no checkpoint at {path}")
    return path


def _torch_load(path: Path) -> Any:
    """``torch.load`` of tensors and plain values only, onto the CPU (a file saved from
    CUDA loads too); a one-line error for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise SigngradError(
                f"{path} holds objects other than tensors and plain values; it was refused "
                "without running them (is it a signgrad checkpoint from a trusted source?)"
            ) from None
        raise SigngradError(f"{path} is not a readable checkpoint: {first_line(e)}") from None
    except OSError as e:
        raise SigngradError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - damaged bytes can break the reader in any way
        raise SigngradError(f"{path} is not a readable checkpoint: {first_line(e)}") from None
    return state


def _bad(path: Path, what: str) -> SigngradError:
    return SigngradError(f"{path} is a damaged checkpoint: {what}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


#: The numbers every history record holds (the CLI and the curves read them).
HISTORY_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "time_s")


def validate(state: Any, path: Path) -> None:
    """Check the layout of a loaded checkpoint (see the module's docstring) and its
    configuration; raise a one-line :class:`SigngradError` naming ``path`` at the first
    thing that is missing or of the wrong kind."""
    if not isinstance(state, dict):
        raise SigngradError(f"{path} is not a signgrad checkpoint (it holds no dict)")
    if "format" not in state:
        raise SigngradError(f"{path} is not a signgrad checkpoint (it has no format field)")
    if state["format"] != FORMAT:
        raise SigngradError(
            f"{path} has checkpoint format {state['format']!r}; this signgrad reads {FORMAT}"
        )
    for key in ("config", "epoch", "model", "optimizer", "rng", "history"):
        if key not in state:
            raise _bad(path, f"it has no '{key}'")
    config = check_saved_config(state["config"], path)
    epoch = state["epoch"]
    if not _is_int(epoch) or epoch < 1:
        raise _bad(path, f"its epoch is {epoch!r}, not a number of finished epochs (>= 1)")
    if epoch > config["epochs"]:
        raise _bad(path, f"it records epoch {epoch} of a {config['epochs']}-epoch run")
    model = state["model"]
    if not isinstance(model, dict) or not model:
        raise _bad(path, "its 'model' is not a state_dict")
    for k, v in model.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise _bad(path, f"its model entry {k!r} is a {type(v).__name__}, not a tensor")
    _check_optimizer(state["optimizer"], path)
    rng = state["rng"]
    size = torch.Generator().get_state().numel()
    for key in ("data", "torch"):
        r = rng.get(key) if isinstance(rng, dict) else None
        if not (isinstance(r, torch.Tensor) and r.dtype == torch.uint8 and r.shape == (size,)):
            got = f"{r.dtype} {list(r.shape)}" if isinstance(r, torch.Tensor) else repr(r)[:40]
            raise _bad(path, f"its random state '{key}' is {got}, not {size} bytes (uint8)")
    history = state["history"]
    if not isinstance(history, list) or len(history) != epoch:
        got = f"{len(history)} records" if isinstance(history, list) else type(history).__name__
        raise _bad(path, f"its history is {got}, not one record per finished epoch ({epoch})")
    for i, r in enumerate(history):
        if not isinstance(r, dict) or r.get("epoch") != i + 1:
            raise _bad(path, f"its history record {i + 1} is not the record of epoch {i + 1}")
        for key in HISTORY_KEYS:
            if not _is_number(r.get(key)):
                raise _bad(path, f"its history record {i + 1} has no number '{key}'")
    if "deploy" in state:
        _check_deploy(state["deploy"], path)
    if config.get("estimator") is not None:
        est = state.get("estimator")
        keys = ("meta", "meta_optimizer", "histories", "steps", "nonfinite_steps", "extra")
        if not isinstance(est, dict) or any(k not in est for k in keys):
            raise _bad(path, f"it has no state of its estimator '{config['estimator']}'")


DEPLOY_KEYS = ("classes", "in_channels", "height", "width", "mean", "std")


def deploy_entry(
    classes: list[str],
    shape: tuple[int, int, int],
    mean: Any,
    std: Any,
    crop: float | None = None,
) -> dict[str, Any]:
    """The checkpoint's ``deploy`` entry: the class names, the input shape (C, H, W) and
    the per-channel normalisation mean/std of a model, as plain values; ``crop``: the
    evaluation's centre crop (the share of the shorter side kept before resizing to
    H x W) where the model was trained on one, e.g. 0.875 for ImageNet-sized folders."""
    c, h, w = (int(x) for x in shape)
    entry = {
        "classes": [str(n) for n in classes],
        "in_channels": c,
        "height": h,
        "width": w,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }
    if crop is not None:
        entry["crop"] = float(crop)
    return entry


def deploy_of(state: dict[str, Any]) -> dict[str, Any] | None:
    """The ``deploy`` entry of a loaded (validated) checkpoint, or None for a checkpoint
    written before signgrad recorded it."""
    return state.get("deploy")


def _check_deploy(d: Any, path: Path) -> None:
    """The layout of the ``deploy`` entry (see the module's docstring)."""
    if not isinstance(d, dict):
        raise _bad(path, f"its 'deploy' is a {type(d).__name__}, not a dict")
    for key in DEPLOY_KEYS:
        if key not in d:
            raise _bad(path, f"its 'deploy' has no '{key}'")
    classes = d["classes"]
    if not (
        isinstance(classes, list) and classes and all(isinstance(n, str) and n for n in classes)
    ):
        raise _bad(path, "its 'deploy' classes are not a list of names")
    if len(set(classes)) != len(classes):
        raise _bad(path, "its 'deploy' classes repeat a name")
    for key in ("in_channels", "height", "width"):
        if not _is_int(d[key]) or d[key] < 1:
            raise _bad(path, f"its 'deploy' {key} is {d[key]!r}, not a positive number")
    for key in ("mean", "std"):
        v = d[key]
        if not (isinstance(v, list) and all(_is_number(x) for x in v)):
            raise _bad(path, f"its 'deploy' {key} is not a list of numbers")
        if len(v) != d["in_channels"]:
            raise _bad(
                path, f"its 'deploy' {key} has {len(v)} values for {d['in_channels']} channels"
            )
        if not all(math.isfinite(x) for x in v):
            raise _bad(path, f"its 'deploy' {key} holds a NaN or infinite value")
    if not all(x > 0 for x in d["std"]):
        raise _bad(path, "its 'deploy' std holds a value that is not above 0")
    if "crop" in d and not (_is_number(d["crop"]) and 0 < d["crop"] <= 1):
        raise _bad(path, f"its 'deploy' crop is {d['crop']!r}, not a number in (0, 1]")


def _check_optimizer(opt: Any, path: Path) -> None:
    """The layout of an optimizer state_dict: ``state`` {int: {str: tensor or number}} and
    ``param_groups`` [{"params": [int, ...], ...}]. Whether it fits the model's
    parameters is checked when it is loaded into an optimizer."""
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
        raise _bad(path, "its 'optimizer' is not an optimizer state_dict")
    groups = opt.get("param_groups")
    if not isinstance(groups, list) or not groups:
        raise _bad(path, "its optimizer has no list of parameter groups")
    for g in groups:
        if not isinstance(g, dict) or not (
            isinstance(g.get("params"), list) and all(_is_int(i) for i in g["params"])
        ):
            raise _bad(path, "its optimizer has a parameter group without a list of indices")
    for i, s in opt["state"].items():
        if not _is_int(i) or not isinstance(s, dict):
            raise _bad(path, f"its optimizer state {i!r} is not a dict of a parameter index")
        for k, v in s.items():
            if not (isinstance(v, torch.Tensor) or _is_number(v)):
                raise _bad(path, f"its optimizer state '{k}' of parameter {i} is not a tensor")
