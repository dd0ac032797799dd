"""What every architecture shares: the activations by name, argument checks, the
residual block and the shortcuts, and the learnable shifts of ReActNet."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from signgrad.errors import SigngradError
from signgrad.registry import Registry

#: The nonlinearities a model can use, by name: builders of a fresh module for a layer of
#: ``channels`` channels (see :func:`make_activation`).
ACTIVATIONS: Registry[Callable[[int], nn.Module]] = Registry("activation", inputs=("channels",))


@ACTIVATIONS.register("relu")
def _relu(channels: int) -> nn.Module:
    """max(x, 0)."""
    return nn.ReLU()


@ACTIVATIONS.register("hardtanh")
def _hardtanh(channels: int) -> nn.Module:
    """x clipped to [-1, 1]: the usual choice with 1-bit activations."""
    return nn.Hardtanh()


@ACTIVATIONS.register("prelu")
def _prelu(channels: int) -> nn.Module:
    """max(x, 0) + a * min(x, 0) with a learnable slope a per channel."""
    return nn.PReLU(num_parameters=channels)


@ACTIVATIONS.register("identity")
def _identity(channels: int) -> nn.Module:
    """x: no nonlinearity."""
    return nn.Identity()


@ACTIVATIONS.register("gelu")
def _gelu(channels: int) -> nn.Module:
    """x * Phi(x), Phi the standard normal CDF: the transformers' MLP nonlinearity."""
    return nn.GELU()


def make_activation(name: str, channels: int) -> nn.Module:
    """A fresh activation module by name (see :data:`ACTIVATIONS`); ``channels`` matters
    for ``prelu``'s one slope per channel. Unknown names raise :class:`SigngradError`."""
    return ACTIVATIONS.build(name, channels)


def check_int(what: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SigngradError(f"{what} must be an integer >= {minimum}, got {value!r}")


def check_args(num_classes: object, in_channels: object, activation: object) -> None:
    check_int("num_classes", num_classes, 2)
    check_int("in_channels", in_channels, 1)
    ACTIVATIONS.canonical(activation)  # type: ignore[arg-type]  # an error listing them


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class ShortcutA(nn.Module):
    """He et al. (2016) option-A shortcut: parameter-free identity that changes shape.

    Subsamples space with ``x[:, :, ::stride, ::stride]`` and zero-pads the channel
    dimension from ``in_planes`` to ``out_planes``, split evenly before and after (the
    original channels sit in the middle, as in the common reference implementation).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise SigngradError(
                f"option-A shortcut cannot shrink channels ({in_planes} -> {out_planes})"
            )
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - self.in_planes
        if extra:
            before = extra // 2
            x = F.pad(x, (0, 0, 0, 0, before, extra - before))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Residual block conv3x3-BN-act-conv3x3-BN, plus shortcut, then act.

    ``shortcut="A"``: parameter-free :class:`ShortcutA` when the shape changes (CIFAR
    ResNets); ``shortcut="B"``: 1x1 conv (stride ``stride``) + BN projection when the
    shape changes (ResNet-18). Identity otherwise.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        stride: int = 1,
        *,
        activation: str = "relu",
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation, planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_planes, planes, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            raise SigngradError(f"unknown shortcut {shortcut!r}; valid shortcuts: A, B")
        self.act2 = make_activation(activation, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


# --------------------------------------------------------------------------- ReActNet


class LearnableBias(nn.Module):
    """``x + b`` with a learnable shift ``b`` per channel (ReActNet's "move"; before a sign
    it is RSign's learnable threshold). Works on N x C x H x W input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class RPReLU(nn.Module):
    """ReActNet's RPReLU: ``PReLU(x - gamma) + zeta``, learnable shifts and slope per
    channel (the slope starts at PyTorch's 0.25)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels)
        self.shift_out = LearnableBias(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift_out(self.prelu(self.shift_in(x)))


@ACTIVATIONS.register("rprelu")
def _rprelu(channels: int) -> nn.Module:
    """ReActNet's PReLU(x - gamma) + zeta, learnable per channel."""
    return RPReLU(channels)
