"""Schedules for a quantizer's sharpness (mu, beta, t, T) over training.

A schedule maps the current epoch (0-based, may be fractional) and the total number of
epochs to a value. Sharp forward maps (BNN++, PC, STE-Warmup, ProxQuant) also become the
exact sign from some epoch on; that is a separate switch of the quantizer
(``exact_sign_after``), not a value of the schedule, so any schedule combines with it.

Text form, as used on the command line (``--sharpness``):

=====================  ========================================================
``const:V``            V throughout
``linear:A:B``         A at epoch 0, linearly to B at the last epoch
``exp:A:B``            A at epoch 0, geometrically to B at the last epoch
``decay:A:G``          A * G**epoch (STE-Warmup's T = T0 * 0.95**epoch)
``stepdecay:A:G:D:E``  A * G**floor(max(0, epoch - D) / E): constant for D epochs,
                       then one factor G every E epochs (STE-Warmup on large data
                       sets, with the trainer's ``sharpness_per_step``; D and E may be
                       fractions of an epoch)
=====================  ========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from signgrad.errors import SigngradError


class Schedule:
    """A value as a function of training progress."""

    def __call__(self, epoch: float, total_epochs: int) -> float:
        raise NotImplementedError

    def spec(self) -> str:
        """The text form that :func:`parse` turns back into this schedule."""
        raise NotImplementedError


def _progress(epoch: float, total_epochs: int) -> float:
    # The last epoch (total - 1) reaches the end value, so a run ends at its target.
    if total_epochs <= 1:
        return 1.0
    return min(max(epoch / (total_epochs - 1), 0.0), 1.0)


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __call__(self, epoch: float, total_epochs: int) -> float:
        return self.value

    def spec(self) -> str:
        return f"const:{self.value:g}"


@dataclass(frozen=True)
class Linear(Schedule):
    start: float
    end: float

    def __call__(self, epoch: float, total_epochs: int) -> float:
        p = _progress(epoch, total_epochs)
        return self.start + (self.end - self.start) * p

    def spec(self) -> str:
        return f"linear:{self.start:g}:{self.end:g}"


@dataclass(frozen=True)
class Exponential(Schedule):
    """Geometric interpolation start * (end / start) ** progress (both must be > 0)."""

    start: float
    end: float

    def __post_init__(self) -> None:
        if self.start <= 0 or self.end <= 0:
            raise SigngradError(f"exp schedule needs positive ends, got {self.start}:{self.end}")

    def __call__(self, epoch: float, total_epochs: int) -> float:
        p = _progress(epoch, total_epochs)
        return self.start * (self.end / self.start) ** p

    def spec(self) -> str:
        return f"exp:{self.start:g}:{self.end:g}"


@dataclass(frozen=True)
class Decay(Schedule):
    """start * gamma ** epoch, independent of the run length."""

    start: float
    gamma: float

    def __post_init__(self) -> None:
        if self.gamma <= 0:
            raise SigngradError(f"decay schedule needs gamma > 0, got {self.gamma}")

    def __call__(self, epoch: float, total_epochs: int) -> float:
        return self.start * self.gamma**epoch

    def spec(self) -> str:
        return f"decay:{self.start:g}:{self.gamma:g}"


@dataclass(frozen=True)
class StepDecay(Schedule):
    """start * gamma ** floor(max(0, epoch - delay) / every)."""

    start: float
    gamma: float
    delay: float
    every: float

    def __post_init__(self) -> None:
        if self.gamma <= 0 or self.every <= 0 or self.delay < 0:
            raise SigngradError(
                f"stepdecay schedule needs gamma > 0, delay >= 0 and every > 0, got "
                f"{self.gamma}, {self.delay}, {self.every}"
            )

    def __call__(self, epoch: float, total_epochs: int) -> float:
        return self.start * self.gamma ** math.floor(max(0.0, epoch - self.delay) / self.every)

    def spec(self) -> str:
        return f"stepdecay:{self.start:g}:{self.gamma:g}:{self.delay:g}:{self.every:g}"


_KINDS: dict[str, tuple[type[Schedule], int]] = {
    "const": (Constant, 1),
    "linear": (Linear, 2),
    "exp": (Exponential, 2),
    "decay": (Decay, 2),
    "stepdecay": (StepDecay, 4),
}


def parse(text: str | float | Schedule) -> Schedule:
    """Turn ``"linear:1:10"`` (or a number, or a Schedule) into a Schedule."""
    if isinstance(text, Schedule):
        return text
    if isinstance(text, int | float):
        return Constant(float(text))
    kind, _, rest = str(text).partition(":")
    if kind not in _KINDS:
        valid = ", ".join(f"{k}:..." for k in _KINDS)
        raise SigngradError(f"unknown schedule '{text}'; valid forms: {valid}")
    cls, arity = _KINDS[kind]
    parts = rest.split(":") if rest else []
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != arity or not all(math.isfinite(v) for v in values):
        raise SigngradError(f"schedule '{text}' needs {arity} finite number(s) after '{kind}:'")
    return cls(*values)
