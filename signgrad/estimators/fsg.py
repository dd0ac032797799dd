"""FSG: Fast and Slow Gradient generation (Chen et al., AAAI 2025), as the paper
describes it.

For every binarized layer:

* the Historical Gradient Storage keeps the last L natural gradients of every weight;
* the fast-net scales the current gradient by an MLP of the pre-quantized weight:
  f = g * MLP_fast(W~) (1 -> h -> h -> 1, applied per coordinate);
* the slow-net reads each weight's *own* gradient history, with the layer's learned
  Layer Recognition Embedding (LRE) as the first token: s = SlowNet([LRE, g_{t-L+1}, ...,
  g_t]) at the last position. It is a Mamba block (or an LSTM/GRU);
* the gradient is g^ = beta * s + (1 - beta) * f, calibrated to W, and is used both in
  the look-ahead forward pass and in the real update (:mod:`signgrad.estimators.base`).

Where signgrad departs from the authors' code (see ALGORITHMS.md, section 3):

* the slow-net runs over n sequences of length L + 1 (one per weight), not over one
  sequence of length L * n + 1 that mixes neighbouring weights;
* the real update uses beta * s + (1 - beta) * f; ``update="fast"`` reproduces the
  reference code, which updates the weights from the fast gradient only;
* the fast-net has an activation (``fast_activation``, default ReLU); ``"none"`` is the
  reference code's activation-free MLP, which is one affine map of W~;
* ``normalize=True`` (default) feeds the slow-net each layer's history divided by its
  root mean square and multiplies the output back: natural gradients are ~1e-3 and a
  Mamba block's gated output is quadratic in small inputs, so without it the slow
  gradient vanishes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from signgrad.errors import SigngradError
from signgrad.estimators.base import LearnedEstimator, coordinate_mlp
from signgrad.estimators.mamba import Mamba

SLOW_NETS = ("mamba", "lstm", "gru")
PARTS = ("both", "fast", "slow")
UPDATES = ("combined", "fast")


class _RecurrentSlowNet(nn.Module):
    """LSTM or GRU over the sequence, a linear read-out of the last hidden state."""

    def __init__(self, kind: str, hidden: int) -> None:
        super().__init__()
        rnn = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = rnn(1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def last(self, x: Tensor) -> Tensor:
        y, _ = self.rnn(x)
        return self.out(y[:, -1])


class FSG(LearnedEstimator):
    """FSG estimator; the defaults are signgrad's fast ``fsg`` preset."""

    name = "fsg"

    def __init__(
        self,
        model: nn.Module,
        *,
        history: int = 5,
        beta: float = 0.9,
        parts: str = "both",
        update: str = "combined",
        slow: str = "mamba",
        d_inner: int = 8,
        d_state: int = 4,
        d_conv: int = 4,
        dt_rank: int = 1,
        slow_hidden: int = 16,
        fast_hidden: int = 16,
        fast_activation: str = "relu",
        lre: bool = True,
        normalize: bool = True,
        fast_lr: float = 1e-2,
        slow_lr: float = 1e-3,
        chunk_size: int | None = None,
    ) -> None:
        self.history_length = history
        super().__init__(model)
        if slow not in SLOW_NETS:
            raise SigngradError(f"unknown slow-net '{slow}'; valid: {', '.join(SLOW_NETS)}")
        if parts not in PARTS:
            raise SigngradError(f"unknown parts '{parts}'; valid: {', '.join(PARTS)}")
        if update not in UPDATES:
            raise SigngradError(f"unknown update '{update}'; valid: {', '.join(UPDATES)}")
        if not 0.0 <= beta <= 1.0:
            raise SigngradError(f"beta must be in [0, 1], got {beta}")
        # fast-only and slow-only are the ablations beta = 0 and beta = 1 without the
        # unused network.
        self.beta = {"both": beta, "fast": 0.0, "slow": 1.0}[parts]
        self.parts, self.update, self.normalize = parts, update, normalize
        self.fast_lr, self.slow_lr = fast_lr, slow_lr
        self.fast = coordinate_mlp(fast_hidden, fast_activation) if parts != "slow" else None
        self.slow: nn.Module | None = None
        self.lre: nn.Parameter | None = None
        if parts != "fast":
            if slow == "mamba":
                self.slow = Mamba(
                    d_model=1, d_inner=d_inner, d_state=d_state, d_conv=d_conv,
                    dt_rank=dt_rank, chunk_size=chunk_size,
                )  # fmt: skip
            else:
                self.slow = _RecurrentSlowNet(slow, slow_hidden)
            if lre:
                self.lre = nn.Parameter(torch.randn(len(self.layers), 1))
        self._fast_out: list[Tensor | None] = [None] * len(self.layers)
        self.finish_init()

    def make_meta_optimizer(self) -> torch.optim.Optimizer:
        groups = []
        if self.fast is not None:
            groups.append({"params": list(self.fast.parameters()), "lr": self.fast_lr})
        if self.slow is not None:
            slow = list(self.slow.parameters()) + ([self.lre] if self.lre is not None else [])
            groups.append({"params": slow, "lr": self.slow_lr})
        return torch.optim.Adam(groups)

    def slow_gradient(self, i: int) -> Tensor:
        """s for every weight of layer ``i`` from its own history, shape (n,)."""
        seq = self.histories[i].sequence()  # (n, L), oldest first
        scale = seq.pow(2).mean().sqrt().clamp_min(1e-12) if self.normalize else None
        tokens = (seq / scale if scale is not None else seq).unsqueeze(-1)
        if self.lre is not None:
            front = self.lre[i].expand(tokens.shape[0], 1, 1)
            tokens = torch.cat([front, tokens], dim=1)
        s = self.slow.last(tokens).squeeze(-1)
        return s * scale if scale is not None else s

    def gradient(self, i: int, w_tilde: Tensor) -> Tensor:
        g = self.histories[i].latest()
        ghat = torch.zeros_like(g)
        if self.fast is not None:
            f = g * self.fast(w_tilde.unsqueeze(1)).squeeze(1)
            self._fast_out[i] = f.detach()
            ghat = ghat + (1 - self.beta) * f
        if self.slow is not None:
            ghat = ghat + self.beta * self.slow_gradient(i)
        return ghat

    def update_gradient(self, i: int, ghat: Tensor) -> Tensor:
        if self.update == "combined" or self._fast_out[i] is None:
            return ghat
        # The reference code's real update: the fast gradient alone, calibrated.
        layer = self.layers[i]
        q, w = layer.weight_quantizer, layer.weight.detach()
        return self._fast_out[i].reshape(w.shape) * q.derivative(w, q.sharpness)

    def end_step(self) -> int:
        fallbacks = super().end_step()
        self._fast_out = [None] * len(self.layers)
        return fallbacks

    def extra_state(self) -> dict[str, Any]:
        return {}


#: The paper's sizes (ALGORITHMS.md, section 3); chunking bounds the slow-net's memory.
PAPER = {
    "history": 5,
    "d_inner": 100,
    "d_state": 16,
    "d_conv": 8,
    "dt_rank": 1,
    "fast_hidden": 100,
    "beta": 0.9,
    "fast_lr": 1e-2,
    "slow_lr": 1e-3,
    "chunk_size": 16384,
}
