"""FSG: Fast and Slow Gradient generation (Chen et al., AAAI 2025), as the paper
describes it.

For every binarized layer:

* the Historical Gradient Storage keeps the last L natural gradients of every weight;
* the fast-net scales the current gradient by an MLP of the pre-quantized weight:
  f = g * MLP_fast(W~) (1 -> h -> h -> 1, applied per coordinate);
* the slow-net reads each weight's *own* gradient history, with the layer's learned
  Layer Recognition Embedding (LRE) added to every token (``lre_feed="input"``) or as
  the first token (``"front"``, the paper's). It is a Mamba block (or an LSTM/GRU),
  evaluated in one of two ways (``mode``):

  - ``"window"``: every step, the slow-net reads [g_{t-L+1}, ..., g_t] (L + 1 tokens with
    the LRE in front) at the last position (the paper's HGS of length L);
  - ``"stream"`` (default): the recurrent form of the same block, its state per weight
    carried from step to step like an optimizer state; every step feeds one token, g_t,
    so the slow-net reads the whole history. The meta-gradient flows through the current
    token (truncated back-propagation through time, like LSTMFC), which is why the LRE
    is an input of every token there: as the first token it would be learned once;

* the gradient combines them (``slow_form``): ``"gate"`` (default) s = g * (1 + S), S the
  slow-net's output, g^ = beta * s + (1 - beta) * f, so the slow gradient changes sign
  with g; ``"direct"`` (the paper's) s = S itself. g^ is calibrated to W and used both in
  the look-ahead forward pass and in the real update (:mod:`signgrad.estimators.base`);
* ``start="identity"`` (default) starts the fast-net at 1 and the slow-net's read-out at
  0, so the first g^ is exactly the straight-through gradient; ``"random"`` is PyTorch's
  init.

Where signgrad departs from the authors' reference code (docs/methods.md says why):

* the slow-net runs over n sequences of length L + 1 (one per weight), not over one
  sequence of length L * n + 1 that mixes neighbouring weights;
* the real update uses beta * s + (1 - beta) * f; ``update="fast"`` reproduces the
  reference code, which updates the weights from the fast gradient only;
* the fast-net has an activation (``fast_activation``, default ReLU); ``"none"`` is the
  reference code's activation-free MLP, which is one affine map of W~;
* all layers are batched into one call of each meta-network (ResNet-20's layers are too
  small for one call per layer to be efficient);
* ``normalize=True`` (default) feeds the slow-net each layer's history divided by its
  root mean square (and multiplies a direct slow gradient back; a gate is scale-free):
  natural gradients are ~1e-3 and a Mamba block's gated output is quadratic in small
  inputs, so without it the slow gradient vanishes.

:data:`REFERENCE` (the ``fsg-ref`` preset) switches all of these back to the authors'
code but the first, and :data:`PAPER` (``fsg-paper``) is the paper's form and sizes.
"""

from __future__ import annotations

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
    mlp_parameters,
    start_constant,
)
from signgrad.estimators.mamba import Mamba, MambaState

SLOW_NETS = ("mamba", "lstm", "gru")
MODES = ("window", "stream")
PARTS = ("both", "fast", "slow")
UPDATES = ("combined", "fast")
SLOW_FORMS = ("gate", "direct")
LRE_FEEDS = ("input", "front")


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

    def step(
        self, u: Tensor, state: tuple[Tensor, ...] | None
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        hx = state if state is None or isinstance(self.rnn, nn.LSTM) else state[0]
        y, new = self.rnn(u.unsqueeze(1), hx)
        return self.out(y[:, 0]), new if isinstance(new, tuple) else (new,)


class FSG(LearnedEstimator):
    """FSG estimator; the defaults are signgrad's ``fsg`` preset, ``PAPER`` the paper's.

    The defaults (stream mode, Mamba d_inner 2, d_state 1, d_conv 2, fast hidden 8) were
    chosen from ``benchmarks/estimators.py`` to keep a ResNet-20 step near 1.3x the STE
    step on a 2-core CPU; docs/estimators.md has the measurements.
    """

    name = "fsg"
    legacy_settings = {"start": "random", "slow_form": "direct", "lre_feed": "front"}
    size_keys = ("mode", "slow", "history", "d_inner", "d_state", "slow_hidden", "fast_hidden")

    def __init__(
        self,
        model: nn.Module,
        *,
        history: int = 5,
        beta: float = 0.9,
        parts: str = "both",
        update: str = "combined",
        slow: str = "mamba",
        d_inner: int = 2,
        d_state: int = 1,
        d_conv: int = 2,
        dt_rank: int = 1,
        slow_hidden: int = 4,
        fast_hidden: int = 8,
        fast_activation: str = "relu",
        lre: bool = True,
        normalize: bool = True,
        fast_lr: float = 1e-2,
        slow_lr: float = 1e-3,
        chunk_size: int | None = 16384,
        mode: str = "stream",
        start: str = "identity",
        slow_form: str = "gate",
        lre_feed: str = "input",
        fast_bias: bool = True,
        calibrate_slow: bool = True,
        w_tilde: str = "current",
        step_norm: str = "learned",
    ) -> None:
        # Every keyword but the model, as one dict (the first statement: nothing else yet).
        settings = {k: v for k, v in locals().items() if k not in ("self", "model", "__class__")}
        self.validate(settings)  # ranges first: nothing is built from a bad setting
        self.history_length = history
        super().__init__(model)
        self._check_settings(settings)  # memory, before any meta-network is allocated
        self.settings = settings
        self.start, self.slow_form, self.lre_feed = start, slow_form, lre_feed
        # fast-only and slow-only are the ablations beta = 0 and beta = 1 without the
        # unused network.
        self.beta = {"both": beta, "fast": 0.0, "slow": 1.0}[parts]
        self.parts, self.update, self.normalize, self.mode = parts, update, normalize, mode
        # stream mode: the slow-net's state for every coordinate of every layer, detached.
        self.state: list[Tensor] | None = None
        self.state_rows = 0
        self.fast_lr, self.slow_lr = fast_lr, slow_lr
        self.calibrate_slow, self.w_tilde = calibrate_slow, w_tilde
        self.step_norm = step_norm
        self._uncalibrated: list[Tensor | None] = [None] * len(self.layers)
        self.fast = None
        if parts != "slow":
            self.fast = coordinate_mlp(fast_hidden, fast_activation, bias=fast_bias)
        self.slow: nn.Module | None = None
        self.lre: nn.Parameter | None = None
        if parts != "fast":
            if slow == "mamba":
                self.slow = Mamba(
                    d_model=1,
                    d_inner=d_inner,
                    d_state=d_state,
                    d_conv=d_conv,
                    dt_rank=dt_rank,
                    chunk_size=chunk_size,
                )
            else:
                self.slow = _RecurrentSlowNet(slow, slow_hidden)
            if lre:
                self.lre = nn.Parameter(torch.randn(len(self.layers), 1))
        if start == "identity":
            # g^ = g at the first step: the fast factor starts at 1, the slow-net's
            # read-out at 0 (its out-projection zero, as a residual branch starts).
            if self.fast is not None:
                start_constant(self.fast, 1.0)
            if self.slow is not None:
                start_constant(self.slow.out_proj if slow == "mamba" else self.slow.out, 0.0)
        self._fast_out: list[Tensor | None] = [None] * len(self.layers)
        self.finish_init()

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        name = cls.name
        for key, label, valid in (
            ("slow", "slow-net", SLOW_NETS),
            ("parts", "parts", PARTS),
            ("update", "update", UPDATES),
            ("mode", "mode", MODES),
            ("fast_activation", "fast_activation", ACTIVATIONS),
            ("start", "start", STARTS),
            ("slow_form", "slow_form", SLOW_FORMS),
            ("lre_feed", "lre_feed", LRE_FEEDS),
            ("w_tilde", "w_tilde", W_TILDES),
            ("step_norm", "step_norm", STEP_NORMS),
        ):
            check_choice(name, label, settings[key], valid)
        ints = ("history", "d_inner", "d_state", "d_conv", "dt_rank", "slow_hidden", "fast_hidden")
        for key in ints:
            check_int(name, key, settings[key])
        if settings["chunk_size"] is not None:
            check_int(name, "chunk_size", settings["chunk_size"])
        check_number(name, "beta", settings["beta"], 0.0, 1.0)
        if settings["start"] == "identity" and not settings["fast_bias"]:
            raise SigngradError(
                f"{name}: start=identity needs fast_bias=true (without a bias the fast-net "
                "cannot start at a constant 1); use start=random"
            )
        if not settings["calibrate_slow"] and settings["slow_form"] != "direct":
            raise SigngradError(f"{name}: calibrate_slow=false needs slow_form=direct")
        for key in ("fast_lr", "slow_lr"):  # 0 freezes a meta-network: allowed
            check_number(name, key, settings[key], 0.0)
        for key in ("lre", "normalize", "fast_bias", "calibrate_slow"):
            if not isinstance(settings[key], bool):
                raise SigngradError(f"{name}: {key} must be true or false, got {settings[key]!r}")

    @classmethod
    def memory_needed(cls, weights: int, settings: dict[str, Any]) -> int:
        n, length = weights, settings["history"]
        # The history buffer, and the copy torch.cat makes of it when a gradient is pushed.
        floats = 2 * length * n + 4 * n
        if settings["parts"] != "slow":
            hidden = settings["fast_hidden"]
            floats += PARAM_COPIES * mlp_parameters(hidden) + 4 * hidden * n
        if settings["parts"] != "fast":
            floats += cls._slow_floats(n, settings)
        return FLOAT_BYTES * floats

    @staticmethod
    def _slow_floats(n: int, s: dict[str, Any]) -> int:
        """Floats the slow-net holds at once over ``n`` coordinates (lower bound)."""
        stream, tokens = s["mode"] == "stream", s["history"] + 1
        if s["slow"] != "mamba":
            h = s["slow_hidden"]
            params = 4 * h * (1 + h) + 8 * h + h + 1
            # Gates and outputs (~6h) per coordinate and token; stream also keeps the state.
            per_row = 6 * h + 2 * h if stream else 6 * h * tokens
            return PARAM_COPIES * params + n * per_row
        d, ds, k, r = s["d_inner"], s["d_state"], s["d_conv"], s["dt_rank"]
        params = d * (k + 2 * r + 3 * ds + 6)
        if stream:
            # step() runs every coordinate at once: the kept state (h and the conv inputs),
            # and the decay, h and the read-out of this token, each (n, d_inner, d_state).
            per_row = d * (ds + k - 1) + 3 * d * ds + (k + 8) * d
            return PARAM_COPIES * params + n * per_row
        # window: one chunk at a time is recomputed in backward (x, z, the conv taps, delta,
        # du and y per token; ~1 GiB measured for the paper's sizes on ResNet-20, with the
        # fast-net); the outputs of every chunk stay.
        rows = n if s["chunk_size"] is None else min(n, s["chunk_size"])
        per_row = tokens * ((k + 6) * d + 3 * ds)
        return PARAM_COPIES * params + rows * per_row + n * (tokens + 1)

    def make_meta_optimizer(self) -> torch.optim.Optimizer:
        groups = []
        if self.fast is not None:
            groups.append({"params": list(self.fast.parameters()), "lr": self.fast_lr})
        if self.slow is not None:
            slow = list(self.slow.parameters()) + ([self.lre] if self.lre is not None else [])
            groups.append({"params": slow, "lr": self.slow_lr})
        return torch.optim.Adam(groups)

    def gradients(self, ready: list[int], w_tildes: list[Tensor]) -> list[Tensor]:
        # All layers in one batch of coordinates: ResNet-20's layers hold 0.4k-37k weights
        # each, so per-layer calls would be dominated by per-operation overhead.
        sizes = [w.numel() for w in w_tildes]
        g = torch.cat([self.histories[i].latest() for i in ready])
        fast = None  # the fast factor: f = g * fast
        if self.fast is not None:
            fast = self.fast(torch.cat(w_tildes).unsqueeze(1)).squeeze(1)
            for i, part in zip(ready, (g * fast).detach().split(sizes), strict=True):
                self._fast_out[i] = part
        slow = None if self.slow is None else self.slow_output(ready, sizes)
        beta = self.beta
        if self.slow_form == "gate":
            # s = g * (1 + slow), f = g * fast, g^ = beta s + (1 - beta) f, written so that
            # it is exactly g when slow = 0 and fast = 1 (the identity start).
            factor = torch.ones_like(g)
            if slow is not None:
                factor = factor + beta * slow
            if fast is not None:
                factor = factor + (1 - beta) * (fast - 1)
            ghat = g * factor
        else:
            # The paper's form: the slow-net's output is the slow gradient itself (rescaled
            # to the gradients' size); the identity start adds it to g, as a residual.
            ghat = torch.zeros_like(g)
            if slow is not None:
                s_grad = slow + g if self.start == "identity" else slow
                if self.calibrate_slow:
                    ghat = ghat + beta * s_grad
                else:  # the reference code: added after the calibration (calibrated())
                    for i, part in zip(ready, (beta * s_grad).split(sizes), strict=True):
                        self._uncalibrated[i] = part
            if fast is not None:
                ghat = ghat + (1 - beta) * g * fast
        return list(ghat.split(sizes))

    def calibrated(self) -> list[Tensor | None]:
        out = super().calibrated()
        if self.calibrate_slow:
            return out
        for i, extra in enumerate(self._uncalibrated):
            if extra is not None and out[i] is not None:
                out[i] = out[i] + extra.reshape(out[i].shape)
        self._uncalibrated = [None] * len(self.layers)
        return out

    def slow_output(self, ready: list[int], sizes: list[int]) -> Tensor:
        """The slow-net's output for every weight of the layers ``ready``, each from its
        own history (concatenated): the gate of the gradient (``slow_form="gate"``, read
        from normalised histories) or the slow gradient itself (``"direct"``)."""
        if self.mode == "stream":
            tokens = torch.cat([self.histories[i].latest() for i in ready]).unsqueeze(-1)
        else:
            tokens = torch.cat([self.histories[i].sequence() for i in ready]).unsqueeze(-1)
        repeats = torch.tensor(sizes, device=tokens.device)
        scale = None
        if self.normalize:
            # Per layer: the root mean square of what the slow-net reads of that layer.
            rms = [t.pow(2).mean().sqrt() for t in tokens.split(sizes)]
            scale = torch.stack(rms).clamp_min(1e-12).repeat_interleave(repeats)
            tokens = tokens / scale.view(-1, *[1] * (tokens.dim() - 1))
        lre = None if self.lre is None else self.lre[ready].repeat_interleave(repeats, dim=0)
        if lre is not None and self.lre_feed == "input":
            # A per-layer input added to every token: learned at every step in both modes.
            tokens = tokens + lre.view(-1, *[1] * (tokens.dim() - 1))
            lre = None
        if self.mode == "stream":
            s = self._stream(tokens, lre)
        else:
            if lre is not None:
                tokens = torch.cat([lre.unsqueeze(1), tokens], dim=1)
            s = self.slow.last(tokens).squeeze(-1)
        # A gate multiplies g, so it is scale-free; a slow gradient takes the layer's scale.
        return s * scale if scale is not None and self.slow_form == "direct" else s

    def _stream(self, token: Tensor, front: Tensor | None) -> Tensor:
        """The recurrent form: one token per step, the state carried from step to step;
        ``front`` (``lre_feed="front"``) opens every coordinate's sequence."""
        state = None
        if self.state is not None and self.state_rows == token.shape[0]:
            # (otherwise the set of layers changed: start new sequences)
            is_mamba = isinstance(self.slow, Mamba)
            state = MambaState(*self.state) if is_mamba else tuple(self.state)
        if state is None and front is not None:
            _, state = self.slow.step(front, None)
        s, state = self.slow.step(token, state)
        # Truncated back-propagation through time: the meta-gradient of this step flows
        # through this step's token only (as for MetaQuant's LSTMFC).
        self.state = [t.detach() for t in state]
        self.state_rows = token.shape[0]
        return s.squeeze(-1)

    def update_gradient(self, i: int, ghat: Tensor) -> Tensor:
        if self.update == "combined" or self._fast_out[i] is None:
            return ghat
        # The reference code's real update: the fast gradient alone, calibrated.
        return self.calibrate(i, self._fast_out[i])

    def end_step(self, grad_scale: float = 1.0) -> int:
        if any(self._fallback):
            self.state = None  # a non-finite state would never recover: start again
        fallbacks = super().end_step(grad_scale)
        self._fast_out = [None] * len(self.layers)
        return fallbacks

    def extra_state(self) -> dict[str, Any]:
        return {"state": self.state, "state_rows": self.state_rows}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.state = None if state["state"] is None else list(state["state"])
        self.state_rows = int(state["state_rows"])


#: The paper's FSG: the sizes and rates of the authors' reference code, the slow-net's
#: output as the slow gradient, the LRE as the first token, PyTorch's default init;
#: chunking bounds the slow-net's memory.
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
    "mode": "window",
    "start": "random",
    "slow_form": "direct",
    "lre_feed": "front",
}

#: The authors' code (its public repository's HEAD), as closely as a CPU allows: the paper's
#: sizes and rates, bias-free linear fast-net (no non-linearity), raw gradients, the slow-net's
#: output as the slow gradient without calibration, the LRE as the first token, the real
#: update from the fast gradient alone, PyTorch's default init. One departure remains: the
#: slow-net reads each weight's own history (window mode), not one sequence of the whole
#: layer's flattened history, which needs about 145 s per ResNet-20 step on 2 cores.
REFERENCE = {
    **PAPER,
    "fast_activation": "none",
    "fast_bias": False,
    "normalize": False,
    "calibrate_slow": False,
    "update": "fast",
    "w_tilde": "previous",
}
