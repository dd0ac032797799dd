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

Every file goes to a temporary name in the same directory first and is renamed over the
old one, so an interrupted write never replaces a good file with half a file.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from signgrad.errors import SigngradError

FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``."""
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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise SigngradError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_jsonl(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))


def save(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file or the checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise SigngradError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SigngradError(f"{path} is not a readable checkpoint: {first}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise SigngradError(f"{path} is not a signgrad checkpoint")
    if state.get("format") != FORMAT:
        raise SigngradError(
            f"{path} has checkpoint format {state.get('format')}; this signgrad reads {FORMAT}"
        )
    return state
