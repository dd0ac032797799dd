"""1-bit layers and the conversion of an existing network.

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from signgrad import quantizers
from signgrad.errors import SigngradError

SCALINGS = ("none", "tensor", "channel")
KEEP_POLICIES = ("first_last", "first", "last", "none")

QuantizerSpec = str | quantizers.Quantizer | None


def _weight_quantizer(spec: QuantizerSpec, params: dict[str, Any] | None) -> quantizers.Quantizer:
    return quantizers.get("none" if spec is None else spec, **(params or {}))


def _input_quantizer(
    spec: QuantizerSpec, params: dict[str, Any] | None
) -> quantizers.Quantizer | None:
    if spec is None or spec == "none":
        return None
    q = quantizers.get(spec, **(params or {}))
    if not q.for_activations:
        raise SigngradError(f"quantizer '{q.name}' works on weights only, not on activations")
    return q


class _BinaryMixin:
    """What BinaryConv2d and BinaryLinear share: quantizers, scaling, the binary weight."""

    weight: nn.Parameter
    weight_quantizer: quantizers.Quantizer
    input_quantizer: quantizers.Quantizer | None
    scaling: str

    def _setup_binary(
        self,
        weight_quantizer: QuantizerSpec,
        input_quantizer: QuantizerSpec,
        scaling: str,
        weight_params: dict[str, Any] | None,
        input_params: dict[str, Any] | None,
    ) -> None:
        if scaling not in SCALINGS:
            raise SigngradError(f"unknown scaling '{scaling}'; valid: {', '.join(SCALINGS)}")
        self.weight_quantizer = _weight_quantizer(weight_quantizer, weight_params)
        self.input_quantizer = _input_quantizer(input_quantizer, input_params)
        self.scaling = scaling

    def latent_weight(self) -> Tensor:
        """The latent weights W that the quantizer binarizes (a hyper layer generates them)."""
        return self.weight

    def set_latent_grad(self, grad: Tensor | None) -> None:
        """Make ``grad`` the gradient of the latent weights, replacing what back-propagation
        left there (None: no update this step). Used by learned estimators."""
        self.weight.grad = grad

    def scale(self, latent: Tensor | None = None) -> Tensor | None:
        """alpha for the latent weights (default: the current ones), or None when not scaled."""
        if self.scaling == "none" or self.weight_quantizer.precision == 32:
            return None
        w = (self.latent_weight() if latent is None else latent).detach().abs()
        if self.scaling == "tensor":
            return w.mean()
        return w.mean(dim=tuple(range(1, w.dim())), keepdim=True)

    #: set by a learned estimator for one step: the forward uses F(W - lookahead)
    lookahead: Tensor | None = None
    #: set by a learned estimator: called with dL/dF(W - lookahead), the natural gradient
    on_natural_grad: Callable[[Tensor], None] | None = None

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
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def binary_repr(self) -> str:
        return f"scaling={self.scaling}"


class BinaryConv2d(_BinaryMixin, nn.Conv2d):
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
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self._setup_binary(weight_quantizer, input_quantizer, scaling, weight_params, input_params)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.binary_repr()}"


class BinaryLinear(_BinaryMixin, nn.Linear):
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
        self._setup_binary(weight_quantizer, input_quantizer, scaling, weight_params, input_params)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.binary_repr()}"


BINARY_LAYERS = (BinaryConv2d, BinaryLinear)


def _hyper_copy(layer: nn.Module, hyper_params: dict[str, Any], **binary: Any) -> nn.Module:
    """A hyper layer in place of ``layer``, generating its weights when it can (carry)."""
    from signgrad.hyper import HyperConv2d, HyperLinear  # hyper builds on this module

    w = layer.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise SigngradError(f"hyper layers support zero padding given as numbers: {layer}")
        new: nn.Module = HyperConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, layer.bias is not None,
            **hyper_params, **binary, **factory,
        )  # fmt: skip
    else:
        new = HyperLinear(
            layer.in_features, layer.out_features, layer.bias is not None,
            **hyper_params, **binary, **factory,
        )  # fmt: skip
    new.carry(w.detach())
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def _binary_copy(layer: nn.Module, **binary: Any) -> nn.Module:
    """A binary layer with the hyper-parameters and the (shared) parameters of ``layer``."""
    w = layer.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Conv2d):
        new: nn.Module = BinaryConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, layer.bias is not None,
            layer.padding_mode, **binary, **factory,
        )  # fmt: skip
    else:
        new = BinaryLinear(
            layer.in_features, layer.out_features, layer.bias is not None, **binary, **factory
        )
    # The trained (or pretrained) values carry over as the latent weights.
    new.weight = layer.weight
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def binarize(
    model: nn.Module,
    weight_quantizer: QuantizerSpec = "bnn",
    input_quantizer: QuantizerSpec = None,
    *,
    scaling: str = "none",
    keep: str = "first_last",
    weight_params: dict[str, Any] | None = None,
    input_params: dict[str, Any] | None = None,
    hyper: bool = False,
    hyper_params: dict[str, Any] | None = None,
) -> nn.Module:
    """Replace the ``nn.Conv2d`` and ``nn.Linear`` layers of ``model`` (in place) by
    binary ones and return it.

    ``hyper=True`` makes them Hyper-BinaryNet layers (:mod:`signgrad.hyper`), built with
    ``hyper_params`` (``z_dim``, ``generator``, ``hidden``); their generated weights start
    equal to the old weights when the generator can be the identity (``linear`` with
    ``z_dim`` = kernel size, the default for 3 x 3 kernels), else from a fresh embedding.

    ``keep`` says which layers stay full precision: ``"first_last"`` (the usual protocol
    for 1W1A networks: the stem sees raw pixels, the classifier produces logits),
    ``"first"``, ``"last"``, or ``"none"`` (the MetaQuant/FSG protocol binarizes every
    layer). First and last are taken in module registration order. Each binary layer gets
    its own quantizer objects. Parameters are shared with the old layers, so a
    full-precision network's values become the latent weights.
    """
    if keep not in KEEP_POLICIES:
        raise SigngradError(f"unknown keep policy '{keep}'; valid: {', '.join(KEEP_POLICIES)}")
    if scaling not in SCALINGS:
        raise SigngradError(f"unknown scaling '{scaling}'; valid: {', '.join(SCALINGS)}")
    if isinstance(weight_quantizer, quantizers.Quantizer) or isinstance(
        input_quantizer, quantizers.Quantizer
    ):
        raise SigngradError("binarize takes quantizer names (one object per layer is built)")
    unknown = sorted(set(hyper_params or {}) - {"z_dim", "generator", "hidden"})
    if unknown:
        raise SigngradError(f"unknown hyper_params {unknown}; valid: z_dim, generator, hidden")
    # Build one quantizer now so a bad name fails before the model is touched.
    _weight_quantizer(weight_quantizer, weight_params)
    _input_quantizer(input_quantizer, input_params)

    names = [
        n
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) and not isinstance(m, BINARY_LAYERS)
    ]
    if not names:
        raise SigngradError("binarize found no nn.Conv2d or nn.Linear layer in the model")
    kept = set()
    if keep in ("first_last", "first"):
        kept.add(names[0])
    if keep in ("first_last", "last"):
        kept.add(names[-1])
    for name in names:
        if name in kept:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        binary = {
            "weight_quantizer": weight_quantizer,
            "input_quantizer": input_quantizer,
            "scaling": scaling,
            "weight_params": weight_params,
            "input_params": input_params,
        }
        old = getattr(parent, child)
        new = (
            _hyper_copy(old, hyper_params or {}, **binary) if hyper else _binary_copy(old, **binary)
        )
        setattr(parent, child, new)
    return model


def binary_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every binary layer of ``model`` (BinaryConv2d, BinaryLinear and
    the hyper layers of :mod:`signgrad.hyper`)."""
    for name, m in model.named_modules():
        if isinstance(m, _BinaryMixin):
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


@torch.no_grad()
def post_step(model: nn.Module, lr: float) -> None:
    """Run the quantizers' after-optimizer-step hooks (ProxQuant's prox step)."""
    for _, layer in binary_layers(model):
        hook = getattr(layer.weight_quantizer, "post_step", None)
        if hook is not None:
            hook(layer.weight, lr)
