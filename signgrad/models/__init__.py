"""Full-precision reference architectures, ready to be binarized, by name in
:data:`MODELS`: CIFAR-sized CNNs (:mod:`.cifar`), ImageNet-sized CNNs with the papers'
binary-network layouts (:mod:`.imagenet`), vision transformers (:mod:`.transformers`);
what they share is in :mod:`.common`, and :mod:`.counting` counts their MACs.

Every model here is built only from ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``,
pooling and activation modules, so that :func:`signgrad.convert.binarize` can swap the
conv and linear modules for binary versions. Conventions every model keeps:

* every conv / linear layer is an ``nn.Conv2d`` / ``nn.Linear`` submodule (no functional
  convolutions), and convs followed by batch norm have ``bias=False``;
* the stem (first layer) is the first ``nn.Conv2d`` in ``model.modules()`` order and the
  classifier is the last ``nn.Linear`` (it is also ``model.fc``);
* ``num_classes`` and ``in_channels`` are always arguments;
* ``activation`` picks the nonlinearity (see :func:`make_activation`): with 1-bit
  activations ``sign(relu(x))`` is constantly +1, so binary-activation networks want
  ``"hardtanh"``; Bi-Real Net, ReActNet and the transformers default to their papers'
  (:func:`default_activation`).

Parameter counts quoted in the docstrings are ``sum(p.numel() for p in
model.parameters())`` (batch-norm running statistics are buffers, not counted).

Use :func:`get` (by name, see :func:`names`) or call a builder directly.
"""

from collections.abc import Callable

from torch import nn

from signgrad.models.cifar import (
    CifarResNet,
    ConvNet,
    ResNet18,
    VGGSmall,
    convnet,
    option_b,
    resnet18,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    vgg_small,
)
from signgrad.models.common import (
    ACTIVATIONS,
    BasicBlock,
    ShortcutA,
    check_int,
    make_activation,
)
from signgrad.models.imagenet import (
    BiRealNet,
    ImageNetResNet,
    ReActNetA,
    birealnet18,
    birealnet34,
    reactnet_a,
    resnet18_imagenet,
    resnet34_imagenet,
)
from signgrad.models.transformers import VisionTransformer, deit_tiny, vit_lite
from signgrad.registry import Registry

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "NATIVE_ACTIVATIONS",
    "BasicBlock",
    "BiRealNet",
    "CifarResNet",
    "ConvNet",
    "ImageNetResNet",
    "ReActNetA",
    "ResNet18",
    "ShortcutA",
    "VGGSmall",
    "VisionTransformer",
    "birealnet18",
    "birealnet34",
    "convnet",
    "deit_tiny",
    "default_activation",
    "get",
    "make_activation",
    "names",
    "reactnet_a",
    "resnet18_imagenet",
    "resnet34_imagenet",
    "vit_lite",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "vgg_small",
]


# --------------------------------------------------------------------------- registry


def _sized(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Adapt a builder that does not use ``image_size`` (fully convolutional + GAP)."""

    def build(*, num_classes: int, in_channels: int, image_size: int, activation: str) -> nn.Module:
        check_int("image_size", image_size, 1)
        return builder(num_classes=num_classes, in_channels=in_channels, activation=activation)

    build.__doc__ = builder.__doc__  # the registry's summary
    return build


#: Every architecture by name: builders taking ``num_classes``, ``in_channels``,
#: ``image_size`` and ``activation`` (see :func:`get`).
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
for _name, _builder in [
    ("resnet20", _sized(resnet20)),
    ("resnet32", _sized(resnet32)),
    ("resnet44", _sized(resnet44)),
    ("resnet56", _sized(resnet56)),
    ("resnet110", _sized(resnet110)),
    *[(f"resnet{d}-b", _sized(option_b(d))) for d in (20, 32, 44, 56, 110)],
    ("resnet18", _sized(resnet18)),
    ("vgg-small", vgg_small),
    ("convnet", convnet),
    ("resnet18-imagenet", _sized(resnet18_imagenet)),
    ("resnet34-imagenet", _sized(resnet34_imagenet)),
    ("birealnet18", _sized(birealnet18)),
    ("birealnet34", _sized(birealnet34)),
    ("reactnet-a", _sized(reactnet_a)),
    ("vit-lite", vit_lite),
    ("deit-tiny", deit_tiny),
]:
    MODELS.register(_name, _builder)

#: The nonlinearity of the models whose papers use another than ReLU (see
#: :func:`default_activation`).
NATIVE_ACTIVATIONS = {
    "birealnet18": "identity",
    "birealnet34": "identity",
    "reactnet-a": "rprelu",
    "vit-lite": "gelu",
    "deit-tiny": "gelu",
}


def default_activation(name: str, binary_inputs: bool = False) -> str:
    """The activation model ``name`` gets when none is asked for: its paper's where
    :data:`NATIVE_ACTIVATIONS` names one, else ``hardtanh`` with 1-bit activations
    (``sign(relu(x))`` would be constant) and ``relu`` otherwise."""
    native = NATIVE_ACTIVATIONS.get(MODELS.canonical(name))
    return native or ("hardtanh" if binary_inputs else "relu")


def names() -> list[str]:
    """Names accepted by :func:`get`, in registry order."""
    return MODELS.names()


def get(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int = 32,
    activation: str | None = None,
) -> nn.Module:
    """Build a full-precision model by name (see :func:`names`; any spelling, so
    ``vgg_small`` is ``vgg-small``).

    ``image_size`` is the side of the (square) input; ``vgg-small`` needs it to size its
    classifier (and requires a multiple of 8), the transformers to size their position
    embeddings (a multiple of the patch size), the others are size-agnostic through
    global average pooling. ``activation`` None: :func:`default_activation`. Bad names or
    arguments raise :class:`SigngradError`.
    """
    if activation is None:
        activation = default_activation(name)
    return MODELS.build(
        name,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        activation=activation,
    )
