"""Forward/backward quantizer pairs for 1-bit weights and activations.

A quantizer is a small ``nn.Module`` with

* a forward map ``F`` (what the network computes with: ``sign`` or a soft version of it),
* a pseudo-derivative ``B'`` that back-propagation uses in place of ``dF/dx``
  (``dL/dx = B'(x) * dL/dF(x)``), documented as a formula in each class,
* a ``precision`` in bits (of the deployed forward map),
* an optional *sharpness* (``mu``, ``beta``, ``t`` or ``T``) that follows a
  :mod:`signgrad.schedules` schedule over training, and for soft forward maps an epoch
  from which the forward is the exact sign (``exact_sign_after``).

This follows ProxConnect++ (Lu et al., NeurIPS 2023): every method is a pair ``(F, B)``.
Everywhere ``sign(0) = +1``: a 0 is not a binary value.

Build quantizers by name::

    >>> from signgrad import quantizers
    >>> q = quantizers.get("bnn+", sharpness="const:5")
    >>> quantizers.names()[:4]
    ['none', 'bc', 'bnn', 'bnn+']

The trainer calls :meth:`Quantizer.set_epoch` at the start of every epoch; used on its
own, a quantizer sits at the start of its schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from signgrad import schedules
from signgrad.errors import SigngradError
from signgrad.registry import Registry

# Soft forward maps switch to the exact sign for this last fraction of the epochs by
# default, so that the checkpoint a run ends with is the network that gets deployed.
EXACT_TAIL_FRACTION = 0.1


def sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 (and NaN -> -1), in the dtype of ``x``."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def sign_swish(x: Tensor, beta: float) -> Tensor:
    """SS_beta(x) = 2 sigma(beta x) (1 + beta x (1 - sigma(beta x))) - 1."""
    s = torch.sigmoid(beta * x)
    return 2 * s * (1 + beta * x * (1 - s)) - 1


def sign_swish_derivative(x: Tensor, beta: float) -> Tensor:
    """SS'_beta(x) = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))."""
    bx = beta * x
    # cosh overflows to inf for |beta x| > ~89; finite / inf = 0 is the right limit.
    return beta * (2 - bx * torch.tanh(bx / 2)) / (1 + torch.cosh(bx))


def prox_binary(x: Tensor, mu: float) -> Tensor:
    """Proximal map of mu * dist(x, {-1, +1}): move each entry toward the nearest of
    +-1 by mu without overshooting.

    P^mu(x) = sign(x) * (1 + sign(|x| - 1) * relu(||x| - 1| - mu)).
    mu = 0 is the identity, mu -> inf the sign.
    """
    a = x.abs() - 1
    return sign(x) * (1 + torch.sign(a) * torch.relu(a.abs() - mu))


class _Surrogate(torch.autograd.Function):
    """y = F(x) in the forward pass, dL/dx = B'(x) * dL/dy in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, quantizer: Quantizer, sharpness: float | None) -> Tensor:
        ctx.save_for_backward(x)
        # The sharpness is captured here so that a schedule step between the forward and
        # the backward pass cannot mix two values within one gradient.
        ctx.quantizer, ctx.sharpness = quantizer, sharpness
        return quantizer.forward_value(x, sharpness)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return grad * ctx.quantizer.derivative(x, ctx.sharpness).to(grad.dtype), None, None


class Quantizer(nn.Module):
    """Base class: a forward map F and a documented pseudo-derivative B'.

    Subclasses define :meth:`forward_map` and :meth:`derivative` as pure functions of the
    input and the current sharpness. Calling the module applies F with B' as its gradient.
    """

    name: ClassVar[str] = ""
    precision: ClassVar[int] = 1
    #: name of the sharpness parameter in the papers (None: the method has none)
    sharpness_name: ClassVar[str | None] = None
    default_sharpness: ClassVar[str | None] = None
    #: True when F is not the exact sign during training (BNN++, PC, STE-Warmup, ProxQuant)
    soft_forward: ClassVar[bool] = False
    #: False for methods that only make sense on weights (ProxQuant's prox step)
    for_activations: ClassVar[bool] = True
    #: True when :meth:`post_step` must run on the latent weights after every optimizer
    #: step (ProxQuant); a layer without latent weights of its own (a hyper layer) refuses
    #: such a quantizer. A subclass that defines ``post_step`` gets True by default.
    needs_post_step: ClassVar[bool] = False
    #: Where the method's formula needs it, every sharpness value must be >= this
    #: (> with ``sharpness_strict``): a negative beta turns descent into ascent.
    sharpness_minimum: ClassVar[float | None] = None
    sharpness_strict: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "post_step" in cls.__dict__ and "needs_post_step" not in cls.__dict__:
            cls.needs_post_step = True

    def __init__(
        self,
        sharpness: str | float | schedules.Schedule | None = None,
        exact_sign_after: int | None = None,
    ) -> None:
        super().__init__()
        if sharpness is not None and self.sharpness_name is None:
            raise SigngradError(f"quantizer '{self.name}' has no sharpness to schedule")
        spec = sharpness if sharpness is not None else self.default_sharpness
        self.schedule: schedules.Schedule | None = (
            schedules.parse(spec) if spec is not None else None
        )
        if self.schedule is not None and self.sharpness_minimum is not None:
            what = f"quantizer '{self.name}': {self.sharpness_name}"
            self.schedule.check_above(what, self.sharpness_minimum, self.sharpness_strict)
        if exact_sign_after is not None and (
            isinstance(exact_sign_after, bool)
            or not isinstance(exact_sign_after, int)
            or exact_sign_after < 0
        ):
            raise SigngradError(
                f"exact_sign_after must be an integer >= 0, got {exact_sign_after!r}"
            )
        self.exact_sign_after = exact_sign_after
        self.exact = False
        # Standing alone (no trainer), a quantizer sits at the start of its schedule.
        self.sharpness: float | None = self.schedule(0.0, 2) if self.schedule else None

    # -- the pair ---------------------------------------------------------------------
    def forward_map(self, x: Tensor, s: float | None) -> Tensor:
        """F(x) during training (before the exact-sign switch)."""
        return sign(x)

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        """B'(x): the pseudo-derivative used in back-propagation."""
        raise NotImplementedError

    def forward_value(self, x: Tensor, s: float | None) -> Tensor:
        return sign(x) if self.exact else self.forward_map(x, s)

    def preprocess(self, x: Tensor) -> Tensor:
        """The pre-quantization transform W~ of the latent weights (identity unless the
        method has one, as DoReFa does); learned estimators read W~."""
        return x

    def forward(self, x: Tensor) -> Tensor:
        return _Surrogate.apply(x, self, self.sharpness)

    def post_step(self, weight: Tensor, lr: float) -> None:
        """After every optimizer step (``needs_post_step``): update the latent weights
        ``weight`` in place (learning rate ``lr``). Nothing by default."""

    # -- training progress ------------------------------------------------------------
    def exact_from(self, total_epochs: int) -> int | None:
        """First epoch (0-based) whose forward is the exact sign, or None."""
        if self.exact_sign_after is not None:
            return self.exact_sign_after
        if self.soft_forward:
            return total_epochs - max(1, round(EXACT_TAIL_FRACTION * total_epochs))
        return None

    def set_epoch(self, epoch: float, total_epochs: int) -> None:
        """Move the sharpness along its schedule and switch to exact sign when due."""
        if self.schedule is not None:
            self.sharpness = self.schedule(epoch, total_epochs)
        start = self.exact_from(total_epochs)
        self.exact = start is not None and epoch >= start

    def extra_repr(self) -> str:
        parts = []
        if self.schedule is not None:
            parts.append(f"{self.sharpness_name}={self.schedule.spec()}")
        if self.exact_sign_after is not None:
            parts.append(f"exact_sign_after={self.exact_sign_after}")
        return ", ".join(parts)


#: Every quantizer by name; :func:`get` builds one.
QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer")
_SCHEDULED = ("sharpness", "exact_sign_after")


def register(name: str) -> Callable[[type[Quantizer]], type[Quantizer]]:
    """Class decorator: make a quantizer available to :func:`get` under ``name``."""

    def add(cls: type[Quantizer]) -> type[Quantizer]:
        cls.name = name
        # A quantizer without a sharpness takes no schedule of one.
        QUANTIZERS.register(name, cls, exclude=() if cls.sharpness_name else _SCHEDULED)
        return cls

    return add


def names() -> list[str]:
    """Names accepted by :func:`get`, in registration order."""
    return QUANTIZERS.names()


def get(name: str | Quantizer, **params: Any) -> Quantizer:
    """Build the quantizer registered as ``name`` (any spelling, see
    :mod:`signgrad.registry`) with ``params``; a Quantizer passes through unchanged.
    Unknown names and parameters are errors that list the valid ones."""
    if isinstance(name, Quantizer):
        if params:
            raise SigngradError("parameters given with an already built quantizer")
        return name
    cls = QUANTIZERS.get(name)
    if cls.sharpness_name is None and set(_SCHEDULED) & set(params):
        raise SigngradError(f"quantizer '{cls.name}' has no sharpness to schedule")
    return QUANTIZERS.build(name, **params)


def parameters(name: str) -> list[str]:
    """The keyword parameters the quantizer ``name`` accepts."""
    return list(QUANTIZERS.parameters(name))


# -- the methods --------------------------------------------------------------------------


@register("none")
class FullPrecision(Quantizer):
    """Full precision: F(x) = x, B'(x) = 1. For baselines and for kept layers."""

    precision = 32

    def forward(self, x: Tensor) -> Tensor:
        return x

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return torch.ones_like(x)


@register("bc")
class BinaryConnect(Quantizer):
    """BinaryConnect (Courbariaux et al. 2015): F(x) = sign(x), B'(x) = 1 (identity STE)."""

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return torch.ones_like(x)


@register("bnn")
class BNN(Quantizer):
    """BNN (Hubara et al. 2016): F(x) = sign(x), B'(x) = 1 if |x| <= 1 else 0
    (the derivative of hardtanh, boundary included as in Larq's ste_sign)."""

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return (x.abs() <= 1).to(x.dtype)


@register("bnn+")
class BNNPlus(Quantizer):
    """BNN+ (Darabi et al. 2018): F(x) = sign(x), B'(x) = SS'_beta(x), the derivative of
    Sign-Swish: beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)). Default beta = 5."""

    sharpness_name = "beta"
    default_sharpness = "const:5"
    sharpness_minimum, sharpness_strict = 0.0, True  # beta <= 0: no or reversed gradient

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return sign_swish_derivative(x, s)


@register("bnn++")
class BNNPlusPlus(Quantizer):
    """BNN++ (ProxConnect++): F(x) = SS_mu(x) = 2 sigma(mu x)(1 + mu x (1 - sigma(mu x))) - 1,
    B'(x) = SS'_mu(x); mu is annealed upward (default exp:5:50) and the forward is the exact
    sign for the last 10% of the epochs (``exact_sign_after``)."""

    sharpness_name = "mu"
    default_sharpness = "exp:5:50"
    soft_forward = True
    sharpness_minimum, sharpness_strict = 0.0, True  # mu <= 0: flat or flipped Sign-Swish

    def forward_map(self, x: Tensor, s: float | None) -> Tensor:
        return sign_swish(x, s)

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return sign_swish_derivative(x, s)


@register("pc")
class ProxConnect(Quantizer):
    """ProxConnect (Dockhorn et al. 2021): F(x) = P^mu(x), the proximal map of
    mu * dist(x, {-1, +1}) (see :func:`prox_binary`), B'(x) = 1. mu grows (default
    linear:0:1, from the identity to snapping every |x| <= 2 onto +-1); exact sign for the
    last 10% of the epochs."""

    sharpness_name = "mu"
    default_sharpness = "linear:0:1"
    soft_forward = True
    sharpness_minimum = 0.0  # a proximal step of negative length pushes away from +-1

    def forward_map(self, x: Tensor, s: float | None) -> Tensor:
        return prox_binary(x, s)

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return torch.ones_like(x)


@register("rpc")
class ReversePC(Quantizer):
    """Reverse ProxConnect: F(x) = sign(P^mu(x)), the gradient taken at the full-precision
    x. ``backward="identity"`` (default, the method as usually stated): B'(x) = 1.
    ``backward="prox"``: B'(x) = dP^mu/dx = 1 if ||x| - 1| > mu else 0, which is what the
    PC++ decomposition F = sign o P^mu (straight-through on sign, exact through P^mu) gives.
    Because P^mu keeps signs, F equals sign(x): with the default backward the update is
    BinaryConnect's; the ``prox`` backward is what makes rPC a method of its own."""

    sharpness_name = "mu"
    default_sharpness = "linear:0:1"
    sharpness_minimum = 0.0  # as ProxConnect

    def __init__(
        self,
        sharpness: str | float | schedules.Schedule | None = None,
        exact_sign_after: int | None = None,
        backward: str = "identity",
    ) -> None:
        super().__init__(sharpness, exact_sign_after)
        if backward not in ("identity", "prox"):
            raise SigngradError(f"rpc backward must be 'identity' or 'prox', got '{backward}'")
        self.backward_kind = backward

    def forward_map(self, x: Tensor, s: float | None) -> Tensor:
        return sign(prox_binary(x, s))

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        if self.backward_kind == "identity":
            return torch.ones_like(x)
        return ((x.abs() - 1).abs() > s).to(x.dtype)


@register("proxquant")
class ProxQuant(Quantizer):
    """ProxQuant (Bai et al. 2019): the forward uses the latent weights, F(x) = x, B'(x) = 1,
    and after every optimizer step the trainer calls :meth:`post_step`, which applies
    W <- clip(P^lambda(W), -1, 1) with lambda = lr * rho * epoch (growing). For the last 10%
    of the epochs the forward is the hard sign (B'(x) = 1, BinaryConnect) and the prox step
    stops. The reported sharpness is lambda / lr = rho * epoch."""

    sharpness_name = "lambda/lr"
    soft_forward = True
    for_activations = False
    needs_post_step = True

    def __init__(self, rho: float = 1.0, exact_sign_after: int | None = None) -> None:
        super().__init__(None, exact_sign_after)
        if not (rho >= 0 and math.isfinite(rho)):
            raise SigngradError(f"proxquant rho must be a finite number >= 0, got {rho}")
        self.rho = rho
        self.sharpness = 0.0

    def set_epoch(self, epoch: float, total_epochs: int) -> None:
        super().set_epoch(epoch, total_epochs)
        self.sharpness = self.rho * math.floor(epoch)

    def forward_map(self, x: Tensor, s: float | None) -> Tensor:
        return x

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return torch.ones_like(x)

    @torch.no_grad()
    def post_step(self, weight: Tensor, lr: float) -> None:
        """The proximal step after the optimizer step, in place."""
        if self.exact:
            return
        weight.copy_(prox_binary(weight, lr * self.sharpness).clamp_(-1, 1))

    def extra_repr(self) -> str:
        return f"rho={self.rho}"


@register("approxsign")
class ApproxSign(Quantizer):
    """ApproxSign (Bi-Real Net, Liu et al. 2018): F(x) = sign(x),
    B'(x) = 2 - 2|x| for |x| < 1, else 0."""

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return torch.clamp(2 - 2 * x.abs(), min=0)


@register("ede")
class EDE(Quantizer):
    """Error Decay Estimator (IR-Net, Qin et al. 2020): F(x) = sign(x),
    B'(x) = k t (1 - tanh^2(t x)) with k = max(1/t, 1); t ramps 0.1 -> 10 (exp:0.1:10)."""

    sharpness_name = "t"
    default_sharpness = "exp:0.1:10"
    sharpness_minimum, sharpness_strict = 0.0, True  # k = max(1/t, 1) needs t > 0

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        k = max(1.0 / s, 1.0)
        return k * s * (1 - torch.tanh(s * x) ** 2)


@register("ste-warmup")
class STEWarmup(Quantizer):
    """STE-Warmup (Hyper-BinaryNet, Wang et al. 2022): F(x) = hardtanh(x / T) with
    T = T0 * gamma**epoch (default decay:1:0.95), B'(x) = 1 if |x| <= 1 else 0 (the
    derivative of hardtanh(x)); exact sign when T = 0 and for the last 10% of epochs.
    A negative T is refused (it would mean nothing but the exact sign)."""

    sharpness_name = "T"
    default_sharpness = "decay:1:0.95"
    soft_forward = True
    sharpness_minimum = 0.0

    def forward_map(self, x: Tensor, s: float | None) -> Tensor:
        if s <= 0:
            return sign(x)
        return torch.clamp(x / s, -1, 1)

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        return (x.abs() <= 1).to(x.dtype)


@register("dorefa")
class DoReFa(Quantizer):
    """DoReFa-Net k-bit weights (Zhou et al. 2016), as in MetaQuant:
    W~ = tanh(W) / (2 max|tanh W|) + 1/2, F(W) = 2 round((2^k - 1) W~) / (2^k - 1) - 1
    (round half up, so k = 1 gives sign with sign(0) = +1). Straight-through on round,
    exact through the tanh pre-processing with max|tanh W| held constant:
    B'(W) = (1 - tanh^2 W) / max|tanh W|."""

    def __init__(self, bits: int = 1) -> None:
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise SigngradError(f"dorefa bits must be an integer in 1..16, got {bits}")
        self.bits = bits

    @property
    def precision(self) -> int:  # type: ignore[override]
        return self.bits

    @staticmethod
    def _max_tanh(t: Tensor) -> Tensor:
        # An all-zero tensor would divide by zero; its tanh is 0 everywhere anyway.
        return t.abs().amax().clamp_min(torch.finfo(t.dtype).tiny)

    def preprocess(self, x: Tensor) -> Tensor:
        t = torch.tanh(x)
        return t / (2 * self._max_tanh(t)) + 0.5

    def forward_map(self, x: Tensor, s: float | None) -> Tensor:
        n = 2**self.bits - 1
        return 2 * torch.floor(n * self.preprocess(x) + 0.5) / n - 1

    def forward_value(self, x: Tensor, s: float | None) -> Tensor:
        # k-bit DoReFa is its own deployed form; 1-bit DoReFa already is the sign.
        return self.forward_map(x, s)

    def derivative(self, x: Tensor, s: float | None) -> Tensor:
        t = torch.tanh(x)
        return (1 - t * t) / self._max_tanh(t)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def decomposition_gap(q: Quantizer, x: Tensor | None = None) -> float:
    """How far the pair (F, B) of ``q`` is from ProxConnect++'s form F = P o B with P
    monotone non-decreasing (a proximal quantizer), on a grid of ``x`` (default
    [-4, 4]). 0 means the form holds on the grid and PC++'s guarantees apply.

    B is the antiderivative of B' (cumulative trapezoid rule from the grid's left end).
    F = P o B with P non-decreasing holds exactly when, with the grid points in the order
    of their B values, F never decreases and points with equal B have equal F; the gap is
    the largest decrease of F in that order or spread of F within a level of B.
    """
    if x is None:
        x = torch.linspace(-4.0, 4.0, 16001, dtype=torch.float64)
    x = x.to(torch.float64).sort().values
    with torch.no_grad():
        f = q.forward_value(x, q.sharpness)
        d = q.derivative(x, q.sharpness)
    b = torch.cat([x.new_zeros(1), torch.cumsum((d[1:] + d[:-1]) / 2 * x.diff(), 0)])
    order = torch.argsort(b, stable=True)
    b, f = b[order], f[order]
    decrease = (torch.cummax(f, 0).values - f).max()
    # Equal B (a flat stretch of the backward map) must come with equal F.
    level = torch.cat([b.new_zeros(1, dtype=torch.long), torch.cumsum(b.diff() > 1e-12, 0)])
    spread = torch.zeros(int(level[-1]) + 1, dtype=f.dtype)
    hi = spread.scatter_reduce(0, level, f, "amax", include_self=False)
    lo = spread.scatter_reduce(0, level, f, "amin", include_self=False)
    return max(decrease.item(), (hi - lo).max().item())


def precision_of(q: Quantizer | None) -> int:
    """Bits of what ``q`` outputs; 32 for no quantizer."""
    return 32 if q is None else q.precision
