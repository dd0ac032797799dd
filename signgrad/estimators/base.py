"""The contract of learned gradient estimators, and what they share.

A learned estimator replaces the straight-through gradient of the latent weights W of
every binarized layer by a gradient g^ produced by small meta-networks (parameters phi),
trained with MetaQuant's meta-weight trick. One training step with an estimator:

1. :meth:`LearnedEstimator.begin_step` (before the forward pass): from the previous
   step's natural gradient g = dL/dW^ it computes g^ (differentiable in phi), calibrated
   to W, and gives each layer the look-ahead lr * g^ (``layer.set_lookahead``); the layer
   then computes with W^ = F(W - lr * g^), so the loss depends on phi.
2. ``loss.backward()``: one pass gives dL/dphi (the meta-gradient) and, through the hook
   each layer calls with dL/dF(W') (``layer.set_natural_grad_hook``), the new natural
   gradient of every layer.
3. :meth:`LearnedEstimator.end_step` (before ``optimizer.step()``): steps the meta
   optimizer, hands the base optimizer g^ (detached) as the gradient of W ("late weight
   update"), and stores the new natural gradient. The first step has no previous gradient
   and leaves the binarized weights unchanged. A layer whose g^ is not finite gets no
   look-ahead and falls back to the straight-through gradient of this step (autograd's
   dL/dW); such steps are counted.

Everything the estimator learns or remembers (meta-networks, their optimizer, the
gradient history, counters) lives in the estimator object and its ``state_dict()``. The
layers are driven only through the binary-layer protocol, :class:`signgrad.layers.BinaryLayer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from signgrad import layers, memory
from signgrad.errors import SigngradError
from signgrad.registry import Registry

FLOAT_BYTES = 4  # the meta-networks and their inputs are float32
# Each meta-parameter has itself, its gradient and Adam's two moments.
PARAM_COPIES = 4

#: The nonlinearities of the meta-networks' MLPs, by name.
ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")
ACTIVATIONS.register("relu", nn.ReLU, summary="max(x, 0)")
ACTIVATIONS.register("tanh", nn.Tanh, summary="tanh(x)")
ACTIVATIONS.register("silu", nn.SiLU, summary="x * sigmoid(x)")
ACTIVATIONS.register("none", nn.Identity, summary="x: stacked linear maps, one affine map")


def check_int(owner: str, key: str, value: object, minimum: int = 1) -> None:
    """Refuse ``value`` unless it is an integer >= ``minimum`` (bools are not sizes)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SigngradError(f"{owner}: {key} must be an integer >= {minimum}, got {value!r}")


def check_number(
    owner: str,
    key: str,
    value: object,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
) -> None:
    """Refuse ``value`` unless it is a finite number in [low, high] ((low, high] with
    ``low_open``)."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and value <= high
    )
    if not ok:
        left = "(" if low_open else "["
        right = "]" if math.isfinite(high) else ")"
        raise SigngradError(
            f"{owner}: {key} must be a finite number in {left}{low:g}, {high:g}{right}, "
            f"got {value!r}"
        )


def check_choice(owner: str, key: str, value: object, valid: Any) -> None:
    """Refuse ``value`` unless it is one of ``valid`` (names)."""
    if value not in valid:
        raise SigngradError(f"{owner}: unknown {key} '{value}'; valid: {', '.join(valid)}")


def mlp_parameters(hidden: int, depth: int = 3, inputs: int = 1, bias: bool = True) -> int:
    """Parameters of :func:`mlp` ``inputs`` -> hidden -> ... -> 1 with ``depth`` layers."""
    sizes = [inputs] + [hidden] * (depth - 1) + [1]
    return sum(a * b + (b if bias else 0) for a, b in zip(sizes, sizes[1:], strict=False))


def mlp(
    inputs: int, hidden: int, activation: str = "relu", depth: int = 3, bias: bool = True
) -> nn.Sequential:
    """``depth`` Linear layers ``inputs`` -> hidden -> ... -> 1, the activation between
    them, applied to every row (input shape (n, inputs)).

    ``activation="none"`` and ``bias=False`` are the reference codes' meta-nets: stacked
    bias-free linear maps, which collapse to one learned scale of the input.
    """
    make = ACTIVATIONS.get(activation)
    if hidden < 1 or depth < 1:
        raise SigngradError(f"an MLP needs hidden >= 1 and depth >= 1, got {hidden}, {depth}")
    sizes = [inputs] + [hidden] * (depth - 1) + [1]
    mods: list[nn.Module] = []
    for i in range(depth):
        mods.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < depth - 1:
            mods.append(make())
    return nn.Sequential(*mods)


def coordinate_mlp(
    hidden: int, activation: str = "relu", depth: int = 3, bias: bool = True
) -> nn.Sequential:
    """:func:`mlp` 1 -> hidden -> ... -> 1 applied to every coordinate (input (n, 1))."""
    return mlp(1, hidden, activation, depth, bias)


#: Which weights a meta-net's input W~ is of: the latent weights now, or (the authors'
#: codes) those the previous forward pass computed with, look-ahead included.
W_TILDES = ("current", "previous")

#: What sets the size of g^: the meta-networks, or the straight-through gradient's norm.
STEP_NORMS = ("learned", "ste")

#: How a learned estimator's meta-networks start: ``identity`` makes g^ at the first step
#: exactly the (calibrated) straight-through gradient, ``random`` is PyTorch's default init.
STARTS = ("identity", "random")


@torch.no_grad()
def start_constant(net: nn.Module, value: float) -> None:
    """Make ``net`` (a coordinate MLP or a read-out ending in a Linear layer) output
    ``value`` everywhere: its last Linear layer gets zero weights and bias ``value``.
    The layers before it keep their random init, so the meta-gradient reaches them from
    the second step on (as a zero-initialised residual branch does)."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    last.weight.zero_()
    if last.bias is not None:
        last.bias.fill_(value)
    elif value != 0:
        raise ValueError("a Linear layer without bias cannot output a non-zero constant")


def _weight_count(layer: layers.BinaryLayer) -> int:
    """Latent weights of a binarized layer (generated ones too: its kernel shape)."""
    return math.prod(layer.kernel_shape)


def weight_count(model: nn.Module) -> int:
    """Binarized latent weights of ``model``: the coordinates a learned estimator serves."""
    return sum(
        _weight_count(m)
        for _, m in layers.binary_layers(model)
        if m.weight_quantizer.precision < 32
    )


class GradientHistory:
    """Historical Gradient Storage: the last ``length`` natural gradients of every weight
    of one layer, kept per coordinate (detached), oldest first."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise SigngradError(f"history length must be at least 1, got {length}")
        self.length = length
        self.buffer: Tensor | None = None  # (length, n), oldest row first
        self.count = 0

    def push(self, grad: Tensor) -> None:
        g = grad.detach().reshape(1, -1)
        if self.buffer is None:
            self.buffer = torch.zeros(self.length, g.shape[1], dtype=g.dtype, device=g.device)
        # Roll the oldest row out; history lengths are small, so a copy is cheap.
        self.buffer = torch.cat([self.buffer[1:], g])
        self.count += 1

    def sequence(self) -> Tensor:
        """(n, length) histories, zeros before the first gradient (oldest first)."""
        if self.buffer is None:
            raise RuntimeError("empty gradient history")
        return self.buffer.t()

    def latest(self) -> Tensor:
        if self.buffer is None:
            raise RuntimeError("empty gradient history")
        return self.buffer[-1]

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = state["buffer"]
        self.count = int(state["count"])


class LearnedEstimator(nn.Module):
    """Base class: the meta-weight trick around :meth:`gradient`.

    Subclasses hold their meta-networks as sub-modules, build their meta optimizer in
    :meth:`make_meta_optimizer`, and implement :meth:`gradient` (the uncalibrated g^ of
    one layer, differentiable in the meta-parameters) or :meth:`gradients` (all layers).
    """

    name = ""
    history_length = 1
    #: Settings added after checkpoints first held estimator states, with the values the
    #: estimators of those checkpoints had: a resumed run continues with what it started.
    legacy_settings: dict[str, Any] = {}

    # -- settings and their cost, checked before anything is allocated ---------------------
    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        """Raise SigngradError for a setting out of its range (``settings``: every keyword
        of the constructor but ``model``)."""

    @classmethod
    def memory_needed(cls, weights: int, settings: dict[str, Any]) -> int:
        """A lower bound, in bytes, of what one training step of the estimator holds at
        once for ``weights`` binarized weights: meta-parameters with their gradients and
        Adam state, the activations autograd keeps over every weight, the history."""
        return 0

    @classmethod
    def check_fits(
        cls, weights: int, settings: dict[str, Any], device: Any, name: str | None = None
    ) -> None:
        """Refuse ``settings`` whose :meth:`memory_needed` exceeds what ``device`` has."""
        needed = cls.memory_needed(weights, settings)
        sizes = ", ".join(f"{k}={settings[k]}" for k in cls.size_keys if k in settings)
        memory.check_fits(
            needed,
            f"estimator '{name or cls.name}' ({sizes}) for {weights:,} binarized weights",
            device,
        )

    #: The settings named in a "would need ... GiB" message.
    size_keys: tuple[str, ...] = ()

    def _check_settings(self, settings: dict[str, Any]) -> None:
        """For a subclass's __init__, after this class's: ranges, then memory."""
        self.validate(settings)
        weights = sum(_weight_count(layer) for layer in self.layers)
        device = next(self.layers[0].parameters()).device
        self.check_fits(weights, settings, device)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        found = [
            (n, m) for n, m in layers.binary_layers(model) if m.weight_quantizer.precision < 32
        ]
        if not found:
            raise SigngradError(f"estimator '{self.name}' found no binarized layer in the model")
        # A plain list: the layers belong to the model, not to the estimator's state.
        self.layers = [m for _, m in found]
        self.layer_names = [n for n, _ in found]
        self.histories = [GradientHistory(self.history_length) for _ in self.layers]
        self._natural: list[Tensor | None] = [None] * len(self.layers)
        self._ghat: list[Tensor | None] = [None] * len(self.layers)
        self._fallback = [False] * len(self.layers)
        self.steps = 0
        self.nonfinite_steps = 0
        self.last_fallbacks = 0  # layers that fell back in the latest step
        for i, layer in enumerate(self.layers):
            layer.set_natural_grad_hook(self._capture(i))
        self.meta_optimizer: torch.optim.Optimizer | None = None
        self.settings: dict[str, Any] = {}  # every constructor keyword; set by subclasses
        # Which weights the meta-nets' W~ is of: "current" (the latent weights now) or
        # "previous" (those the last forward pass computed with); set by subclasses.
        self.w_tilde = "current"
        self._forward: list[Tensor | None] = [None] * len(self.layers)
        # "learned": g^ as the meta-networks make it; "ste": rescaled per layer to the norm
        # of the straight-through gradient (the meta-networks choose the direction only).
        self.step_norm = "learned"
        # Data-parallel training (signgrad.distributed): replaces, in place, the rank's
        # natural and meta-gradients by their means over the ranks, so that every rank
        # stores and learns from the global batch's gradients. None: a single process.
        self.reduce_gradients: Callable[[list[Tensor]], None] | None = None

    def _capture(self, i: int):
        def hook(grad: Tensor) -> None:
            self._natural[i] = grad.detach()

        return hook

    def finish_init(self) -> None:
        """Call at the end of a subclass's __init__, once the meta-networks exist."""
        device = self.layers[0].latent_weight().device
        self.to(device)
        self.meta_optimizer = self.make_meta_optimizer()

    # -- to be provided by each method --------------------------------------------------
    def make_meta_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def gradient(self, i: int, w_tilde: Tensor) -> Tensor:
        """g^ of layer ``i`` with respect to W~ (flattened, shape (n,)), from its
        gradient history; differentiable in the meta-parameters."""
        raise NotImplementedError

    def gradients(self, ready: list[int], w_tildes: list[Tensor]) -> list[Tensor]:
        """:meth:`gradient` of the layers ``ready``; a method may override this to treat
        all layers in one batch (fewer, larger operations)."""
        return [self.gradient(i, w) for i, w in zip(ready, w_tildes, strict=True)]

    # -- the step -------------------------------------------------------------------------
    def calibrate(self, i: int, g: Tensor, w: Tensor | None = None) -> Tensor:
        """A gradient of W~ of layer ``i`` as a gradient of its latent weights W (shape of
        W): the chain rule through the pre-processing, B'(W) (MetaQuant's calibration)."""
        layer = self.layers[i]
        q = layer.weight_quantizer
        w = layer.latent_weight().detach() if w is None else w
        return g.reshape(w.shape) * q.derivative(w, q.sharpness)

    def calibrated(self) -> list[Tensor | None]:
        """g^ of every layer as a gradient of W (shape of W); None before any history."""
        out: list[Tensor | None] = [None] * len(self.layers)
        ready = [i for i, h in enumerate(self.histories) if h.count > 0]
        if not ready:
            return out
        quants = [self.layers[i].weight_quantizer for i in ready]
        weights = [self.layers[i].latent_weight().detach() for i in ready]
        seen = weights
        if self.w_tilde == "previous":  # the authors' codes: W~ of the last forward pass
            seen = [w if self._forward[i] is None else self._forward[i]
                    for i, w in zip(ready, weights, strict=True)]  # fmt: skip
        w_tildes = [q.preprocess(w).reshape(-1) for q, w in zip(quants, seen, strict=True)]
        raw = self.gradients(ready, w_tildes)
        for i, w, g in zip(ready, weights, raw, strict=True):
            out[i] = self.calibrate(i, g, w)
        return out

    def begin_step(self, lr: float) -> None:
        """Before the forward pass: set every layer's look-ahead W' = W - lr * g^.

        A layer whose g^ is not finite gets no look-ahead (a NaN there would poison the
        loss and every gradient); it trains this step with the straight-through gradient.
        """
        ghats = self.calibrated()
        if self.step_norm == "ste":
            ghats = [None if g is None else self._ste_norm(i, g) for i, g in enumerate(ghats)]
        present = [g for g in ghats if g is not None]
        # One device synchronisation for all layers, not one per layer.
        finite = torch.stack([torch.isfinite(g).all() for g in present]).tolist() if present else []
        flags = iter(finite)
        for i, (layer, ghat) in enumerate(zip(self.layers, ghats, strict=True)):
            self._fallback[i] = ghat is not None and not next(flags)
            self._ghat[i] = None if self._fallback[i] else ghat
            ahead = None if self._ghat[i] is None else self.lookahead(i, lr, self._ghat[i])
            layer.set_lookahead(ahead)
            if self.w_tilde == "previous":
                w = layer.latent_weight().detach()
                self._forward[i] = w.clone() if ahead is None else (w - ahead).detach()

    def _ste_norm(self, i: int, ghat: Tensor) -> Tensor:
        """``ghat`` rescaled to the norm of the straight-through gradient it is built from
        (``step_norm="ste"``): the meta-networks choose the direction only."""
        ste = self.calibrate(i, self.histories[i].latest())
        return ghat * (ste.norm() / ghat.norm().clamp_min(torch.finfo(ghat.dtype).tiny))

    def lookahead(self, i: int, lr: float, ghat: Tensor) -> Tensor:
        """What the forward pass subtracts from layer ``i``'s latent weights, W' = W - this;
        differentiable in the meta-parameters (default: lr * g^, the paper's W')."""
        return lr * ghat

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        if self.meta_optimizer is not None:
            self.meta_optimizer.zero_grad(set_to_none=set_to_none)

    def end_step(self, grad_scale: float = 1.0) -> int:
        """After ``loss.backward()``: meta step, base-optimizer gradients, history.
        Returns the number of layers that fell back to the straight-through gradient.

        ``grad_scale``: the factor fp16 loss scaling put on the loss; the natural and meta
        gradients are divided by it, and a step whose natural gradients overflowed
        neither learns nor enters the history (the loss scaler skips its update)."""
        meta_grads = [p.grad for p in self.parameters() if p.grad is not None]
        naturals = [g for g in self._natural if g is not None]
        if self.reduce_gradients is not None:  # one collective for both kinds
            self.reduce_gradients(meta_grads + naturals)
        overflow = False
        if grad_scale != 1.0:
            for g in meta_grads + naturals:
                g.div_(grad_scale)
            overflow = bool(naturals) and not bool(
                torch.stack([torch.isfinite(g).all() for g in naturals]).all()
            )
        # One device synchronisation for all meta-parameters, not one per parameter.
        if (
            meta_grads
            and not overflow
            and torch.stack([torch.isfinite(g).all() for g in meta_grads]).all()
        ):
            self.meta_optimizer.step()
        fallbacks = 0
        for i, layer in enumerate(self.layers):
            ghat = self._ghat[i]
            if self._fallback[i]:
                fallbacks += 1  # keep autograd's straight-through dL/dW of this step
            elif ghat is None:
                layer.set_latent_grad(None)  # no previous gradient yet: no update
            else:
                layer.set_latent_grad(self.update_gradient(i, ghat).detach())
            layer.clear_lookahead()
            self._ghat[i] = None
            self._fallback[i] = False
            if self._natural[i] is not None and not overflow:
                self.histories[i].push(self._natural[i])
            self._natural[i] = None
        self.steps += 1
        self.nonfinite_steps += fallbacks > 0
        self.last_fallbacks = fallbacks
        return fallbacks

    def update_gradient(self, i: int, ghat: Tensor) -> Tensor:
        """The gradient the base optimizer applies to layer ``i`` (default: g^ itself)."""
        return ghat

    def detach_layers(self) -> None:
        """Remove the estimator's hooks from the model's layers."""
        for layer in self.layers:
            layer.set_natural_grad_hook(None)
            layer.clear_lookahead()

    # -- state ----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Per-method state that is not a parameter (e.g. recurrent hidden states)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {
            "meta": super().state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "histories": [h.state_dict() for h in self.histories],
            "steps": self.steps,
            "nonfinite_steps": self.nonfinite_steps,
            "extra": self.extra_state(),
            "settings": dict(self.settings),
            "forward_weights": list(self._forward),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:  # type: ignore[override]
        saved = saved_settings(state, self.settings, type(self))
        if saved != self.settings:
            diff = ", ".join(
                f"{k}={saved.get(k)!r} (here {self.settings.get(k)!r})"
                for k in sorted(set(saved) | set(self.settings))
                if saved.get(k) != self.settings.get(k)
            )
            raise ValueError(f"it was saved by an estimator with other settings: {diff}")
        super().load_state_dict(state["meta"], strict=strict)
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for h, s in zip(self.histories, state["histories"], strict=True):
            h.load_state_dict(s)
        self.steps = int(state["steps"])
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.load_extra_state(state["extra"])
        forward = state.get("forward_weights", [None] * len(self.layers))
        self._forward = self.per_layer(forward, "forward_weights")

    def per_layer(self, tensors: Any, what: str) -> list[Tensor | None]:
        """``tensors`` read from a state: a list of one tensor (or None) per binarized
        layer, each of the layer's weight shape, else a ValueError naming ``what``."""
        shapes = [tuple(lay.kernel_shape) for lay in self.layers]
        if (
            not isinstance(tensors, list)
            or len(tensors) != len(shapes)
            or any(
                t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != s)
                for t, s in zip(tensors, shapes, strict=False)
            )
        ):
            raise ValueError(f"its {what} do not match the binarized layers")
        return list(tensors)


def saved_settings(
    state: dict[str, Any], settings: dict[str, Any], cls: type[LearnedEstimator]
) -> dict[str, Any]:
    """The settings an estimator ``state`` was saved with; a state from before they were
    recorded had ``settings`` (those of its configuration) with ``cls.legacy_settings``."""
    saved = state.get("settings")
    if saved is None:
        return {**settings, **cls.legacy_settings}
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise SigngradError("the checkpoint's estimator settings are damaged (not named values)")
    return saved
