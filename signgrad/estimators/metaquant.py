"""MetaQuant (Chen, Wang, Pan, NeurIPS 2019): the learned-gradient baselines.

A meta network M_phi, applied to every coordinate, turns the natural gradient g into the
gradient of the pre-quantized weights W~:

* FC-Grad:  M = MLP(g)
* MultiFC:  M = g * MLP(W~)
* LSTMFC:   M = g * MLP(LSTM(W~)), the LSTM's hidden state kept per coordinate and carried
  from step to step (part of the estimator's state)

MLPs have ``depth`` linear layers 1 -> hidden -> ... -> 1 (default three, hidden 100,
a ReLU between them, with biases except in FC-Grad, whose MLP reads g itself; LSTMFC's
head reads the LSTM's hidden vector); phi is trained by the meta-weight trick of
:mod:`signgrad.estimators.base` with Adam (1e-3).

``start="identity"`` (default) makes g^ at the first step exactly g: the MLP that
multiplies g starts at 1 (MultiFC, LSTMFC), and FC-Grad becomes g + MLP(g) with the MLP
starting at 0 (its last layer zero, as a residual branch starts). ``start="random"`` is
PyTorch's default init of MLP(g) and g * MLP(...), whose first g^ points anywhere: the
sign of its cosine with the straight-through gradient is a coin flip across seeds.

``lookahead="lagged"`` is the authors' code: the forward pass computes with the value
W - (lr / lr_prev) * (W_prev - W), the previous step applied a second time (W_prev: the
weights before it, lr_prev: its learning rate; the straight-through step lr * B'(W) * g
after the first step, which updates nothing), while the meta-gradient flows as through
W - lr * g^ (g^ enters with a zero value). ``"current"`` (default) is the paper's
W' = W - lr * g^, value and gradient alike.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from signgrad.errors import SigngradError
from signgrad.estimators.base import (
    ACTIVATIONS,
    FLOAT_BYTES,
    PARAM_COPIES,
    STARTS,
    STEP_NORMS,
    W_TILDES,
    LearnedEstimator,
    check_choice,
    check_int,
    check_number,
    coordinate_mlp,
    mlp,
    mlp_parameters,
    start_constant,
)

LOOKAHEADS = ("current", "lagged")


class _MetaQuant(LearnedEstimator):
    """What the three MetaQuant estimators share: their settings, checked (ranges, then
    memory) before any meta-network is built, one Adam over the meta-networks, and the
    look-ahead of the authors' code (``lookahead="lagged"``)."""

    size_keys = ("hidden",)
    legacy_settings = {"start": "random"}
    #: What the MLP starts at with ``start="identity"``: 1 where it multiplies g.
    identity_output = 1.0

    def __init__(
        self,
        model: nn.Module,
        hidden: int = 100,
        activation: str = "relu",
        meta_lr: float = 1e-3,
        start: str = "identity",
        depth: int = 3,
        bias: bool = True,
        lookahead: str = "current",
        w_tilde: str = "current",
        step_norm: str = "learned",
    ) -> None:
        settings = {k: v for k, v in locals().items() if k not in ("self", "model", "__class__")}
        self.validate(settings)  # before the model's layers are touched
        super().__init__(model)
        self._check_settings(settings)
        self.settings = settings
        self.meta_lr, self.start, self.lagged = meta_lr, start, lookahead == "lagged"
        self.w_tilde = w_tilde
        self.step_norm = step_norm
        # lookahead="lagged": the latent weights and the learning rate of the last step
        self._prev_weights: list[Tensor | None] = [None] * len(self.layers)
        self._prev_lr: float | None = None
        self.build_nets()
        self.finish_init()

    def build_nets(self) -> None:
        """Build the method's meta-networks from ``self.settings``."""
        raise NotImplementedError

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        check_int(cls.name, "hidden", settings["hidden"])
        check_int(cls.name, "depth", settings["depth"], cls.min_depth)
        check_choice(cls.name, "activation", settings["activation"], ACTIVATIONS)
        check_number(cls.name, "meta_lr", settings["meta_lr"], 0.0)  # 0: a frozen meta-network
        check_choice(cls.name, "start", settings["start"], STARTS)
        check_choice(cls.name, "lookahead", settings["lookahead"], LOOKAHEADS)
        check_choice(cls.name, "w_tilde", settings["w_tilde"], W_TILDES)
        check_choice(cls.name, "step_norm", settings["step_norm"], STEP_NORMS)
        if not isinstance(settings["bias"], bool):
            raise SigngradError(f"{cls.name}: bias must be true or false, got {settings['bias']!r}")
        if settings["start"] == "identity" and not settings["bias"] and cls.identity_output:
            raise SigngradError(
                f"{cls.name}: start=identity needs bias=true (without a bias the MLP "
                "cannot start at a constant 1); use start=random"
            )

    #: The fewest linear layers the method's MLP may have.
    min_depth = 2

    def make_meta_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.meta_lr)

    def lookahead(self, i: int, lr: float, ghat: Tensor) -> Tensor:
        if not self.lagged:
            return lr * ghat
        w = self.layers[i].latent_weight().detach()
        prev = self._prev_weights[i]
        if prev is None or self._prev_lr is None or torch.equal(prev, w):
            # The step before updated nothing: the reference's forward value is the
            # straight-through step of the gradient g^ is built from.
            value = lr * self.calibrate(i, self.histories[i].latest(), w)
        else:
            value = (lr / self._prev_lr) * (prev - w)
        return lr * ghat + (value - lr * ghat).detach()

    def begin_step(self, lr: float) -> None:
        super().begin_step(lr)
        if self.lagged:
            self._prev_weights = [lay.latent_weight().detach().clone() for lay in self.layers]
            self._prev_lr = lr

    def extra_state(self) -> dict[str, Any]:
        if not self.lagged:
            return {}
        return {"prev_weights": list(self._prev_weights), "prev_lr": self._prev_lr}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.lagged and "prev_weights" in state:
            self._prev_weights = self.per_layer(state["prev_weights"], "prev_weights")
            self._prev_lr = None if state["prev_lr"] is None else float(state["prev_lr"])


class FCGrad(_MetaQuant):
    """MetaQuant FC-Grad: g^ = MLP(g) (identity start: g + MLP(g), the MLP at 0).

    Its MLP has no biases by default (``bias=False``): MLP(0) is then 0, so a weight
    without gradient gets no step. With biases, MLP(0) is a learned step that does not
    depend on the gradient; under the protocol of docs/estimators.md it grew into almost
    the whole applied gradient (drift 0.86 over the first 10 steps, STE's 0.04) and every
    seed's training collapsed.
    """

    name = "metaquant-fc"
    identity_output = 0.0  # g^ = g + MLP(g) = g
    # _MetaQuant's constructor with bias=False as the default (keyword-only through
    # partialmethod); a checkpoint from before settings were recorded had biases
    __init__ = functools.partialmethod(_MetaQuant.__init__, bias=False)
    legacy_settings = {**_MetaQuant.legacy_settings, "bias": True}

    def build_nets(self) -> None:
        s = self.settings
        self.net = coordinate_mlp(s["hidden"], s["activation"], s["depth"], s["bias"])
        if self.start == "identity":
            start_constant(self.net, self.identity_output)

    @classmethod
    def memory_needed(cls, weights: int, settings: dict[str, Any]) -> int:
        h = settings["hidden"]
        # Autograd keeps ~4 hidden vectors per weight (two linear outputs, two activations);
        # history, natural gradient, g^ and its calibration are 4 more numbers per weight.
        params = mlp_parameters(h, settings["depth"], bias=settings["bias"])
        floats = PARAM_COPIES * params + weights * (4 * h + 4)
        return FLOAT_BYTES * floats

    def gradient(self, i: int, w_tilde: Tensor) -> Tensor:
        g = self.histories[i].latest()
        out = self.net(g.unsqueeze(1)).squeeze(1)
        return g + out if self.start == "identity" else out


class MultiFC(FCGrad):
    """MetaQuant MultiFC: g^ = g * MLP(W~) (identity start: the MLP at 1)."""

    name = "metaquant-multifc"
    identity_output = 1.0
    # g multiplies the MLP, so its biases cannot step a weight without gradient (and the
    # identity start needs them)
    __init__ = functools.partialmethod(_MetaQuant.__init__, bias=True)

    def gradient(self, i: int, w_tilde: Tensor) -> Tensor:
        g = self.histories[i].latest()
        return g * self.net(w_tilde.unsqueeze(1)).squeeze(1)


class LSTMFC(_MetaQuant):
    """MetaQuant LSTMFC: g^ = g * MLP(LSTM(W~)), one LSTM state per coordinate.

    The MLP has ``depth`` layers hidden -> ... -> 1 (the identity start: it starts at 1).

    The state after each step is kept (detached) and continues at the next step: the
    meta-gradient flows through the current step's cell only (truncated back-propagation
    through time, as in the reference code).
    """

    name = "metaquant-lstm"
    min_depth = 1

    def build_nets(self) -> None:
        s = self.settings
        self.hidden = s["hidden"]
        self.cell = nn.LSTMCell(1, self.hidden)
        self.head = mlp(self.hidden, self.hidden, s["activation"], s["depth"], s["bias"])
        if self.start == "identity":
            start_constant(self.head, 1.0)
        self.states: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)

    @classmethod
    def memory_needed(cls, weights: int, settings: dict[str, Any]) -> int:
        h = settings["hidden"]
        cell = 4 * h * (1 + h) + 8 * h  # LSTMCell(1, h)
        head = mlp_parameters(h, settings["depth"], inputs=h, bias=settings["bias"])
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
        return {
            **super().extra_state(),
            "states": [None if s is None else list(s) for s in self.states],
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.states = [None if s is None else (s[0], s[1]) for s in state["states"]]


#: The authors' code (MetaQuant, HEAD of its public repository): bias-free linear meta-nets
#: without a non-linearity (FC-Grad two layers, MultiFC three), LSTMFC's head one Linear
#: layer with bias, PyTorch's default init, the lagged look-ahead; hidden 100, Adam 1e-3.
REFERENCE = {
    "metaquant-fc": {"depth": 2, "bias": False, "activation": "none", "start": "random",
                     "lookahead": "lagged", "w_tilde": "previous"},
    "metaquant-multifc": {"depth": 3, "bias": False, "activation": "none", "start": "random",
                          "lookahead": "lagged", "w_tilde": "previous"},
    "metaquant-lstm": {"depth": 1, "bias": True, "activation": "none", "start": "random",
                       "lookahead": "lagged", "w_tilde": "previous"},
}  # fmt: skip
