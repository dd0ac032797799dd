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

Every number must be finite, and so must everything a schedule computes from them; a
decay's factor G lies in (0, 1] (it decays), ``exp`` needs positive ends, ``stepdecay``
D >= 0 and E > 0. :meth:`Schedule.check_above` tells whether every value the schedule
takes, over a run of any length, clears a bound (quantizers use it for their sharpness).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from signgrad.errors import SigngradError
from signgrad.registry import Registry


class Schedule:
    """A value as a function of training progress."""

    def __call__(self, epoch: float, total_epochs: int) -> float:
        raise NotImplementedError

    def spec(self) -> str:
        """The text form that :func:`parse` turns back into this schedule."""
        raise NotImplementedError

    def ends(self) -> tuple[float, float, bool] | None:
        """(first value, limit, whether the limit is reached): every value lies between the
        two, as the built-in schedules are monotone. None where unknown (user schedules)."""
        return None

    def check_above(self, what: str, minimum: float, strict: bool) -> None:
        """Raise SigngradError unless every value is >= ``minimum`` (> with ``strict``);
        ``what`` names the value in the message."""
        ends = self.ends()
        if ends is None:
            return
        first, limit, reached = ends
        low = min(first, limit)
        # A decay only approaches its limit: 0 is never taken by decay:1:0.5.
        low_taken = first <= limit or reached
        ok = low > minimum or (low == minimum and not (strict and low_taken))
        if not ok:
            need = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise SigngradError(
                f"{what} must stay {need} throughout training; the schedule {self.spec()} "
                f"goes down to {low:g}"
            )


def _finite(kind: str, **values: float) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise SigngradError(
            f"{kind} schedule needs finite numbers, got "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
        )


def _progress(epoch: float, total_epochs: int) -> float:
    # The last epoch (total - 1) reaches the end value, so a run ends at its target.
    if total_epochs <= 1:
        return 1.0
    return min(max(epoch / (total_epochs - 1), 0.0), 1.0)


@dataclass(frozen=True)
class Constant(Schedule):
    value: float

    def __post_init__(self) -> None:
        _finite("const", value=self.value)

    def ends(self) -> tuple[float, float, bool]:
        return self.value, self.value, True

    def __call__(self, epoch: float, total_epochs: int) -> float:
        return self.value

    def spec(self) -> str:
        return f"const:{self.value:g}"


@dataclass(frozen=True)
class Linear(Schedule):
    start: float
    end: float

    def __post_init__(self) -> None:
        # end - start must not overflow either: it is what the schedule computes with.
        _finite("linear", start=self.start, end=self.end, difference=self.end - self.start)

    def ends(self) -> tuple[float, float, bool]:
        return self.start, self.end, True

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
        _finite("exp", start=self.start, end=self.end)
        if self.start <= 0 or self.end <= 0:
            raise SigngradError(f"exp schedule needs positive ends, got {self.start}:{self.end}")
        _finite("exp", ratio=self.end / self.start)

    def ends(self) -> tuple[float, float, bool]:
        return self.start, self.end, True

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
        _finite("decay", start=self.start, gamma=self.gamma)
        # A factor above 1 grows without bound (to inf in a long enough run).
        if not 0 < self.gamma <= 1:
            raise SigngradError(f"decay schedule needs a factor in (0, 1], got {self.gamma}")

    def ends(self) -> tuple[float, float, bool]:
        return (self.start, self.start, True) if self.gamma == 1 else (self.start, 0.0, False)

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
        _finite("stepdecay", start=self.start, gamma=self.gamma, delay=self.delay, every=self.every)
        if not 0 < self.gamma <= 1 or self.every <= 0 or self.delay < 0:
            raise SigngradError(
                f"stepdecay schedule needs a factor in (0, 1], delay >= 0 and every > 0, got "
                f"{self.gamma}, {self.delay}, {self.every}"
            )

    def ends(self) -> tuple[float, float, bool]:
        return (self.start, self.start, True) if self.gamma == 1 else (self.start, 0.0, False)

    def __call__(self, epoch: float, total_epochs: int) -> float:
        return self.start * self.gamma ** math.floor(max(0.0, epoch - self.delay) / self.every)

    def spec(self) -> str:
        return f"stepdecay:{self.start:g}:{self.gamma:g}:{self.delay:g}:{self.every:g}"


#: The kinds of schedule by name (the text before the first ``:``), each with the form of
#: its text as summary.
KINDS: Registry[type[Schedule]] = Registry("schedule")
for _cls, _form in [
    (Constant, "const:V"),
    (Linear, "linear:A:B"),
    (Exponential, "exp:A:B"),
    (Decay, "decay:A:G"),
    (StepDecay, "stepdecay:A:G:D:E"),
]:
    KINDS.register(_form.partition(":")[0], _cls, summary=_form)


def forms() -> str:
    """``"const:V, linear:A:B, ..."``: the text forms :func:`parse` reads."""
    return ", ".join(form for _, form in KINDS.summaries())


def parse(text: str | float | Schedule) -> Schedule:
    """Turn ``"linear:1:10"`` (or a number, or a Schedule) into a Schedule."""
    if isinstance(text, Schedule):
        return text
    if isinstance(text, int | float):
        return Constant(float(text))
    kind, _, rest = str(text).partition(":")
    if kind not in KINDS:
        raise SigngradError(f"unknown schedule '{text}'; valid forms: {forms()}")
    cls = KINDS.get(kind)
    arity = len(dataclasses.fields(cls))
    parts = rest.split(":") if rest else []
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != arity or not all(math.isfinite(v) for v in values):
        raise SigngradError(f"schedule '{text}' needs {arity} finite number(s) after '{kind}:'")
    return cls(*values)
