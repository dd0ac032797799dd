import sys

import numpy as np
import pytest
import torch
from torch import nn

from signgrad import convert, graph, layers, models
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
