"""1-bit layers: the binary-layer protocol (:class:`BinaryLayer`) and its plain forms.

``BinaryConv2d`` and ``BinaryLinear`` keep full-precision *latent* weights W and compute
with ``alpha * F(W)``, where F is a :mod:`signgrad.quantizers` forward map and alpha the
weight scaling. An optional input quantizer binarizes the activations entering the layer,
so 1W32A and 1W1A differ by one argument.

Weight scaling (``scaling``):

* ``"none"``: alpha = 1, weights are exactly +-1;
* ``"tensor"``: alpha = mean|W| over the layer (BWN / XNOR-Net);
* ``"channel"``: alpha = mean|W| per output channel.

alpha is computed from the detached latent weights: it rescales the binary weights but
is held constant in back-propagation, so the weight gradient is the quantizer's
pseudo-gradient times alpha.

Converting an existing network is :func:`signgrad.convert.binarize`; the hyper layers of
:mod:`signgrad.hyper` build on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from signgrad import quantizers
from signgrad.errors import SigngradError
from signgrad.registry import Registry

#: How a binary layer scales its 1-bit weights, by name: functions of |W| giving alpha
#: (None: no scaling), so that the layer computes with alpha * F(W).
SCALINGS: Registry[Callable[[Tensor], Tensor | None]] = Registry("scaling")


@SCALINGS.register("none")
def _no_scale(w: Tensor) -> Tensor | None:
    """alpha = 1: the weights are +-1."""
    return None


@SCALINGS.register("tensor")
def _tensor_scale(w: Tensor) -> Tensor | None:
    """alpha = mean |W| over the whole layer."""
    return w.mean()


@SCALINGS.register("channel")
def _channel_scale(w: Tensor) -> Tensor | None:
    """alpha = mean |W| per output channel (XNOR-Net)."""
    return w.mean(dim=tuple(range(1, w.dim())), keepdim=True)


QuantizerSpec = str | quantizers.Quantizer | None


def make_weight_quantizer(
    spec: QuantizerSpec, params: dict[str, Any] | None
) -> quantizers.Quantizer:
    """The weight quantizer ``spec`` with ``params`` (None: full precision, ``none``)."""
    return quantizers.get("none" if spec is None else spec, **(params or {}))


def make_input_quantizer(
    spec: QuantizerSpec, params: dict[str, Any] | None
) -> quantizers.Quantizer | None:
    """The input quantizer ``spec`` with ``params``, or None for unquantized inputs;
    refuses a weights-only method."""
    if spec is None or spec == "none":
        return None
    q = quantizers.get(spec, **(params or {}))
    if not q.for_activations:
        raise SigngradError(f"quantizer '{q.name}' works on weights only, not on activations")
    return q


class BinaryLayer:
    """The binary-layer protocol: what every 1-bit layer offers to the rest of signgrad.

    A mixin for ``nn.Module`` layers (:class:`BinaryConv2d`, :class:`BinaryLinear`, the
    hyper layers of :mod:`signgrad.hyper`); ``isinstance(m, BinaryLayer)`` is how the
    trainer, the exporter (:mod:`signgrad.graph`) and the estimators recognise one. A
    subclass calls :meth:`setup_binary` in ``__init__`` and computes with
    :meth:`quantize_input` and :meth:`binary_weight` in ``forward``.

    Attributes: ``weight_quantizer`` (F), ``input_quantizer`` (or None), ``scaling``.

    Capabilities:

    * ``generated_kernel``: False when the latent weights are the parameter ``weight``;
      True when the layer generates them (a hyper layer has no ``weight``);
    * :attr:`kernel_shape`: the shape of the latent weights (for a conv: out, in, kh, kw);
    * :meth:`latent_weight` / :meth:`set_latent_grad`: read W, and set its gradient
      (a generated W passes it on to what generates it);
    * :meth:`scale`: the weight scaling alpha;
    * :meth:`post_step`: the weight quantizer's step after each optimizer step (ProxQuant's
      prox step; a no-op unless ``weight_quantizer.needs_post_step``).

    The hand-off with a learned estimator (:mod:`signgrad.estimators.base`):

    * :meth:`set_lookahead` / :meth:`clear_lookahead`: for one step the forward computes
      with F(W - lookahead);
    * :meth:`set_natural_grad_hook`: called with dL/dF(W - lookahead), the natural
      gradient, at every backward pass (None removes it).
    """

    weight: nn.Parameter
    weight_quantizer: quantizers.Quantizer
    input_quantizer: quantizers.Quantizer | None
    scaling: str

    #: True when the layer generates its latent weights instead of holding ``weight``
    generated_kernel: ClassVar[bool] = False
    #: set for one step by :meth:`set_lookahead`: the forward uses F(W - lookahead)
    lookahead: Tensor | None = None
    #: set by :meth:`set_natural_grad_hook`: called with dL/dF(W - lookahead)
    on_natural_grad: Callable[[Tensor], None] | None = None

    def setup_binary(
        self,
        weight_quantizer: QuantizerSpec,
        input_quantizer: QuantizerSpec,
        scaling: str,
        weight_params: dict[str, Any] | None,
        input_params: dict[str, Any] | None,
    ) -> None:
        """Build the quantizers and check the scaling (for a subclass's ``__init__``)."""
        scaling = SCALINGS.canonical(scaling)
        self.weight_quantizer = make_weight_quantizer(weight_quantizer, weight_params)
        self.input_quantizer = make_input_quantizer(input_quantizer, input_params)
        self.scaling = scaling

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the latent weights W."""
        return tuple(self.weight.shape)

    def latent_weight(self) -> Tensor:
        """The latent weights W that the quantizer binarizes (a hyper layer generates them)."""
        return self.weight

    def set_latent_grad(self, grad: Tensor | None) -> None:
        """Make ``grad`` the gradient of the latent weights, replacing what back-propagation
        left there (None: no update this step). Used by learned estimators."""
        self.weight.grad = grad

    @torch.no_grad()
    def post_step(self, lr: float) -> None:
        """After the optimizer step (learning rate ``lr``): the weight quantizer's step on
        the latent weights, if it has one."""
        if self.weight_quantizer.needs_post_step:
            self.weight_quantizer.post_step(self.weight, lr)

    def set_lookahead(self, lookahead: Tensor | None) -> None:
        """Compute with F(W - ``lookahead``) until :meth:`clear_lookahead` (None: F(W))."""
        self.lookahead = lookahead

    def clear_lookahead(self) -> None:
        """Compute with F(W) again."""
        self.lookahead = None

    def set_natural_grad_hook(self, hook: Callable[[Tensor], None] | None) -> None:
        """Call ``hook`` with the natural gradient dL/dF(W - lookahead) at every backward
        pass (None: stop)."""
        self.on_natural_grad = hook

    def scale(self, latent: Tensor | None = None) -> Tensor | None:
        """alpha for the latent weights (default: the current ones), or None when not scaled."""
        if self.scaling == "none" or self.weight_quantizer.precision == 32:
            return None
        w = (self.latent_weight() if latent is None else latent).detach().abs()
        return SCALINGS[self.scaling](w)

    def binary_weight(self) -> Tensor:
        """alpha * F(W): the weights the forward pass computes with."""
        latent = self.latent_weight()
        w = latent if self.lookahead is None else latent - self.lookahead
        q = self.weight_quantizer(w)
        if self.on_natural_grad is not None and q.requires_grad:
            q.register_hook(self.on_natural_grad)
        alpha = self.scale(latent)
        return q if alpha is None else q * alpha

    def quantize_input(self, x: Tensor) -> Tensor:
        """The layer's input as it computes with it (quantized when it has an input
        quantizer)."""
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def binary_repr(self) -> str:
        return f"scaling={self.scaling}"


class BinaryConv2d(BinaryLayer, nn.Conv2d):
    """``nn.Conv2d`` computing with ``alpha * F(W)`` on (optionally) quantized inputs.

    With ``weight_quantizer="bc"`` and no scaling this is exactly
    ``F.conv2d(x, sign(W))``; with ``input_quantizer="bc"`` too,
    ``F.conv2d(sign(x), sign(W))`` (zero padding stays 0, as in Bi-Real and XNOR-Net).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        *,
        weight_quantizer: QuantizerSpec = "bnn",
        input_quantizer: QuantizerSpec = None,
        scaling: str = "none",
        weight_params: dict[str, Any] | None = None,
        input_params: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.setup_binary(weight_quantizer, input_quantizer, scaling, weight_params, input_params)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.binary_repr()}"


class BinaryLinear(BinaryLayer, nn.Linear):
    """``nn.Linear`` computing with ``alpha * F(W)`` on (optionally) quantized inputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quantizer: QuantizerSpec = "bnn",
        input_quantizer: QuantizerSpec = None,
        scaling: str = "none",
        weight_params: dict[str, Any] | None = None,
        input_params: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.setup_binary(weight_quantizer, input_quantizer, scaling, weight_params, input_params)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.binary_repr()}"


BINARY_LAYERS = (BinaryConv2d, BinaryLinear)


def __getattr__(name: str) -> Any:
    # binarize moved up a level (it must know the hyper layers, which build on this module)
    if name == "binarize":
        raise AttributeError(
            "signgrad.layers.binarize is now signgrad.convert.binarize (from signgrad import "
            "convert; convert.binarize(model, ...))"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def binary_layers(model: nn.Module) -> Iterator[tuple[str, BinaryLayer]]:
    """(name, layer) for every binary layer of ``model`` (BinaryConv2d, BinaryLinear and
    the hyper layers of :mod:`signgrad.hyper`)."""
    for name, m in model.named_modules():
        if isinstance(m, BinaryLayer):
            yield name, m


def set_epoch(model: nn.Module, epoch: float, total_epochs: int) -> float | None:
    """Advance every quantizer of ``model`` to ``epoch``; return the weight sharpness of
    the first binary layer (what the metrics record), or None."""
    for m in model.modules():
        if isinstance(m, quantizers.Quantizer):
            m.set_epoch(epoch, total_epochs)
    for _, layer in binary_layers(model):
        return layer.weight_quantizer.sharpness
    return None


def post_step(model: nn.Module, lr: float) -> None:
    """Run every binary layer's :meth:`BinaryLayer.post_step` (ProxQuant's prox step)."""
    for _, layer in binary_layers(model):
        layer.post_step(lr)
