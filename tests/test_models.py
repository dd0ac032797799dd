"""Tests for signgrad.models: shapes, parameter counts, layer order, errors, gradients."""

import pytest
import torch
from torch import nn

from signgrad import models
from signgrad.errors import SigngradError

CIFAR_RESNETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
OPTION_B = [f"{n}-b" for n in CIFAR_RESNETS]
IMAGENET = ["resnet18-imagenet", "resnet34-imagenet", "birealnet18", "birealnet34", "reactnet-a"]
TRANSFORMERS = ["vit-lite", "deit-tiny"]
ALL = [*CIFAR_RESNETS, *OPTION_B, "resnet18", "vgg-small", "convnet", *IMAGENET, *TRANSFORMERS]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(name: str, num_classes: int = 10, in_channels: int = 3, size: int = 32, **kw):
    return models.get(name, num_classes=num_classes, in_channels=in_channels, image_size=size, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_names():
    assert models.names() == ALL


@pytest.mark.parametrize(("name", "classes", "params"), [
    # The parameter counts of the MetaQuant/FSG authors' pretrained files (their state_dicts
    # without the BN running statistics): option A plus the two 1x1 projections and BNs.
    ("resnet20-b", 10, 272_474), ("resnet32-b", 10, 466_906), ("resnet44-b", 10, 661_338),
    ("resnet56-b", 100, 861_620),
])  # fmt: skip
def test_option_b_resnets_have_the_pretrained_files_parameter_counts(name, classes, params):
    model = build(name, num_classes=classes)
    assert n_params(model) == params
    projections = [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]
    assert len(projections) == 2


# ----------------------------------------------------------------------------- shapes

# The 34-layer ImageNet models are their 18-layer ones deeper: their sizes are checked in
# test_imagenet_models.py, their shapes need no second run here.
DEEPER = {"resnet34-imagenet", "birealnet34"}
SHAPE_CASES = [
    *[
        (n, c)
        for n in ALL
        if n not in {"convnet", *DEEPER}
        for c in [(10, 3, 32), (100, 3, 32), (10, 1, 32)]
    ],  # fmt: skip
    ("convnet", (10, 1, 28)),
    ("convnet", (10, 3, 32)),
    ("convnet", (100, 1, 28)),
    # size-agnostic models also take other sizes
    ("resnet20", (10, 1, 28)),
    ("resnet18", (10, 1, 28)),
    ("vgg-small", (10, 3, 64)),
]


@pytest.mark.parametrize(("name", "case"), SHAPE_CASES)
def test_output_shape(name, case):
    num_classes, in_channels, size = case
    model = build(name, num_classes, in_channels, size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- parameter counts


def test_resnet20_exact_parameter_count():
    model = build("resnet20")
    # 0.27M of He et al. with option-A (parameter-free) shortcuts. The often-quoted
    # 272,474 is the same net with option-B projections on the two downsampling blocks:
    # 269,722 + (16*32 + 2*32) + (32*64 + 2*64) = 272,474.
    assert n_params(model) == 269_722
    # hand count: stem 3*16*9 + BN 32; per stage 2n convs + BN; classifier 64*10 + 10
    stages = sum(6 * c * c * 9 + 6 * 2 * c for c in (16, 32, 64)) - (16 * 32 + 32 * 64) * 9
    assert n_params(model) == 3 * 16 * 9 + 32 + stages + 650
    # classifier is 64 * classes + classes; only it depends on num_classes
    assert n_params(build("resnet20", num_classes=100)) == 269_722 + 90 * 65


@pytest.mark.parametrize(
    ("name", "millions", "exact"),
    [
        ("resnet32", 0.46, 464_154),
        ("resnet44", 0.66, 658_586),
        ("resnet56", 0.85, 853_018),
        ("resnet110", 1.7, 1_727_962),
        ("resnet18", 11.17, 11_173_962),
        ("vgg-small", 4.66, 4_660_106),
    ],
)
def test_parameter_counts_match_papers(name, millions, exact):
    count = n_params(build(name))
    assert count == exact
    assert abs(count / 1e6 - millions) / millions < 0.02


def test_convnet_is_small():
    count = n_params(build("convnet", in_channels=1, size=28))
    # conv 1*16*9 + 16*32*9 + 32*64*9, BN 2*(16+32+64), fc 64*10 + 10
    assert count == 144 + 4608 + 18432 + 224 + 650 == 24_058


def test_vgg_classifier_depends_on_image_size():
    assert build("vgg-small", size=32).fc.in_features == 512 * 4 * 4
    assert build("vgg-small", size=64).fc.in_features == 512 * 8 * 8
    assert build("vgg-small", size=8).fc.in_features == 512


# ----------------------------------------------------------------------------- option-A shortcut


def test_option_a_shortcut_has_no_parameters_and_zero_pads():
    sc = models.ShortcutA(16, 32, stride=2)
    assert n_params(sc) == 0
    assert list(sc.buffers()) == []
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    # original channels in the middle, subsampled; zeros elsewhere
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0
    assert torch.count_nonzero(y[:, 24:]) == 0
    # odd spatial size matches a stride-2 3x3 conv with padding 1
    assert sc(torch.randn(1, 16, 7, 7)).shape == (1, 32, 4, 4)


def test_cifar_resnets_use_only_option_a_shortcuts():
    model = build("resnet20")
    shortcuts = [m for m in model.modules() if isinstance(m, models.ShortcutA)]
    assert len(shortcuts) == 2  # first block of stages 2 and 3
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # stem + 18 in blocks: no projection convs
    assert all(m.kernel_size == (3, 3) for m in convs)


def test_resnet18_uses_projection_shortcuts():
    model = build("resnet18")
    assert not any(isinstance(m, models.ShortcutA) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    one_by_one = [m for m in convs if m.kernel_size == (1, 1)]
    assert len(convs) == 1 + 16 + 3
    assert [m.stride for m in one_by_one] == [(2, 2)] * 3
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


# ----------------------------------------------------------------------------- layer order


@pytest.mark.parametrize("name", ALL)
def test_first_conv_is_stem_and_last_linear_is_classifier(name):
    model = build(name, num_classes=7, in_channels=5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs[0].in_channels == 5
    assert all(m.in_channels != 5 for m in convs[1:])
    assert linears[-1] is model.fc
    assert linears[-1].out_features == 7
    if name in TRANSFORMERS:  # linear layers throughout, a patch embedding with a bias
        return
    assert len(linears) == 1
    # every conv is followed by batch norm, hence has no bias
    assert all(m.bias is None for m in convs)


def test_stem_conv_shapes():
    assert build("resnet20").conv1.out_channels == 16
    stem = build("resnet18").conv1
    assert (stem.out_channels, stem.kernel_size, stem.stride) == (64, (3, 3), (1, 1))


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    ("act", "cls"),
    [("relu", nn.ReLU), ("hardtanh", nn.Hardtanh), ("prelu", nn.PReLU), ("identity", nn.Identity)],
)
def test_make_activation(act, cls):
    assert isinstance(models.make_activation(act, 8), cls)


def test_prelu_is_per_channel_and_not_shared():
    model = build("resnet20", activation="prelu")
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert len(prelus) == 1 + 2 * 9
    assert len({id(p.weight) for p in prelus}) == len(prelus)
    assert {p.num_parameters for p in prelus} == {16, 32, 64}


@pytest.mark.parametrize("name", ALL)
def test_activation_choice_is_used_everywhere(name):
    model = build(name, activation="hardtanh")
    assert any(isinstance(m, nn.Hardtanh) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


# ----------------------------------------------------------------------------- errors


def test_unknown_model_lists_valid_names():
    with pytest.raises(SigngradError, match="unknown model 'resnet21'.*resnet20.*vgg-small"):
        build("resnet21")


def test_name_is_case_and_underscore_tolerant():
    assert isinstance(build("VGG_Small"), models.VGGSmall)


def test_bad_activation_lists_valid_ones():
    with pytest.raises(SigngradError, match="unknown activation 'tanh'.*hardtanh.*identity"):
        models.make_activation("tanh", 4)
    for name in ALL:
        with pytest.raises(SigngradError, match="unknown activation 'swish'"):
            build(name, activation="swish")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes must be an integer >= 2"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 10.0}, "num_classes"),
        ({"num_classes": True}, "num_classes"),
        ({"in_channels": 0}, "in_channels must be an integer >= 1"),
        ({"size": 0}, "image_size"),
    ],
)
@pytest.mark.parametrize("name", ALL)
def test_bad_arguments(name, kwargs, match):
    with pytest.raises(SigngradError, match=match):
        build(name, **kwargs)


@pytest.mark.parametrize("size", [28, 30, 4, 0])
def test_vgg_small_needs_size_divisible_by_8(size):
    with pytest.raises(SigngradError, match="image_size"):
        build("vgg-small", size=size)


def test_convnet_needs_at_least_4_pixels():
    with pytest.raises(SigngradError, match="image_size"):
        build("convnet", size=3)


def test_bad_depth():
    with pytest.raises(SigngradError, match="6n\\+2"):
        models.CifarResNet(21, num_classes=10, in_channels=3)


def test_errors_are_one_line():
    for call in (
        lambda: build("nope"),
        lambda: build("convnet", activation="x"),
        lambda: build("vgg-small", size=20),
    ):
        with pytest.raises(SigngradError) as info:
            call()
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- gradients


def _check_backward(model: nn.Module, in_channels: int, size: int) -> None:
    model.train()
    out = model(torch.randn(4, in_channels, size, size))
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("name", [n for n in ALL if n not in DEEPER])
def test_backward_reaches_every_parameter(name):
    size = 32 if name in IMAGENET else 16  # five halvings: 1 x 1 at the end
    _check_backward(build(name, num_classes=5, in_channels=2, size=size), 2, size)


@pytest.mark.parametrize("act", models.ACTIVATIONS)
@pytest.mark.parametrize("name", ["resnet20", "convnet"])
def test_backward_with_each_activation(name, act):
    _check_backward(build(name, in_channels=1, size=16, activation=act), 1, 16)
