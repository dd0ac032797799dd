"""The ImageNet-sized architectures binary networks are published on: ResNet-18/34 with
the ImageNet stem, Bi-Real Net 18/34 and ReActNet-A; conventions in
:mod:`signgrad.models`.

These are the full-precision forms. The sign of the activations is not part of them: it
is the input quantizer of the binary layers :func:`signgrad.convert.binarize` puts in
place of their convolutions (``--input-quantizer`` for 1W1A). What the papers add around
the sign is here: Bi-Real Net's real-valued shortcut around every convolution, and
ReActNet's learnable thresholds before it (:class:`LearnableBias`) and RPReLU after it.
The papers keep the stem, the classifier and Bi-Real Net's 1 x 1 downsampling
convolutions in full precision: ``keep="first_last_shortcuts"``.
"""

from collections.abc import Callable, Sequence

import torch
from torch import nn

from signgrad.models.common import (
    BasicBlock,
    LearnableBias,
    check_args,
    conv3x3,
    make_activation,
)

__all__ = [
    "BiRealNet",
    "ImageNetResNet",
    "ReActNetA",
    "birealnet18",
    "birealnet34",
    "reactnet_a",
    "resnet18_imagenet",
    "resnet34_imagenet",
]


class _ImageNetLayout(nn.Module):
    """ResNet's ImageNet layout: stem conv7x7(64, stride 2)-BN-act and a 3x3 max-pool of
    stride 2; four stages of 64/128/256/512 channels, ``blocks`` blocks each, made by
    ``block(in_planes, planes, stride)``, stride 2 at the start of stages 2-4; global
    average pool and a linear classifier. Any input of at least 32 x 32 pixels."""

    def __init__(
        self,
        blocks: Sequence[int],
        block: Callable[[int, int, int], nn.Module],
        *,
        num_classes: int,
        in_channels: int,
        activation: str,
    ) -> None:
        super().__init__()
        check_args(num_classes, in_channels, activation)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = make_activation(activation, 64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, in_planes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stage = [block(in_planes, planes, 1 if i == 0 else 2)]
            stage += [block(planes, planes, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ImageNetResNet(_ImageNetLayout):
    """ResNet-18/34 (He et al. 2016) as torchvision builds it: the ImageNet layout with
    ``blocks`` :class:`BasicBlock` per stage and 1x1-conv + BN projection shortcuts
    where the shape changes."""

    def __init__(
        self,
        blocks: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        activation: str = "relu",
    ) -> None:
        def block(a: int, b: int, stride: int) -> nn.Module:
            return BasicBlock(a, b, stride, activation=activation, shortcut="B")

        super().__init__(
            blocks, block, num_classes=num_classes, in_channels=in_channels,
            activation=activation,
        )  # fmt: skip


def resnet18_imagenet(
    *, num_classes: int, in_channels: int, activation: str = "relu"
) -> ImageNetResNet:
    """ResNet-18, ImageNet stem: 11.7 M parameters, 1.81 G MACs at 224 x 224.

    11,689,512 parameters with 1,000 classes."""
    return ImageNetResNet(
        (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, activation=activation
    )


def resnet34_imagenet(
    *, num_classes: int, in_channels: int, activation: str = "relu"
) -> ImageNetResNet:
    """ResNet-34, ImageNet stem: 21.8 M parameters, 3.66 G MACs at 224 x 224.

    21,797,672 parameters with 1,000 classes."""
    return ImageNetResNet(
        (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, activation=activation
    )


# --------------------------------------------------------------------------- Bi-Real Net


class BiRealBlock(nn.Module):
    """One 3x3 convolution with its own real-valued shortcut (Liu et al. 2018):
    ``act(BN(conv(x)) + shortcut(x))``. Where the shape changes the shortcut is a 2 x 2
    average pool (stride 2 only), a 1x1 convolution and batch norm."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv = conv3x3(in_planes, planes, stride)
        self.bn = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(2, stride=2) if stride != 1 else nn.Identity(),
                nn.Conv2d(in_planes, planes, 1, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.act = make_activation(activation, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)) + self.shortcut(x))


class BiRealNet(_ImageNetLayout):
    """Bi-Real Net (Liu et al., ECCV 2018): ResNet-18/34's layout with a shortcut around
    every 3x3 convolution (``blocks`` :class:`BiRealBlock` per stage), so the real-valued
    activations before each sign reach the next block. Stem and head as ResNet's; the
    paper's activation is ``identity`` (the sign is the only nonlinearity), its default
    here."""

    def __init__(
        self,
        blocks: Sequence[int],
        *,
        num_classes: int,
        in_channels: int,
        activation: str = "identity",
    ) -> None:
        def block(a: int, b: int, stride: int) -> nn.Module:
            return BiRealBlock(a, b, stride, activation)

        super().__init__(
            blocks, block, num_classes=num_classes, in_channels=in_channels,
            activation=activation,
        )  # fmt: skip


def birealnet18(*, num_classes: int, in_channels: int, activation: str = "identity") -> BiRealNet:
    """Bi-Real Net-18: a real shortcut around every binary conv; 1.68 G binary MACs.

    11,689,512 parameters with 1,000 classes; at 224 x 224, 1.68 G MACs in the binary
    layers and 0.14 G in the stem, the 1x1 shortcuts and the classifier."""
    return BiRealNet(
        (4, 4, 4, 4), num_classes=num_classes, in_channels=in_channels, activation=activation
    )


def birealnet34(*, num_classes: int, in_channels: int, activation: str = "identity") -> BiRealNet:
    """Bi-Real Net-34: a real shortcut around every binary conv; 3.53 G binary MACs.

    21,797,672 parameters with 1,000 classes; at 224 x 224, 3.53 G MACs in the binary
    layers and 0.14 G in the stem, the 1x1 shortcuts and the classifier."""
    return BiRealNet(
        (6, 8, 12, 6), num_classes=num_classes, in_channels=in_channels, activation=activation
    )


# --------------------------------------------------------------------------- ReActNet-A


class ReActBlock(nn.Module):
    """One block of ReActNet-A (Liu et al., ECCV 2020): a 3x3 convolution and a 1x1
    convolution, each after a learnable threshold and followed by batch norm, a shortcut
    and the activation (RPReLU in the paper).

    With stride 2 the 3x3 part's shortcut is a 2 x 2 average pool. Where the channels
    double, the 1x1 part is two convolutions of ``in_planes`` outputs, each added to its
    input, concatenated (the paper's way of keeping a real-valued shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.move1 = LearnableBias(in_planes)
        self.conv1 = conv3x3(in_planes, in_planes, stride)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.pool = nn.AvgPool2d(2, stride=2) if stride != 1 else nn.Identity()
        self.act1 = make_activation(activation, in_planes)
        self.move2 = LearnableBias(in_planes)
        self.double = planes == 2 * in_planes
        parts = 2 if self.double else 1
        self.conv2 = nn.ModuleList(
            nn.Conv2d(in_planes, in_planes if self.double else planes, 1, bias=False)
            for _ in range(parts)
        )
        self.bn2 = nn.ModuleList(
            nn.BatchNorm2d(in_planes if self.double else planes) for _ in range(parts)
        )
        self.act2 = make_activation(activation, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(self.move1(x))) + self.pool(x))
        z = self.move2(out)
        parts = [bn(conv(z)) + out for conv, bn in zip(self.conv2, self.bn2, strict=True)]
        return self.act2(torch.cat(parts, 1) if self.double else parts[0])


#: ReActNet-A's channels after the stem and after each of its 13 blocks (MobileNet-V1).
REACTNET_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)


class ReActNetA(nn.Module):
    """ReActNet-A: MobileNet-V1's layout with every depthwise + pointwise pair replaced by
    a :class:`ReActBlock` (a full 3x3 convolution, then 1x1); stride 2 where the channels
    double, except 32 -> 64. Stem conv3x3(32, stride 2)-BN; global average pool and a
    linear classifier."""

    def __init__(self, *, num_classes: int, in_channels: int, activation: str = "rprelu") -> None:
        super().__init__()
        check_args(num_classes, in_channels, activation)
        self.conv1 = conv3x3(in_channels, REACTNET_CHANNELS[0], 2)
        self.bn1 = nn.BatchNorm2d(REACTNET_CHANNELS[0])
        blocks = []
        for a, b in zip(REACTNET_CHANNELS, REACTNET_CHANNELS[1:], strict=False):
            stride = 2 if b != a and b != 64 else 1
            blocks.append(ReActBlock(a, b, stride, activation))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(REACTNET_CHANNELS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def reactnet_a(*, num_classes: int, in_channels: int, activation: str = "rprelu") -> ReActNetA:
    """ReActNet-A: MobileNet-V1 layout, RSign and RPReLU; 4.82 G binary MACs.

    29,343,592 parameters with 1,000 classes; at 224 x 224, 4.82 G MACs in the binary
    layers and 0.012 G in the stem and the classifier."""
    return ReActNetA(num_classes=num_classes, in_channels=in_channels, activation=activation)
