"""The ImageNet-sized CNNs and the vision transformers: published sizes, binarization,
training with resume, export where the runtime has their operations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from signgrad import config, convert, layers, models
from signgrad.models.counting import macs


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# Published figures at 224 x 224 (32 x 32 for ViT-Lite), 1,000 classes (10 for ViT-Lite):
# torchvision's ResNets; Bi-Real Net (Liu et al. 2018, Table 5: BOPs and FLOPs); ReActNet
# (Liu et al. 2020, Table 1: BOPs 4.82e9, FLOPs 0.12e8); ViT-Lite-7/4 (Hassani et al.
# 2021: 3.72 M parameters, 0.239 G MACs); DeiT-Tiny (timm: 5,717,416 parameters,
# 1.3 G FLOPs). "binary": the layers between stem and classifier that the paper
# binarizes; "real": the rest of the convolutions and linear layers.
PUBLISHED = [
    # name, classes, size, parameters (exact or within 0.5%), binary MACs, real MACs
    ("resnet18-imagenet", 1000, 224, 11_689_512, None, None),
    ("resnet34-imagenet", 1000, 224, 21_797_672, None, None),
    ("birealnet18", 1000, 224, 11_689_512, 1.68e9, 1.39e8),
    ("birealnet34", 1000, 224, 21_797_672, 3.53e9, 1.39e8),
    ("reactnet-a", 1000, 224, None, 4.82e9, 0.12e8),
    ("vit-lite", 10, 32, 3.72e6, 0.239e9, None),
    ("deit-tiny", 1000, 224, 5_717_416, None, None),
]


@pytest.mark.parametrize(("name", "classes", "size", "params", "binary", "real"), PUBLISHED)
def test_published_sizes(name, classes, size, params, binary, real):
    model = models.get(name, num_classes=classes, in_channels=3, image_size=size)
    if isinstance(params, int):
        assert _params(model) == params
    elif params is not None:
        assert _params(model) == pytest.approx(params, rel=5e-3)
    counted = macs(model, (3, size, size))
    names = list(counted.layers)
    kept = convert.KEEP_POLICIES.get("first_last_shortcuts")(names)
    if binary is not None:  # papers round to three figures
        assert counted.of([n for n in names if n not in kept]) == pytest.approx(binary, rel=5e-3)
    if real is not None:
        assert counted.of(kept) == pytest.approx(real, rel=1.5e-2)
    if name == "resnet18-imagenet":
        assert counted.total == pytest.approx(1.81e9, rel=5e-3)  # torchvision: 1.81 GFLOPS
    if name == "resnet34-imagenet":
        assert counted.total == pytest.approx(3.66e9, rel=5e-3)
    if name == "deit-tiny":  # 1.3 G with the attention's products, one figure rounded
        assert counted.total == pytest.approx(1.3e9, rel=4e-2) and counted.attention > 0


def test_default_activations_are_the_papers():
    assert models.default_activation("birealnet18") == "identity"
    assert models.default_activation("reactnet-a", binary_inputs=True) == "rprelu"
    assert models.default_activation("vit-lite") == "gelu"
    assert models.default_activation("resnet18-imagenet", binary_inputs=True) == "hardtanh"
    cfg = config.Config(model="birealnet18", input_quantizer="bnn").resolved()
    assert cfg.activation == "identity"
    block = models.get("reactnet-a", num_classes=10, in_channels=3).features[0]
    assert isinstance(block.act1, models.common.RPReLU)
    vit = models.get("vit-lite", num_classes=10, in_channels=3, activation="relu")
    assert isinstance(vit.blocks[0].act, nn.ReLU)


def test_keep_first_last_shortcuts():
    model = models.get("birealnet18", num_classes=10, in_channels=3, image_size=64)
    convert.binarize(model, "bnn", "bnn", keep="first_last_shortcuts")
    real = [n for n, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.Linear)]  # fmt: skip
    assert real == ["conv1", "layer2.0.shortcut.1", "layer3.0.shortcut.1",
                    "layer4.0.shortcut.1", "fc"]  # fmt: skip
    binary = [m for m in model.modules() if isinstance(m, layers.BinaryConv2d)]
    assert len(binary) == 16 and all(m.kernel_size == (3, 3) for m in binary)
    vit = models.get("deit-tiny", num_classes=10, in_channels=3, image_size=32)
    convert.binarize(vit, "bnn", "bnn")
    assert type(vit.patch_embed) is nn.Conv2d and type(vit.fc) is nn.Linear
    assert sum(isinstance(m, layers.BinaryLinear) for m in vit.modules()) == 12 * 4
    out = vit(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 10) and vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["fsg", "metaquant-fc"])
def test_learned_estimators_train_a_transformer(name):
    from torch.nn import functional as F

    from signgrad import estimators

    torch.manual_seed(0)
    vit = models.transformers.VisionTransformer(
        num_classes=4, in_channels=3, image_size=8, patch=4, dim=16, depth=1, heads=2,
        mlp_dim=32, qkv_bias=True,
    )  # fmt: skip
    convert.binarize(vit, "dorefa", keep="none")
    est = estimators.build(name, vit)
    opt = torch.optim.Adam(vit.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    before = vit.blocks[0].fc1.weight.detach().clone()
    losses = []
    for _ in range(15):
        est.begin_step(1e-3)
        loss = F.cross_entropy(vit(x), y)
        opt.zero_grad(set_to_none=True)
        est.zero_grad()
        loss.backward()
        assert est.end_step() == 0  # no fallback to STE: the estimator's own gradient
        opt.step()
        losses.append(loss.item())
    # Binary weights make single steps noisy: the last five against the start.
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    assert not torch.equal(before, vit.blocks[0].fc1.weight)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "extra", "exports"), [
    ("birealnet18", ["--keep", "first_last_shortcuts"], True),
    # Plain SGD: no optimizer state, so that this 29 M-parameter model's checkpoints stay small.
    ("reactnet-a", ["--optimizer", "sgd", "--momentum", "0"], False),
    ("vit-lite", [], False),
    ("deit-tiny", [], False),
])  # fmt: skip
def test_train_resume_export(name, extra, exports, pictures, tmp_path, run_cli, capsys):
    common = ["--model", name, "--data", f"imagefolder:{pictures}", "--quantizer", "bnn",
              "--input-quantizer", "bnn", "--epochs", "2", "--batch-size", "8",
              "--no-progress", *extra]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("train", *common, "--out", whole) == 0
    assert run_cli("train", *common, "--out", split, "--stop-after", "1") == 0
    assert run_cli("train", *common, "--out", split, "--resume") == 0
    assert _metrics(whole) == _metrics(split) and len(_metrics(whole)) == 2
    a, b = (torch.load(r / "checkpoint.pt", weights_only=False)["model"] for r in (whole, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    code = run_cli("export", whole, "--out", tmp_path / "model.safetensors")
    err = capsys.readouterr().err
    if exports:
        assert code == 0 and (tmp_path / "model.safetensors").stat().st_size > 0
    else:
        assert code != 0 and len(err.strip().splitlines()) == 1
        assert "cannot be exported: the runtime has no such operation" in err
        assert not (tmp_path / "model.safetensors").exists()
