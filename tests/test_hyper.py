"""Hyper-BinaryNet: HyperConv2d / HyperLinear, hyper accumulation, binarize(hyper=True)."""

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signgrad import (
    checkpoint,
    cli,
    convert,
    estimators,
    hyper,
    layers,
    models,
    quantizers,
    schedules,
    train,
)
from signgrad.errors import SigngradError
from signgrad.hyper import HyperConv2d, HyperLinear


def identity_generator(layer):
    """Fix a linear generator to the identity (needs z_dim = kernel size)."""
    param = layer.generator.parametrizations.weight
    with torch.no_grad():
        param.original0.fill_(1.0)
        param.original1.copy_(torch.eye(param.original1.shape[0]))


@pytest.mark.parametrize("input_quantizer", [None, "bnn"])
@pytest.mark.parametrize("scaling", ["none", "channel"])
def test_identity_generator_on_one_hot_embeddings_is_the_binary_conv(input_quantizer, scaling):
    torch.manual_seed(0)
    hc = HyperConv2d(
        3,
        4,
        3,
        padding=1,
        stride=2,
        z_dim=9,
        weight_quantizer="bnn",
        input_quantizer=input_quantizer,
        scaling=scaling,
    )
    identity_generator(hc)
    # One-hot embeddings: kernel (o, i) has a single +-1 at position (o + i) mod 9.
    with torch.no_grad():
        hc.embedding.zero_()
        for row in range(hc.embedding.shape[0]):
            hc.embedding[row, row % 9] = 1.0 if row % 2 else -0.5
    kernel = hc.latent_weight().detach()
    assert torch.equal(kernel.reshape(-1, 9), hc.embedding.detach())
    bc = layers.BinaryConv2d(
        3,
        4,
        3,
        padding=1,
        stride=2,
        weight_quantizer="bnn",
        input_quantizer=input_quantizer,
        scaling=scaling,
    )
    with torch.no_grad():
        bc.weight.copy_(kernel)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(hc(x), bc(x))


@pytest.mark.parametrize("generator", hyper.GENERATORS)
def test_gradients_reach_every_embedding_and_generator_parameter(generator):
    torch.manual_seed(0)
    net = nn.Sequential(
        HyperConv2d(3, 8, 3, padding=1, generator=generator, input_quantizer="bnn"),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        HyperLinear(8 * 4 * 4, 5, generator=generator, z_dim=3),
    )
    net(torch.randn(6, 3, 4, 4)).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and (p.grad != 0).any(), name
    # Hyper accumulation: every kernel's embedding row gets its own gradient.
    rows = net[0].embedding.grad.abs().sum(1)
    assert (rows > 0).all()


def test_carry_reproduces_a_pretrained_kernel_and_binarize_hyper():
    torch.manual_seed(0)
    fp = models.get("resnet20", num_classes=10, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    fp.eval()
    bnet = convert.binarize(models.get("resnet20", num_classes=10, in_channels=3), "bc")
    bnet.load_state_dict(fp.state_dict())
    hnet = models.get("resnet20", num_classes=10, in_channels=3)
    hnet.load_state_dict(fp.state_dict())
    convert.binarize(hnet, "bc", hyper=True)
    convs = [m for m in hnet.modules() if isinstance(m, HyperConv2d)]
    assert len(convs) == 18  # 3x3 convs of ResNet-20, first (stem) and last kept
    bnet.eval()
    hnet.eval()
    torch.testing.assert_close(hnet(x), bnet(x))


def test_bad_hyper_settings():
    with pytest.raises(SigngradError, match="unknown generator 'conv'"):
        HyperConv2d(3, 4, 3, generator="conv")
    with pytest.raises(SigngradError, match="proxquant"):
        HyperConv2d(3, 4, 3, weight_quantizer="proxquant")
    with pytest.raises(SigngradError, match="z_dim"):
        HyperLinear(3, 4, z_dim=0)
    with pytest.raises(SigngradError, match="unknown hyper_params"):
        convert.binarize(nn.Sequential(nn.Linear(2, 2)), hyper=True, hyper_params={"width": 3})


def test_estimators_drive_hyper_layers_through_the_generator():
    # A learned estimator's gradient of the latent kernel is back-propagated into the
    # embeddings and the generator, replacing the straight-through gradients there.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 16, 3),
    )
    convert.binarize(net, "dorefa", keep="first_last", hyper=True)
    hc = net[3]
    est = estimators.build("fsg", net)
    assert est.layers == [hc]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 4, 4), torch.randint(0, 3, (8,))
    for step in range(2):
        est.begin_step(0.1)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        est.zero_grad()
        loss.backward()
        est.end_step()
        if step == 0:  # no history yet: the hyper layer makes no update
            assert hc.embedding.grad is None
        opt.step()
    ghat = est.update_gradient(0, torch.ones(hc.kernel_shape))  # a known latent gradient
    hc.set_latent_grad(ghat)
    latent = hc.latent_weight()
    (expected,) = torch.autograd.grad(latent, hc.embedding, ghat)
    torch.testing.assert_close(hc.embedding.grad, expected)


def test_ste_warmup_temperature_follows_its_schedule_to_exact_sign():
    # Per epoch on CIFAR: T = 0.95**epoch, exact sign for the last 10% of epochs.
    q = quantizers.get("ste-warmup")
    x = torch.linspace(-2, 2, 41)
    for epoch in range(10):
        q.set_epoch(epoch, 10)
        if epoch < 9:
            assert q.sharpness == pytest.approx(0.95**epoch)
            torch.testing.assert_close(q(x), torch.clamp(x / 0.95**epoch, -1, 1))
    assert torch.equal(q(x), torch.where(x >= 0, 1.0, -1.0))
    # Per iteration with a delay (large data sets): constant, then x0.985 every "1000 steps".
    s = schedules.parse("stepdecay:1:0.985:5:0.5")
    assert s(4.9, 100) == 1.0
    assert s(5.49, 100) == 1.0 and s(5.5, 100) == pytest.approx(0.985)
    assert s(7.0, 100) == pytest.approx(0.985**4)
    assert schedules.parse(s.spec()) == s


def test_recipe_and_flags():
    cfg = train.Config(**train.with_recipe({"recipe": "hyper-binarynet", "lr": 5e-3}))
    assert cfg.lr == 5e-3 and cfg.betas == [0.5, 0.99] and cfg.grad_clip == 5.0
    assert cfg.schedule == "step" and cfg.gamma == 0.5 and cfg.milestones[:2] == [60, 120]
    assert cfg.accumulate == 2  # the reference steps every second batch
    resolved = train.Config(model="hyper-vgg-small").resolved()
    assert resolved.model == "vgg-small" and resolved.hyper


@pytest.mark.slow
def test_short_1w1a_hyper_run_lowers_the_loss_and_repeats(tmp_path, cifar_root, capsys):
    args = ["train", "--model", "hyper-convnet", "--data", "cifar10", "--quantizer",
            "ste-warmup", "--input-quantizer", "ste-warmup", "--recipe", "hyper-binarynet",
            "--epochs", "3", "--batch-size", "64", "--no-progress"]  # fmt: skip
    for run in ("a", "b"):
        assert cli.main(["-q", *args, "--out", str(tmp_path / run)]) == 0
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["sharpness"] < records[0]["sharpness"]
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert any(k.endswith("embedding") for k in a["model"])
    # eval rebuilds the hyper model from the saved configuration
    capsys.readouterr()
    assert cli.main(["-q", "eval", str(tmp_path / "a")]) == 0
    assert f"test accuracy {100 * records[-1]['test_acc']:.2f}%" in capsys.readouterr().out
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
