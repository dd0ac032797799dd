import sys

import numpy as np
import pytest
import torch
from torch import nn

from signgrad import agreement, convert, graph, layers, models
from signgrad.errors import SigngradError
from signgrad.onnx_export import check_onnx, to_onnx

# signgrad.onnx_export imports onnx and onnxruntime only when used: skip without them.
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def calibrated(model, shape, batches=3):
    """Fill the batch-norm running statistics with a few train-mode passes, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(16, *shape))
    return model.eval()


def op_types(model):
    return {n.op_type for n in model.graph.node}


def assert_matches(om, model, x):
    diff, agree = check_onnx(om, model, x)
    with torch.no_grad():
        logits = model(x)
    assert agree == 1.0
    assert diff < 1e-3 * (1 + logits.abs().max().item()), diff


def ort_run(om, x):
    sess = ort.InferenceSession(om.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x.numpy()})[0]


def test_resnet20_1w1a_matches_torch():
    torch.manual_seed(0)
    m = models.get("resnet20", num_classes=10, in_channels=3, activation="hardtanh")
    m = calibrated(convert.binarize(m, "bnn", "bnn"), (3, 32, 32))
    g = graph.build(m, (3, 32, 32))
    assert sum(n["op"] == "conv2d" and n["binary_input"] for n in g.nodes) == 18
    assert any(n["op"] == "shortcut_a" for n in g.nodes)
    om = to_onnx(g, metadata={"model": "resnet20", "bits": "1W1A"})
    assert {"Where", "GreaterOrEqual", "Slice", "Pad", "Clip"} <= op_types(om)
    assert "Sign" not in op_types(om)  # ONNX Sign(0) = 0, the network wants +1
    assert {p.key: p.value for p in om.metadata_props} == {"model": "resnet20", "bits": "1W1A"}
    assert_matches(om, m, torch.randn(16, 3, 32, 32))


def test_vgg_small_1w1a_channel_scaling_hyper_matches_torch():
    torch.manual_seed(1)
    m = models.get("vgg-small", num_classes=10, in_channels=3, image_size=32, activation="hardtanh")
    m = calibrated(convert.binarize(m, "bnn", "bnn", scaling="channel", hyper=True), (3, 32, 32))
    g = graph.build(m, (3, 32, 32))
    # Batch norm after max-pool cannot be folded: the unfolded affine path is exercised.
    assert sum(n["op"] == "affine" for n in g.nodes) == 3
    om = to_onnx(g)
    assert "MaxPool" in op_types(om)
    assert_matches(om, m, torch.randn(4, 3, 32, 32))


def test_convnet_1w32a_prelu_matches_torch():
    torch.manual_seed(2)
    m = models.get("convnet", num_classes=10, in_channels=1, image_size=28, activation="prelu")
    with torch.no_grad():  # distinct slopes per channel, so a wrong broadcast shows
        for p in m.modules():
            if isinstance(p, nn.PReLU):
                p.weight.uniform_(-0.5, 0.5)
    m = calibrated(convert.binarize(m, "bnn", None), (1, 28, 28))
    om = to_onnx(graph.build(m, (1, 28, 28)))
    assert "PRelu" in op_types(om)
    assert "Where" not in op_types(om)  # 1W32A: no input signs
    assert_matches(om, m, torch.randn(16, 1, 28, 28))


def test_full_precision_resnet20_matches_torch():
    torch.manual_seed(3)
    m = calibrated(models.get("resnet20", num_classes=10, in_channels=3), (3, 32, 32))
    om = to_onnx(graph.build(m, (3, 32, 32)), opset=13)
    assert "Relu" in op_types(om)
    assert_matches(om, m, torch.randn(16, 3, 32, 32))


def test_other_ops_match_torch():
    # What the model zoo does not cover: an option-A shortcut with uneven channel padding
    # (1 before, 2 after) on an odd size, avg-pool with padding, relu, a single-slope
    # PReLU, an unfolded 2-D batch norm, a binary-input linear layer.
    torch.manual_seed(4)
    m = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.ReLU(),
        models.ShortcutA(6, 9, 2),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(2, padding=1),
        nn.PReLU(),
        nn.Flatten(),
        nn.BatchNorm1d(9 * 2 * 2),
        nn.Linear(9 * 2 * 2, 8),
        nn.BatchNorm1d(8),
        nn.Hardtanh(),
        nn.Linear(8, 5),
    )
    with torch.no_grad():
        m[5].weight.fill_(0.3)
    m = calibrated(convert.binarize(m, "bnn", "bnn", scaling="tensor"), (2, 11, 11))
    g = graph.build(m, (2, 11, 11))
    sc = g.nodes[2]
    assert (sc["op"], sc["pad_before"], sc["pad_after"]) == ("shortcut_a", 1, 2)
    assert g.shapes[sc["output"]] == [9, 6, 6]
    ops = [n["op"] for n in g.nodes if n["op"] in ("affine", "linear")]
    assert ops == ["affine", "linear", "linear"]
    om = to_onnx(g)
    assert {"AveragePool", "Gemm", "Where", "PRelu"} <= op_types(om)
    assert_matches(om, m, torch.randn(16, 2, 11, 11))


def test_sign_of_zero_is_plus_one():
    torch.manual_seed(5)
    m = nn.Sequential(
        layers.BinaryConv2d(3, 4, 3, padding=1, weight_quantizer="bc", input_quantizer="bc")
    ).eval()
    x = torch.randn(2, 3, 5, 5)
    x[x.abs() < 0.8] = 0.0  # about half the inputs are exact zeros
    assert (x == 0).float().mean() > 0.3
    om = to_onnx(graph.build(m, (3, 5, 5)))
    got = ort_run(om, x)
    with torch.no_grad():
        want = m(x).numpy()
        sign_zero_is_zero = m[0]._conv_forward(torch.sign(x), torch.sign(m[0].weight), None)
    np.testing.assert_array_equal(got, want)
    # The zeros matter: with sign(0) = 0 (ONNX's Sign) the result would differ.
    assert not np.array_equal(got, sign_zero_is_zero.numpy())


def test_batch_dimension_is_symbolic():
    torch.manual_seed(6)
    m = models.get("convnet", num_classes=10, in_channels=1, image_size=28)
    m = calibrated(convert.binarize(m, "bnn", "bnn"), (1, 28, 28))
    om = to_onnx(graph.build(m, (1, 28, 28)))
    dims = om.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert om.graph.input[0].name == "input" and om.graph.output[0].name == "logits"
    for n in (1, 3):
        x = torch.randn(n, 1, 28, 28)
        got = ort_run(om, x)
        assert got.shape == (n, 10)
        with torch.no_grad():
            np.testing.assert_allclose(got, m(x).numpy(), rtol=0, atol=1e-4)


def tiny_graph():
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).eval()
    return graph.build(m, (1, 4, 4))


def test_unknown_op_is_an_error_naming_it():
    g = tiny_graph()
    g.nodes[1]["op"] = "gelu"
    with pytest.raises(SigngradError, match="gelu"):
        to_onnx(g)


def test_bad_opset_and_metadata_are_errors():
    g = tiny_graph()
    with pytest.raises(SigngradError, match="opset"):
        to_onnx(g, opset=11)
    with pytest.raises(SigngradError, match="metadata"):
        to_onnx(g, metadata={"epochs": 3})


def test_missing_onnxruntime_says_how_to_install(monkeypatch):
    om = to_onnx(tiny_graph())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes the import fail
    with pytest.raises(SigngradError, match=r"signgrad\[onnx\]"):
        check_onnx(om, nn.Identity(), torch.zeros(1, 1, 4, 4))


# ------------------------------------------------------------------ integer thresholds


def _runtime_signs(k, scale, shift, acts):
    """sign(act(float32(d) * scale + shift)) for every integer d in [-k, k], per channel:
    the packed runtime's formula, written out independently of the exporter."""
    d = np.arange(-k, k + 1).astype(np.float32)
    y = d[None, :] * scale[:, None] + shift[:, None]
    for op, lo_hi_or_slope in acts:
        if op == "relu":
            y = np.maximum(y, np.float32(0))
        elif op == "hardtanh":
            y = np.minimum(
                np.maximum(y, np.float32(lo_hi_or_slope[0])), np.float32(lo_hi_or_slope[1])
            )
        else:
            y = np.where(y >= 0, y, y * lo_hi_or_slope[:, None])
    return y >= 0


ACTS = {
    "none": [],
    "hardtanh": [("hardtanh", (-1.0, 1.0))],
    "relu": [("relu", None)],
    "prelu": [("prelu", "slopes")],
    "hardtanh-above-0": [("hardtanh", (0.5, 2.0))],
}


@pytest.mark.parametrize("acts", list(ACTS.values()), ids=list(ACTS))
def test_thresholds_reproduce_the_runtime_sign_for_every_integer(acts):
    from signgrad.onnx_export import thresholds

    rng = np.random.default_rng(0)
    k, c = 144, 12
    # Scales of both signs and 0, shifts that put the sign change between integers, on an
    # integer, and outside the range; tiny scales where rounding decides.
    scale = rng.standard_normal(c).astype(np.float32)
    scale[:3] = [0.0, -1e-7, 3e-8]
    shift = (rng.standard_normal(c) * 20).astype(np.float32)
    shift[3:6] = [5.0, -1000.0, 1000.0]
    slopes = np.where(np.arange(c) % 2 == 0, -0.25, 0.25).astype(np.float32)
    concrete = [(op, slopes if arg == "slopes" else arg) for op, arg in acts]
    graph_acts = []
    for op, arg in concrete:
        node = {"min": arg[0], "max": arg[1]} if op == "hardtanh" else {}
        graph_acts.append((op, node, slopes if op == "prelu" else None))
    direction, threshold = thresholds(k, scale, shift, graph_acts, c)
    d = np.arange(-k, k + 1).astype(np.float32)
    got = direction[:, None] * d[None, :] >= (direction * threshold)[:, None]
    np.testing.assert_array_equal(got, _runtime_signs(k, scale, shift, concrete))
    assert set(direction.tolist()) <= {-1.0, 1.0}


def test_binary_layers_read_only_by_binary_layers_decide_their_sign_by_thresholds(cifar_root):
    """In a 1W1A ResNet-20 the first convolution of each block feeds only the second: its
    batch norm and hardtanh become integer thresholds (9 layers); the second feeds the
    residual add and keeps its float epilogue. Wherever a layer's input signs agree,
    onnxruntime's output signs there are the numpy runtime's, decision for decision, on
    real CIFAR-10 images (where its input differs, a float path upstream flipped a sign)."""
    from signgrad import data, export
    from signgrad.runtime import format as fmt
    from signgrad.runtime import model as runtime

    torch.manual_seed(0)
    m = models.get("resnet20", num_classes=10, in_channels=3, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    ds = data.load("cifar10", root=cifar_root, download=False)
    mean, std = torch.tensor(ds.mean).view(1, -1, 1, 1), torch.tensor(ds.std).view(1, -1, 1, 1)
    x = (ds.test_images[:256].float() / 255.0 - mean) / std
    m.train()
    with torch.no_grad():
        m((ds.train_images[:512].float() / 255.0 - mean) / std)
    m.eval()
    g = graph.build(m, (3, 32, 32))
    producer = {n["output"]: n for n in g.nodes}
    chains = [
        n["output"]
        for n in g.nodes
        if n["op"] == "hardtanh" and producer[n["inputs"][0]]["name"].endswith(".conv1")
    ]
    assert len(chains) == 9
    # Each such layer's input: what it decides on must be the same in both engines first.
    ins = [producer[producer[c]["inputs"][0]]["inputs"][0] for c in chains]
    om = to_onnx(g, expose=chains + ins)
    kinds = [n.op_type for n in om.graph.node]
    assert kinds.count("Where") == 18 + 9  # 18 binary inputs, 9 thresholded outputs
    src = export.Source(m, (3, 32, 32), [str(i) for i in range(10)], [0.0] * 3, [1.0] * 3, {})
    pm = runtime.build(*fmt.read_bytes(export.packed(src)), backend="numpy")
    values = {pm.graph["input"]["name"]: np.transpose(x.numpy(), (0, 2, 3, 1))}
    for step in pm.steps:
        values[step.output] = step.fn(values)
    sess = ort.InferenceSession(om.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": x.numpy()})[1:]
    decisions = 0
    for j, name in enumerate(chains):
        got, got_in = outs[j], outs[len(chains) + j]
        assert set(np.unique(got).tolist()) <= {-1.0, 1.0}
        want_in = np.transpose(values[ins[j]], (0, 3, 1, 2)) >= 0
        same_in = ((got_in >= 0) == want_in).reshape(len(x), -1).all(1)
        want = np.where(np.transpose(values[name], (0, 3, 1, 2)) >= 0, 1.0, -1.0)
        np.testing.assert_array_equal(got[same_in], want[same_in])
        decisions += got[same_in].size
    assert decisions > 1_000_000


def test_agreement_runs_in_chunks_keeps_the_mode_and_counts_flipped_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5)).train()
    x = torch.randn(agreement.CHUNK * 2 + 3, 3, 2, 2)
    seen = []

    def engine(c: torch.Tensor) -> np.ndarray:
        seen.append(len(c))
        return model(c).detach().numpy()

    ref = agreement.torch_logits(model, x)
    assert model.training  # the caller's mode is back
    model.eval()
    with torch.no_grad():
        got = agreement.in_chunks(engine, x)
    assert seen == [agreement.CHUNK, agreement.CHUNK, 3]
    assert agreement.compare(got, ref) == (0.0, 1.0)
    flipped = got.copy()
    flipped[0] = -1e3
    flipped[0, (ref[0].argmax() + 1) % 5] = 1e3
    diff, agree = agreement.compare(flipped, ref)
    assert diff >= 1e3 - np.abs(ref[0]).max()
    assert agree == pytest.approx(1 - 1 / len(x))
    assert agreement.compare(np.zeros((0, 5)), np.zeros((0, 5))) == (0.0, 1.0)
