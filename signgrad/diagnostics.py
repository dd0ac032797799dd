"""Gradient-fidelity diagnostics: how the gradient a run applies compares with the
straight-through one, step by step and layer by layer.

``signgrad train --diagnostics`` writes ``RUN/diagnostics.jsonl`` (the hook:
:class:`signgrad.hooks.GradientDiagnostics`): a first line naming the binarized layers,
then one line per training step::

    {"layers": ["layer1.0.conv1", ...]}
    {"step": 41, "loss": 2.31, "fallbacks": 0,
     "cos": [...], "norm_ratio": [...], "drift": [...], "flips": [...]}

with, per layer (in the order of the first line):

``cos``         cosine between the gradient the optimizer receives for the latent weights
                and the straight-through gradient of the same batch (the natural
                gradient dL/dF(W) times the quantizer's B'(W), what plain STE applies)
``norm_ratio``  their norms' ratio, applied / straight-through
``drift``       |mean| / root mean square of the applied gradient: the share of it that
                does not depend on the gradient's sign (about 0.05 for STE on ResNet-20)
``flips``       the fraction of latent weights whose sign the step changed

``null`` where a layer has no gradient this step (a learned estimator's first step).
For a run without a learned estimator the applied gradient is the straight-through one
(``cos`` and ``norm_ratio`` 1). ``loss`` is the step's training cross-entropy;
``fallbacks`` the layers whose learned gradient was not finite (the straight-through one
was used). On ``--resume`` the lines after the checkpoint's last step are dropped, so the
file always describes the steps the run kept.

:func:`read` loads a file; :func:`summary` reduces it to the figures ``signgrad
diagnose`` tabulates.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from signgrad.checkpoint import atomic_write
from signgrad.errors import SigngradError

DIAGNOSTICS_NAME = "diagnostics.jsonl"
#: The per-layer series of every step record.
SERIES = ("cos", "norm_ratio", "drift", "flips")


class Writer:
    """Appends step records to ``RUN/diagnostics.jsonl``; started at ``first_step``
    (0 for a new run), it first drops what a killed run wrote after its checkpoint."""

    def __init__(self, run_dir: str | os.PathLike, layer_names: list[str], first_step: int):
        self.path = Path(run_dir) / DIAGNOSTICS_NAME
        header = {"layers": list(layer_names)}
        kept: list[str] = []
        if first_step > 0 and self.path.is_file():
            head, records = read(self.path)
            if head != header["layers"]:
                raise SigngradError(f"{self.path} describes other layers than this run's")
            kept = [json.dumps(r) for r in records if r["step"] < first_step]
        lines = [json.dumps(header), *kept]
        atomic_write(self.path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
        self.pending: list[str] = []

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(json.dumps(record))

    def flush(self) -> None:
        """Append the pending records (at the end of each epoch, before its checkpoint)."""
        if self.pending:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(self.pending) + "\n")
            self.pending = []


def read(path: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """(layer names, step records) of a diagnostics file or of the run directory holding
    one; a missing or damaged file is a one-line error."""
    path = Path(path)
    if path.is_dir():
        path = path / DIAGNOSTICS_NAME
    if not path.is_file():
        raise SigngradError(
            f"{path} does not exist: train the run with --diagnostics to record them"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0])["layers"]
        records = [json.loads(line) for line in lines[1:] if line.strip()]
        ok = isinstance(head, list) and all(
            isinstance(r.get("step"), int)
            and all(isinstance(r.get(k), list) and len(r[k]) == len(head) for k in SERIES)
            for r in records
        )
    except (IndexError, KeyError, TypeError, AttributeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise SigngradError(f"{path} is not a diagnostics file of signgrad")
    return head, records


def _mean(values: Iterable[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def layer_means(records: list[dict[str, Any]], key: str) -> list[float]:
    """Per step, the mean of series ``key`` over the layers that have a value."""
    return [_mean(r[key]) for r in records]


def summary(records: list[dict[str, Any]], early: int = 10) -> dict[str, float]:
    """Means over steps (of the layer means) of every series, for the whole run and for
    its first ``early`` steps with a learned gradient; and the fallback count."""
    with_values = [r for r in records if any(v is not None for v in r["cos"])]
    out: dict[str, float] = {"steps": float(len(records))}
    for key in SERIES:
        out[key] = _mean(layer_means(with_values, key))
        out[f"{key}_early"] = _mean(layer_means(with_values[:early], key))
    out["fallbacks"] = float(sum(r.get("fallbacks", 0) for r in records))
    return out
