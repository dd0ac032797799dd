"""Hyper-BinaryNet (Wang, Guo, Xiong, Yin, Li, TPAMI 2022): 1-bit layers whose latent
weights are produced by a small auxiliary network.

``HyperConv2d`` keeps no latent kernel of its own. Every (out, in) pair has a learned
embedding z (``z_dim`` values) and a per-layer generator G maps it to the k x k latent
kernel:

    W[o, i] = G(z[o, i]),    W^ = alpha * F(W)

and the layer computes like :class:`signgrad.layers.BinaryConv2d` with W^ (any weight
quantizer F, optional input quantizer, the same scaling). ``HyperLinear`` does the same
for a linear layer, each weight a 1 x 1 "kernel".

Hyper accumulation. Back-propagation gives dL/dW as for a binary layer, and then splits
it through G instead of adding it into one latent number per weight:

* the embedding z[o, i] of each kernel accumulates ``z_dim`` values of gradient,
  J_G(z[o, i])^T dL/dW[o, i], of its own;
* the generator's parameters (for ``linear``: the direction V and the norm g of a
  weight-normalised map) accumulate the gradients of every kernel of the layer.

So each weight's gradient accumulates in the ``z_dim`` variables of its kernel's
embedding plus the layer's shared generator variables, instead of one latent weight;
``z_dim`` is the number of accumulating variables per kernel (the authors' code: 9, one
per weight of a 3 x 3 kernel). docs/hyper.md says what the paper leaves open.

Generators (``generator``):

* ``"linear"``: G(z) = g * V z / ||V|| (weight normalisation per output row of V; the
  authors' default);
* ``"mlp-elu"``: Linear(z_dim, hidden) -> clipped ELU -> Linear(hidden, k * k), the
  clipped ELU being min(max(ELU_a(x), -1), 1) with a = 10/9;
* ``"mlp-hardtanh"``: the same with hardtanh (saturating at +-1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations

from signgrad import layers
from signgrad.errors import SigngradError
from signgrad.registry import Registry

ELU_ALPHA = 10 / 9


class ClippedELU(nn.Module):
    """min(max(ELU_alpha(x), -1), 1), alpha = 10/9."""

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x, alpha=ELU_ALPHA).clamp(-1.0, 1.0)


#: The per-layer kernel generators by name: builders of a module mapping (m, z_dim) to
#: (m, out_dim) (see :func:`make_generator`).
GENERATORS: Registry[Any] = Registry("generator", inputs=("z_dim", "out_dim"))


@GENERATORS.register("linear")
def _linear(z_dim: int, out_dim: int) -> nn.Module:
    """G(z) = g * V z / ||V||, weight-normalised per output row (the authors' default)."""
    return parametrizations.weight_norm(nn.Linear(z_dim, out_dim, bias=False))


@GENERATORS.register("mlp-elu")
def _mlp_elu(z_dim: int, out_dim: int, hidden: int = 32) -> nn.Module:
    """Linear(z_dim, hidden) -> clipped ELU -> Linear(hidden, out_dim)."""
    return nn.Sequential(nn.Linear(z_dim, hidden), ClippedELU(), nn.Linear(hidden, out_dim))


@GENERATORS.register("mlp-hardtanh")
def _mlp_hardtanh(z_dim: int, out_dim: int, hidden: int = 32) -> nn.Module:
    """Linear(z_dim, hidden) -> hardtanh -> Linear(hidden, out_dim)."""
    return nn.Sequential(nn.Linear(z_dim, hidden), nn.Hardtanh(), nn.Linear(hidden, out_dim))


def make_generator(kind: str, z_dim: int, out_dim: int, hidden: int = 32) -> nn.Module:
    """The per-layer kernel generator ``kind`` (see :data:`GENERATORS`): (m, z_dim) ->
    (m, out_dim); ``hidden`` is the width of an MLP generator."""
    if z_dim < 1 or hidden < 1:
        raise SigngradError(f"z_dim and hidden must be >= 1, got {z_dim}, {hidden}")
    takes_hidden = "hidden" in GENERATORS.parameters(kind)
    return GENERATORS.build(kind, z_dim, out_dim, **({"hidden": hidden} if takes_hidden else {}))


class HyperLayer(layers.BinaryLayer):
    """A binary layer (:class:`signgrad.layers.BinaryLayer`) with embeddings + generator
    in place of the latent weight tensor (``generated_kernel``)."""

    generated_kernel = True

    def _setup_hyper(
        self,
        kernel_shape: tuple[int, ...],
        z_dim: int,
        generator: str,
        hidden: int,
        factory: dict[str, Any],
    ) -> None:
        """Embeddings and generator for latent weights of ``kernel_shape`` (out, in, kh, kw
        for a conv, out, in for a linear layer: one kh x kw kernel per (out, in) pair)."""
        if self.weight_quantizer.needs_post_step:
            # A post-step (ProxQuant's prox step) moves latent weights, which a hyper layer
            # does not have.
            name = self.weight_quantizer.name
            raise SigngradError(f"{name} cannot drive a hyper layer (no latent weights)")
        self._kernel_shape = tuple(kernel_shape)
        kernels, kernel_size = kernel_shape[0] * kernel_shape[1], math.prod(kernel_shape[2:])
        self.z_dim, self.generator_kind = z_dim, GENERATORS.canonical(generator)
        self.generator = make_generator(generator, z_dim, kernel_size, hidden).to(**factory)
        self.embedding = nn.Parameter(torch.randn(kernels, z_dim, **factory) / z_dim**0.5)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape of the generated latent weights W."""
        return self._kernel_shape

    def latent_weight(self) -> Tensor:
        """W = G(z): the latent weights the quantizer binarizes (differentiable)."""
        return self.generator(self.embedding).reshape(self.kernel_shape)

    def set_latent_grad(self, grad: Tensor | None) -> None:
        """Back-propagate ``grad`` (a gradient of W) into the embeddings and the generator,
        replacing the gradients they hold."""
        for p in (self.embedding, *self.generator.parameters()):
            p.grad = None
        if grad is not None:
            with torch.enable_grad():
                torch.autograd.backward(self.latent_weight(), grad)

    @torch.no_grad()
    def carry(self, weight: Tensor) -> bool:
        """Make G(z) equal ``weight`` when the generator can be the identity (``linear``
        with z_dim = kernel size): V = I, g = 1, z = the kernels. Returns whether it did."""
        size = self.embedding.shape[0]
        kk = weight.numel() // size
        if self.generator_kind != "linear" or self.z_dim != kk:
            return False
        param = self.generator.parametrizations.weight
        param.original0.fill_(1.0)  # g: the norm of each row
        param.original1.copy_(torch.eye(kk))  # V
        self.embedding.copy_(weight.reshape(size, kk))
        return True

    def post_step(self, lr: float) -> None:
        """Nothing: a hyper layer accepts no quantizer with a post-step."""

    def hyper_repr(self) -> str:
        return f"z_dim={self.z_dim}, generator={self.generator_kind}"


class HyperConv2d(HyperLayer, nn.Module):
    """A 1-bit convolution whose latent kernel is generated: W[o, i] = G(z[o, i]).

    Arguments as :class:`signgrad.layers.BinaryConv2d`, plus ``z_dim`` (embedding size:
    the variables each kernel's gradient accumulates in), ``generator`` and ``hidden``
    (width of an MLP generator).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        z_dim: int = 9,
        generator: str = "linear",
        hidden: int = 32,
        weight_quantizer: layers.QuantizerSpec = "bnn",
        input_quantizer: layers.QuantizerSpec = None,
        scaling: str = "none",
        weight_params: dict[str, Any] | None = None,
        input_params: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise SigngradError(
                f"channels {in_channels}, {out_channels} not divisible by groups {groups}"
            )
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.stride, self.padding, self.dilation = stride, padding, dilation
        kernel_shape = (out_channels, in_channels // groups, kh, kw)
        factory = {"device": device, "dtype": dtype}
        self.setup_binary(weight_quantizer, input_quantizer, scaling, weight_params, input_params)
        self._setup_hyper(kernel_shape, z_dim, generator, hidden, factory)
        self.bias = nn.Parameter(torch.zeros(out_channels, **factory)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            self.quantize_input(x),
            self.binary_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        o, i, kh, kw = self.kernel_shape
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
            f"stride={self.stride}, padding={self.padding}, {self.hyper_repr()}, "
            f"{self.binary_repr()}"
        )


class HyperLinear(HyperLayer, nn.Module):
    """A 1-bit linear layer whose weights are generated: W[o, i] = G(z[o, i]) (a 1 x 1
    kernel per weight)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        z_dim: int = 9,
        generator: str = "linear",
        hidden: int = 32,
        weight_quantizer: layers.QuantizerSpec = "bnn",
        input_quantizer: layers.QuantizerSpec = None,
        scaling: str = "none",
        weight_params: dict[str, Any] | None = None,
        input_params: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        factory = {"device": device, "dtype": dtype}
        self.setup_binary(weight_quantizer, input_quantizer, scaling, weight_params, input_params)
        self._setup_hyper((out_features, in_features), z_dim, generator, hidden, factory)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.binary_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.hyper_repr()}, {self.binary_repr()}"
        )
