"""The packed runtime against PyTorch: kernels, whole networks on the real test sets,
the file format's checks, and what it refuses."""

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signgrad import convert, data, export, graph, layers, models
from signgrad.errors import SigngradError
from signgrad.runtime import format as fmt
from signgrad.runtime import kernels as K
from signgrad.runtime import model as runtime
from signgrad.runtime import network

needs_compiled = pytest.mark.skipif(K.COMPILED is None, reason=f"no kernels: {K.UNAVAILABLE}")
BACKENDS = ["numpy", pytest.param("compiled", marks=needs_compiled)]

#: the stated tolerance: |runtime logit - PyTorch logit| <= TOL * (1 + max |PyTorch logit|)
TOL = 1e-4


def sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


# ------------------------------------------------------------------------------ kernels


@needs_compiled
@pytest.mark.parametrize(
    "c, o, size, stride, padding, kernel",
    [
        (64, 64, 8, 1, 1, 3),  # one word, one block of 64 outputs
        (3, 16, 7, 2, 1, 3),  # few channels, odd size, stride 2
        (70, 72, 5, 1, 2, 3),  # two words; 64 + 8 outputs
        (130, 10, 6, 2, 0, 1),  # three words; outputs not a multiple of 8 (portable path)
        (16, 24, 9, 3, 0, 2),  # even kernel, stride 3
    ],
)
def test_bconv2d_equals_conv_of_signs(c, o, size, stride, padding, kernel):
    g = torch.Generator().manual_seed(c * o)
    x = torch.randn(2, c, size, size, generator=g)
    x[0, :, 0, 0] = 0.0  # sign(0) = +1
    w = sign(torch.randn(o, c, kernel, kernel, generator=g))
    scale, shift = torch.rand(o, generator=g) + 0.5, torch.randn(o, generator=g)
    ref = F.conv2d(sign(x), w, stride=stride, padding=padding)
    ref = ref * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    residual = torch.randn(ref.shape, generator=g)
    ref_act = torch.clamp(ref + residual, -1, 1)

    x_bits = K.pack_words(x.permute(0, 2, 3, 1).numpy(), threads=2)
    args = ((kernel, kernel), (stride, stride), (padding, padding), scale.numpy(), shift.numpy())
    w_words = K.pack_weight_words(w.numpy())
    y, bits = K.bconv2d(x_bits, w_words, c, *args, None, None, (0.0, 0.0, None), False, 2)
    assert bits is None
    torch.testing.assert_close(torch.from_numpy(y).permute(0, 3, 1, 2), ref, rtol=1e-6, atol=1e-5)
    res = np.ascontiguousarray(residual.permute(0, 2, 3, 1).numpy())
    y, bits = K.bconv2d(x_bits, w_words, c, *args, res, "hardtanh", (-1.0, 1.0, None), True, 1)
    torch.testing.assert_close(
        torch.from_numpy(y).permute(0, 3, 1, 2), ref_act, rtol=1e-6, atol=1e-5
    )
    # The packed signs of the output are those the next layer would pack from it.
    np.testing.assert_array_equal(bits, K.pack_words(y, threads=1))


@needs_compiled
def test_pack_words_bit_layout():
    x = np.full((1, 70), 1.0, dtype=np.float32)
    x[0, [0, 5, 64, 69]] = -1.0
    x[0, 7] = 0.0  # sign(0) = +1: bit 0
    x[0, 8] = np.nan  # NaN -> -1, as signgrad's sign()
    bits = K.pack_words(x, threads=1)
    assert bits.shape == (1, 2)
    assert int(bits[0, 0]) == (1 << 0) | (1 << 5) | (1 << 8)
    assert int(bits[0, 1]) == (1 << 0) | (1 << 5)


def test_pack_signs_round_trip_and_layout():
    rng = np.random.default_rng(0)
    w = np.where(rng.standard_normal((5, 3, 3, 3)) >= 0, 1.0, -1.0).astype(np.float32)
    packed = fmt.pack_signs(w)
    assert packed.dtype == np.uint8 and packed.shape == (5, 4)  # 27 bits -> 4 bytes
    np.testing.assert_array_equal(fmt.unpack_signs(packed, [5, 3, 3, 3]), w)
    # bit i of byte j of row o is element 8 j + i, 1 for -1
    assert (packed[0, 0] >> 2) & 1 == (w.reshape(5, -1)[0, 2] < 0)
    with pytest.raises(SigngradError, match="exactly"):
        fmt.pack_signs(np.array([[0.5, 1.0]]))


# ------------------------------------------------------------------------------ networks


def calibrated(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Batch-norm statistics from real images (train-mode forwards), then eval()."""
    model.train()
    with torch.no_grad():
        for chunk in images.split(128):
            model(chunk)
    return model.eval()


def trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """A few Adam steps on real images: weights and BN statistics away from their init."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def normalised(ds: data.DataSet, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def packed_of(model: nn.Module, ds: data.DataSet, backend: str) -> runtime.PackedModel:
    c, (h, w) = ds.in_channels, ds.image_size
    src = export.Source(model, (c, h, w), ds.classes, list(ds.mean), list(ds.std), {})
    return runtime.build(*fmt.read_bytes(export.packed(src)), backend=backend, threads=2)


def assert_same_predictions(model: nn.Module, pm: runtime.PackedModel, ds: data.DataSet):
    """Every test image: the same class, and logits within the stated tolerance."""
    for start in range(0, len(ds.test_labels), 500):
        images = ds.test_images[start : start + 500]
        with torch.no_grad():
            ref = model(normalised(ds, images)).numpy()
        # The runtime's own preprocessing from uint8, as `signgrad predict` uses it.
        got = pm.run(pm.preprocess(images.numpy()))
        np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
        assert np.abs(got - ref).max() <= TOL * (1 + np.abs(ref).max())


@pytest.fixture(scope="module")
def cifar(cifar_root) -> data.DataSet:
    return data.load("cifar10", root=cifar_root, download=False)


@pytest.fixture(scope="module")
def cifar_resnet20(cifar) -> nn.Module:
    torch.manual_seed(0)
    m = models.get("resnet20", num_classes=10, in_channels=3, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    return trained(m, normalised(cifar, cifar.train_images), cifar.train_labels, steps=15)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_resnet20_1w1a_matches_pytorch_on_every_cifar_test_image(cifar, cifar_resnet20, backend):
    pm = packed_of(cifar_resnet20, cifar, backend)
    assert pm.backend == backend
    if backend == "compiled":  # the 18 binary convolutions on the popcount kernel
        assert [r[0] for r in pm.network.rows].count(network.BCONV) == 18 and not pm.steps
        # Only the first convolution of each block has no float reader (the second one's
        # output meets the shortcut): its signs may come straight from the counts.
        flags = network.FIELDS.index("flags")
        signs_only = [
            name
            for name, r in zip(pm.network.names, pm.network.rows, strict=True)
            if r[0] == network.BCONV and r[flags] & network.BITS_ONLY
        ]
        assert signs_only == [f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in range(3)]
    else:
        assert pm.network is None and len(pm.steps) == len(pm.graph["nodes"])
    assert_same_predictions(cifar_resnet20, pm, cifar)


@pytest.mark.slow
@needs_compiled
def test_hyper_vgg_small_with_channel_scaling_matches_pytorch(cifar):
    torch.manual_seed(1)
    m = models.get("vgg-small", num_classes=10, in_channels=3, image_size=32, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn", scaling="channel", hyper=True)
    m = calibrated(m, normalised(cifar, cifar.train_images[:512]))
    assert_same_predictions(m, packed_of(m, cifar, "compiled"), cifar)


@pytest.mark.slow
@needs_compiled
def test_resnet18_prelu_binary_shortcuts_match_pytorch(cifar):
    torch.manual_seed(2)
    m = models.get("resnet18", num_classes=10, in_channels=3, activation="prelu")
    convert.binarize(m, "bnn", "bnn", scaling="tensor")
    for mod in m.modules():
        if isinstance(mod, nn.PReLU):
            nn.init.uniform_(mod.weight, -0.5, 0.5)
    m = calibrated(m, normalised(cifar, cifar.train_images[:256]))
    sub = data.DataSet(
        **{
            **vars(cifar),
            "test_images": cifar.test_images[:200],
            "test_labels": cifar.test_labels[:200],
        }
    )
    pm = packed_of(m, cifar, "compiled")
    # 16 convs + 3 binarized 1x1 projections on the popcount kernel
    assert [r[0] for r in pm.network.rows].count(network.BCONV) == 19
    assert_same_predictions(m, pm, sub)


@pytest.fixture(scope="module")
def fashion(cifar_root) -> data.DataSet:
    if not (cifar_root / "fashion-mnist").is_dir():
        pytest.skip("SIGNGRAD_DATA with fashion-mnist is not available")
    return data.load("fashion-mnist", root=cifar_root, download=False)


@pytest.mark.slow
@pytest.mark.parametrize("inputs", ["bnn", None], ids=["1W1A", "1W32A"])
def test_convnet_matches_pytorch_on_every_fashion_mnist_test_image(fashion, inputs):
    torch.manual_seed(3)
    act = "hardtanh" if inputs else "relu"
    m = models.get("convnet", num_classes=10, in_channels=1, image_size=28, activation=act)
    convert.binarize(m, "bnn", inputs, keep="first")  # the classifier is binary too
    train_x = normalised(fashion, fashion.train_images[:4096])
    m = trained(m, train_x, fashion.train_labels[:4096], steps=15)
    backend = "compiled" if K.COMPILED else "numpy"
    assert_same_predictions(m, packed_of(m, fashion, backend), fashion)


# ------------------------------------------------------------------------------ refusals


def small_binary_model() -> nn.Module:
    torch.manual_seed(0)
    m = models.get("convnet", num_classes=10, in_channels=1, image_size=8, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    return m.eval()


def packed_bytes(m: nn.Module) -> bytes:
    src = export.Source(m, (1, 8, 8), [str(i) for i in range(10)], [0.5], [0.25], {})
    return export.packed(src)


def test_damaged_truncated_and_foreign_files_are_refused(tmp_path):
    blob = packed_bytes(small_binary_model())
    good = tmp_path / "good.safetensors"
    good.write_bytes(blob)
    assert runtime.load(good, backend="numpy").classes[3] == "3"

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(SigngradError, match="truncated or damaged"):
        runtime.load(cut)
    flipped = bytearray(blob)
    flipped[-50] ^= 0x10  # one bit of the data section
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(SigngradError, match="checksum"):
        runtime.load(bad)
    with pytest.raises(SigngradError, match="no packed model"):
        runtime.load(tmp_path / "missing.safetensors")

    from safetensors.numpy import save

    other = tmp_path / "other.safetensors"
    other.write_bytes(save({"w": np.zeros(3, np.float32)}, metadata={"format": "pt"}))
    with pytest.raises(SigngradError, match="not a signgrad packed model"):
        runtime.load(other)


def test_another_format_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "VERSION", 2)  # a file written by a future signgrad
    blob = packed_bytes(small_binary_model())
    monkeypatch.undo()
    with pytest.raises(SigngradError, match="version 2; this signgrad reads version 1"):
        fmt.read_bytes(blob)


def test_unknown_op_in_a_file_is_refused():
    graph_doc, tensors = fmt.read_bytes(packed_bytes(small_binary_model()))
    graph_doc["nodes"][1]["op"] = "sigmoid"
    with pytest.raises(SigngradError, match="op 'sigmoid', which this runtime cannot run"):
        runtime.build(*fmt.read_bytes(fmt.to_bytes(graph_doc, tensors)))


def test_wrong_input_shape_is_refused():
    pm = runtime.build(*fmt.read_bytes(packed_bytes(small_binary_model())), backend="numpy")
    with pytest.raises(SigngradError, match="this model takes N x 1 x 8 x 8"):
        pm.run(np.zeros((2, 3, 8, 8), np.float32))


@pytest.mark.skipif(K.COMPILED is None, reason="the compiled kernels are not built")
@pytest.mark.parametrize("n", [1, 3])
def test_every_place_starts_a_cache_line(n):
    # a pixel's 16 float channels, or 8 weight words, then fill one 64-byte line: the
    # kernels' whole-register loads and stores of them do not straddle two
    pm = runtime.build(*fmt.read_bytes(packed_bytes(small_binary_model())), backend="compiled")
    net = pm.network
    ops, arena, bits = net._for_batch(n)
    assert arena.size == n * net.arena_per_image and bits.size == n * net.bits_per_image
    assert all(a.ctypes.data % 64 == 0 for a in (arena, bits, net.fp, net.wp))
    assert net.place and all(p % network.ALIGN == 0 for p in net.place.values())
    col = {k: network.FIELDS.index(k) for k in ("op", "wt", "scale", "shift")}
    bconv = [r for r in ops if r[col["op"]] == network.BCONV]
    assert bconv and all(r[col["wt"]] % 8 == 0 for r in bconv)
    assert all(r[col[k]] % network.ALIGN == 0 for r in bconv for k in ("scale", "shift"))
    x = np.random.default_rng(0).standard_normal((n, 1, 8, 8)).astype(np.float32)
    reference = runtime.build(*fmt.read_bytes(packed_bytes(small_binary_model())), backend="numpy")
    # (the last layer's float sums round differently in numpy's BLAS: an ulp or so)
    np.testing.assert_allclose(pm.run(x), reference.run(x), rtol=0, atol=1e-6)


def test_layers_the_runtime_cannot_run_are_refused_at_export():
    m = nn.Sequential(layers.BinaryConv2d(1, 4, 3, input_quantizer="bnn"), nn.Sigmoid())
    with pytest.raises(SigngradError, match=r"layer '1' \(Sigmoid\) cannot be exported"):
        graph.build(m.eval(), (1, 8, 8))
    grouped = nn.Sequential(layers.BinaryConv2d(4, 4, 3, groups=2))
    with pytest.raises(SigngradError, match="grouped or dilated"):
        graph.build(grouped.eval(), (4, 8, 8))


def test_soft_quantizers_are_refused_until_they_are_the_exact_sign():
    m = models.get("convnet", num_classes=10, in_channels=1, image_size=8, activation="hardtanh")
    convert.binarize(m, "pc", "ste-warmup")
    with pytest.raises(SigngradError, match="not give \\+-1 yet|not yet the exact sign"):
        graph.build(m.eval(), (1, 8, 8))
    layers.set_epoch(m, 9, 10)  # the last 10% of the epochs: exact sign
    assert [n["binary_weight"] for n in graph.build(m, (1, 8, 8)).nodes if "weight" in n]


def test_missing_compiled_kernels_fall_back_with_a_message(monkeypatch, caplog):
    blob = packed_bytes(small_binary_model())
    monkeypatch.setattr(K, "COMPILED", None)
    monkeypatch.setattr(K, "UNAVAILABLE", "no module named _kernels")
    with caplog.at_level(logging.WARNING):
        pm = runtime.build(*fmt.read_bytes(blob))
    assert pm.backend == "numpy"
    assert "compiled kernels unavailable (no module named _kernels)" in caplog.text
    with pytest.raises(SigngradError, match="compiled kernels are not available"):
        runtime.build(*fmt.read_bytes(blob), backend="compiled")


def test_the_runtime_runs_without_pytorch(tmp_path):
    """A deployed model needs numpy and safetensors, not torch or the training code."""
    import subprocess
    import sys

    m = small_binary_model()
    path = tmp_path / "m.safetensors"
    path.write_bytes(packed_bytes(m))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    script = (
        "import sys, numpy as np\n"
        "for name in ('torch', 'signgrad.train', 'signgrad.layers', 'signgrad.graph'):\n"
        "    sys.modules[name] = None  # importing any of them now fails\n"
        "from signgrad.runtime import load\n"
        f"pm = load({str(path)!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, pm.run(np.load({str(tmp_path / 'x.npy')!r})))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_array_equal(got.argmax(1), ref.argmax(1))
    assert np.abs(got - ref).max() <= TOL * (1 + np.abs(ref).max())


def test_inconsistent_graphs_are_refused():
    graph_doc, tensors = fmt.read_bytes(packed_bytes(small_binary_model()))
    conv = next(n for n in graph_doc["nodes"] if n["op"] == "conv2d" and n["binary_weight"])
    tensors[conv["shift"]] = tensors[conv["shift"]][:3]
    with pytest.raises(SigngradError, match="shift of layer .* has shape"):
        runtime.build(graph_doc, tensors)
    del conv["shift"]
    with pytest.raises(SigngradError, match="malformed graph"):
        runtime.build(graph_doc, tensors)
