"""MetaQuant (Chen, Wang, Pan, NeurIPS 2019): the learned-gradient baselines.

A meta network M_phi, applied to every coordinate, turns the natural gradient g into the
gradient of the pre-quantized weights W~:

* FC-Grad:  M = MLP(g)
* MultiFC:  M = g * MLP(W~)
* LSTMFC:   M = g * MLP(LSTM(W~)), the LSTM's hidden state kept per coordinate and carried
  from step to step (part of the estimator's state)

MLPs are 1 -> hidden -> hidden -> 1 (three linear layers, hidden 100 by default); phi is
trained by the meta-weight trick of :mod:`signgrad.estimators.base` with Adam (1e-3).

``start="identity"`` (default) makes g^ at the first step exactly g: the MLP that
multiplies g starts at 1 (MultiFC, LSTMFC), and FC-Grad becomes g + MLP(g) with the MLP
starting at 0 (its last layer zero, as a residual branch starts). ``start="random"`` is
PyTorch's default init of MLP(g) and g * MLP(...), whose first g^ points anywhere: the
sign of its cosine with the straight-through gradient is a coin flip across seeds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from signgrad.estimators.base import (
    ACTIVATIONS,
    FLOAT_BYTES,
    PARAM_COPIES,
    STARTS,
    LearnedEstimator,
    check_choice,
    check_int,
    check_number,
    coordinate_mlp,
    mlp_parameters,
    start_constant,
)


class _MetaQuant(LearnedEstimator):
    """What the three MetaQuant estimators share: their settings, checked (ranges, then
    memory) before any meta-network is built, and one Adam over the meta-networks."""

    size_keys = ("hidden",)
    legacy_settings = {"start": "random"}

    def __init__(
        self,
        model: nn.Module,
        hidden: int = 100,
        activation: str = "relu",
        meta_lr: float = 1e-3,
        start: str = "identity",
    ) -> None:
        settings = {"hidden": hidden, "activation": activation, "meta_lr": meta_lr}
        settings["start"] = start
        self.validate(settings)  # before the model's layers are touched
        super().__init__(model)
        self._check_settings(settings)
        self.settings = settings
        self.meta_lr, self.start = meta_lr, start

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        check_int(cls.name, "hidden", settings["hidden"])
        check_choice(cls.name, "activation", settings["activation"], ACTIVATIONS)
        check_number(cls.name, "meta_lr", settings["meta_lr"], 0.0)  # 0: a frozen meta-network
        check_choice(cls.name, "start", settings["start"], STARTS)

    def make_meta_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.meta_lr)


class FCGrad(_MetaQuant):
    """MetaQuant FC-Grad: g^ = MLP(g) (identity start: g + MLP(g), the MLP at 0)."""

    name = "metaquant-fc"
    #: What the MLP starts at with ``start="identity"``: g^ = g + MLP(g) = g.
    identity_output = 0.0

    def __init__(
        self,
        model: nn.Module,
        hidden: int = 100,
        activation: str = "relu",
        meta_lr: float = 1e-3,
        start: str = "identity",
    ) -> None:
        super().__init__(model, hidden, activation, meta_lr, start)
        self.net = coordinate_mlp(hidden, activation)
        if start == "identity":
            start_constant(self.net, self.identity_output)
        self.finish_init()

    @classmethod
    def memory_needed(cls, weights: int, settings: dict[str, Any]) -> int:
        h = settings["hidden"]
        # Autograd keeps ~4 hidden vectors per weight (two linear outputs, two activations);
        # history, natural gradient, g^ and its calibration are 4 more numbers per weight.
        floats = PARAM_COPIES * mlp_parameters(h) + weights * (4 * h + 4)
        return FLOAT_BYTES * floats

    def gradient(self, i: int, w_tilde: Tensor) -> Tensor:
        g = self.histories[i].latest()
        out = self.net(g.unsqueeze(1)).squeeze(1)
        return g + out if self.start == "identity" else out


class MultiFC(FCGrad):
    """MetaQuant MultiFC: g^ = g * MLP(W~) (identity start: the MLP at 1)."""

    name = "metaquant-multifc"
    identity_output = 1.0

    def gradient(self, i: int, w_tilde: Tensor) -> Tensor:
        g = self.histories[i].latest()
        return g * self.net(w_tilde.unsqueeze(1)).squeeze(1)


class LSTMFC(_MetaQuant):
    """MetaQuant LSTMFC: g^ = g * MLP(LSTM(W~)), one LSTM state per coordinate (identity
    start: the MLP at 1).

    The state after each step is kept (detached) and continues at the next step: the
    meta-gradient flows through the current step's cell only (truncated back-propagation
    through time, as in the reference code).
    """

    name = "metaquant-lstm"

    def __init__(
        self,
        model: nn.Module,
        hidden: int = 100,
        activation: str = "relu",
        meta_lr: float = 1e-3,
        start: str = "identity",
    ) -> None:
        super().__init__(model, hidden, activation, meta_lr, start)
        self.hidden = hidden
        self.cell = nn.LSTMCell(1, hidden)
        self.head = coordinate_mlp(hidden, activation, depth=3)
        # The head reads the LSTM's hidden vector, not a scalar.
        self.head[0] = nn.Linear(hidden, hidden)
        if start == "identity":
            start_constant(self.head, 1.0)
        self.states: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self.finish_init()

    @classmethod
    def memory_needed(cls, weights: int, settings: dict[str, Any]) -> int:
        h = settings["hidden"]
        cell = 4 * h * (1 + h) + 8 * h  # LSTMCell(1, h)
        head = 2 * (h * h + h) + h + 1  # h -> h -> h -> 1
        # Per weight: the kept (h, c) state, the cell's gates and outputs (~6h), the
        # head's activations (~4h), and the history / gradients.
        floats = PARAM_COPIES * (cell + head) + weights * (12 * h + 4)
        return FLOAT_BYTES * floats

    def gradient(self, i: int, w_tilde: Tensor) -> Tensor:
        g = self.histories[i].latest()
        h, c = self.cell(w_tilde.unsqueeze(1), self.states[i])
        self.states[i] = (h.detach(), c.detach())
        return g * self.head(h).squeeze(1)

    def extra_state(self) -> dict[str, Any]:
        return {"states": [None if s is None else list(s) for s in self.states]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.states = [None if s is None else (s[0], s[1]) for s in state["states"]]
