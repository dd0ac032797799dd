"""Optimizers and learning-rate schedules, by name.

:data:`OPTIMIZERS` builds a ``torch.optim`` optimizer from parameter groups and the
settings its builder names (which :func:`signgrad.builders.make_optimizer` takes from the
run's configuration); the default ``lr`` of each is the configuration's default.
:data:`LR_SCHEDULES` holds the learning rate as a pure function of the global step, so a
resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from signgrad.registry import Registry

#: Optimizers by name: builders taking the parameter groups and keyword settings.
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry(
    "optimizer", inputs=("params",)
)


@OPTIMIZERS.register("adam")
def adam(
    params: Iterable[Any], *, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999)
) -> torch.optim.Optimizer:
    """Adam (Kingma and Ba 2015)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas))


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[Any], *, lr: float = 0.1, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (plain SGD at momentum 0)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


#: Learning-rate schedules by name: functions of (base lr, global step, steps per epoch,
#: epochs) and keyword settings.
LR_SCHEDULES: Registry[Callable[..., float]] = Registry(
    "lr schedule", inputs=("lr", "step", "steps_per_epoch", "epochs")
)


@LR_SCHEDULES.register("cosine")
def cosine(lr: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """lr * (1 + cos(pi * step / steps)) / 2: from lr to 0 over the run."""
    return 0.5 * lr * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch)))


@LR_SCHEDULES.register("step")
def stepwise(
    lr: float,
    step: int,
    steps_per_epoch: int,
    epochs: int,
    *,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """lr * gamma ** (milestones passed); no milestones: at 50% and 75% of the epochs."""
    milestones = list(milestones) or [epochs // 2, (3 * epochs) // 4]
    epoch = step // steps_per_epoch
    return lr * gamma ** sum(epoch >= m for m in milestones)


@LR_SCHEDULES.register("linear")
def linear(lr: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """lr * (1 - step / steps): from lr to 0 in a straight line (ReActNet's decay)."""
    return lr * (1 - step / (epochs * steps_per_epoch))


@LR_SCHEDULES.register("constant")
def constant(lr: float, step: int, steps_per_epoch: int, epochs: int) -> float:
    """lr throughout."""
    return lr
