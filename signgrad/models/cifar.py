"""The CIFAR-sized architectures: ResNet-20 to 110 (option A and B shortcuts), ResNet-18
with the CIFAR stem, VGG-Small and a small ConvNet; conventions in :mod:`signgrad.models`."""

from collections.abc import Callable

import torch
from torch import nn

from signgrad.errors import SigngradError
from signgrad.models.common import BasicBlock, check_args, check_int, conv3x3, make_activation


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016), Sec. 4.2: depth = 6n + 2.

    conv3x3(16)-BN-act stem, three stages of ``n`` :class:`BasicBlock` with 16/32/64
    channels (stride 2 at the start of stages 2 and 3), global average pool, linear
    classifier. Convs and the linear layer use Kaiming-normal initialization, as in the
    common reference implementations. ``shortcut="A"`` (He et al.'s CIFAR option, the
    default) or ``"B"`` (a 1x1 convolution + BN where the shape changes, as the
    MetaQuant/FSG authors' pretrained models have; registered as ``resnet20-b`` etc.).
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int,
        in_channels: int,
        activation: str = "relu",
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        check_args(num_classes, in_channels, activation)
        self.shortcut_kind = shortcut
        if depth < 8 or (depth - 2) % 6:
            raise SigngradError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = make_activation(activation, 16)
        self.in_planes = 16
        self.layer1 = self._make_stage(16, n, 1, activation)
        self.layer2 = self._make_stage(32, n, 2, activation)
        self.layer3 = self._make_stage(64, n, 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def _make_stage(self, planes: int, n: int, stride: int, activation: str) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(
                BasicBlock(
                    self.in_planes, planes, s, activation=activation, shortcut=self.shortcut_kind
                )
            )
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def option_b(depth: int) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, in_channels: int, activation: str = "relu") -> CifarResNet:
        return CifarResNet(
            depth,
            num_classes=num_classes,
            in_channels=in_channels,
            activation=activation,
            shortcut="B",
        )

    build.__doc__ = (
        f"ResNet-{depth} for CIFAR with option-B (1x1 convolution) shortcuts, the layout "
        "of the MetaQuant/FSG authors' pretrained models."
    )
    return build


def resnet20(*, num_classes: int, in_channels: int, activation: str = "relu") -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016): n=3; 0.27M parameters (269,722 for 10 classes)."""
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, activation=activation)


def resnet32(*, num_classes: int, in_channels: int, activation: str = "relu") -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016): n=5; 0.46M parameters (464,154 for 10 classes)."""
    return CifarResNet(32, num_classes=num_classes, in_channels=in_channels, activation=activation)


def resnet44(*, num_classes: int, in_channels: int, activation: str = "relu") -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2016): n=7; 0.66M parameters (658,586 for 10 classes)."""
    return CifarResNet(44, num_classes=num_classes, in_channels=in_channels, activation=activation)


def resnet56(*, num_classes: int, in_channels: int, activation: str = "relu") -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016): n=9; 0.85M parameters (853,018 for 10 classes)."""
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels, activation=activation)


def resnet110(*, num_classes: int, in_channels: int, activation: str = "relu") -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016): n=18; 1.7M parameters (1,727,962 for 10 classes)."""
    return CifarResNet(110, num_classes=num_classes, in_channels=in_channels, activation=activation)


# --------------------------------------------------------------------------- ResNet-18


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) with the usual CIFAR stem.

    conv3x3(64, stride 1)-BN-act stem (no max-pool), four stages of two
    :class:`BasicBlock` with 64/128/256/512 channels (stride 2 at the start of stages
    2-4, 1x1-conv + BN projection shortcuts when the shape changes), global average
    pool, linear classifier. Convs use Kaiming-normal (fan-out) initialization and the
    linear layer PyTorch's default, as in torchvision.
    """

    def __init__(self, *, num_classes: int, in_channels: int, activation: str = "relu") -> None:
        super().__init__()
        check_args(num_classes, in_channels, activation)
        self.conv1 = conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.act1 = make_activation(activation, 64)
        self.in_planes = 64
        self.layer1 = self._make_stage(64, 1, activation)
        self.layer2 = self._make_stage(128, 2, activation)
        self.layer3 = self._make_stage(256, 2, activation)
        self.layer4 = self._make_stage(512, 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_stage(self, planes: int, stride: int, activation: str) -> nn.Sequential:
        first = BasicBlock(self.in_planes, planes, stride, activation=activation, shortcut="B")
        self.in_planes = planes
        second = BasicBlock(planes, planes, 1, activation=activation, shortcut="B")
        return nn.Sequential(first, second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(*, num_classes: int, in_channels: int, activation: str = "relu") -> ResNet18:
    """ResNet-18, CIFAR stem (He et al. 2016): 11.17M parameters (11,173,962 for 10 classes)."""
    return ResNet18(num_classes=num_classes, in_channels=in_channels, activation=activation)


# --------------------------------------------------------------------------- VGG-Small


class VGGSmall(nn.Module):
    """VGG-Small as used by LQ-Nets (Zhang et al. 2018) and later binary-network papers.

    conv(128)-BN-act, conv(128)-maxpool-BN-act, conv(256)-BN-act,
    conv(256)-maxpool-BN-act, conv(512)-BN-act, conv(512)-maxpool-BN-act (all 3x3,
    padding 1, no bias), flatten, Linear(512 * s * s -> num_classes) with
    ``s = image_size // 8``. PyTorch default initialization.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int = 32,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_args(num_classes, in_channels, activation)
        check_int("image_size", image_size, 8)
        if image_size % 8:
            raise SigngradError(f"vgg-small needs image_size divisible by 8, got {image_size}")
        self.image_size = image_size
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in (128, 256, 512):
            layers += [conv3x3(c_in, c_out), nn.BatchNorm2d(c_out)]
            layers.append(make_activation(activation, c_out))
            layers += [conv3x3(c_out, c_out), nn.MaxPool2d(2), nn.BatchNorm2d(c_out)]
            layers.append(make_activation(activation, c_out))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        s = image_size // 8
        self.fc = nn.Linear(512 * s * s, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def vgg_small(
    *, num_classes: int, in_channels: int, image_size: int = 32, activation: str = "relu"
) -> VGGSmall:
    """VGG-Small (LQ-Nets, Zhang et al. 2018): 4.66M parameters (4,660,106 on 32x32x3, 10 cls)."""
    return VGGSmall(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=activation,
    )


# --------------------------------------------------------------------------- ConvNet


class ConvNet(nn.Module):
    """Small ConvNet for MNIST-sized inputs (28x28; any size >= 4 works).

    conv(16)-BN-act, conv(32)-BN-act, maxpool, conv(64)-BN-act, maxpool (all 3x3,
    padding 1, no bias), global average pool, Linear(64 -> num_classes). PyTorch
    default initialization. About 10M multiply-accumulates per 32x32 image, a quarter of
    ResNet-20's, so that quick experiments and tests stay quick.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int = 28,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_args(num_classes, in_channels, activation)
        check_int("image_size", image_size, 4)
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = make_activation(activation, 16)
        self.conv2 = conv3x3(16, 32)
        self.bn2 = nn.BatchNorm2d(32)
        self.act2 = make_activation(activation, 32)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = conv3x3(32, 64)
        self.bn3 = nn.BatchNorm2d(64)
        self.act3 = make_activation(activation, 64)
        self.pool3 = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.pool2(self.act2(self.bn2(self.conv2(x))))
        x = self.pool3(self.act3(self.bn3(self.conv3(x))))
        return self.fc(torch.flatten(self.gap(x), 1))


def convnet(
    *, num_classes: int, in_channels: int, image_size: int = 28, activation: str = "relu"
) -> ConvNet:
    """Small ConvNet for 28x28 inputs: 24,058 parameters (1 input channel, 10 classes)."""
    return ConvNet(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=activation,
    )
