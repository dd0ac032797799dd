import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signgrad import layers, quantizers
from signgrad.convert import binarize
from signgrad.errors import SigngradError
from signgrad.layers import BinaryConv2d, BinaryLinear


def sign(x):
    return torch.where(x >= 0, 1.0, -1.0)


def test_binary_conv_bc_equals_conv_on_sign_of_weights():
    torch.manual_seed(0)
    conv = BinaryConv2d(8, 16, 3, padding=1, stride=2, weight_quantizer="bc")
    x = torch.randn(4, 8, 9, 9)
    expected = F.conv2d(x, sign(conv.weight.detach()), padding=1, stride=2)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)


def test_binary_conv_1w1a_equals_conv_on_signs():
    torch.manual_seed(0)
    conv = BinaryConv2d(8, 16, 3, padding=1, weight_quantizer="bc", input_quantizer="bc")
    x = torch.randn(2, 8, 7, 7)
    x[0, 0, 0, 0] = 0.0  # sign(0) = +1
    expected = F.conv2d(sign(x), sign(conv.weight.detach()), padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)
    # Every output is an integer: a sum of products of +-1 (zero padding adds 0).
    out = conv(x)
    assert torch.equal(out, out.round())


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_weight_scaling(scaling):
    torch.manual_seed(0)
    conv = BinaryConv2d(4, 6, 3, weight_quantizer="bc", scaling=scaling)
    w = conv.weight.detach()
    alpha = w.abs().mean() if scaling == "tensor" else w.abs().mean(dim=(1, 2, 3), keepdim=True)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, alpha * sign(w)))


def test_weight_gradient_is_the_quantizers_pseudo_gradient():
    torch.manual_seed(0)
    lin = BinaryLinear(5, 3, bias=False, weight_quantizer="bnn")
    with torch.no_grad():
        lin.weight.mul_(4)  # put some weights outside [-1, 1]
    x = torch.randn(7, 5)
    lin(x).sum().backward()
    # dL/dW-hat = sum over batch of x, for every output row; BNN masks |W| > 1.
    natural = x.sum(0).expand(3, 5)
    expected = natural * (lin.weight.detach().abs() <= 1)
    torch.testing.assert_close(lin.weight.grad, expected)


def test_input_gradient_uses_the_input_quantizer():
    lin = BinaryLinear(3, 1, bias=False, weight_quantizer="bc", input_quantizer="bnn")
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -0.5, 0.2]]))
    x = torch.tensor([[0.5, 2.0, -0.3]], requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 0.0, 1.0]]))


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


@pytest.mark.parametrize(
    "keep,binary",
    [
        ("first_last", [False, True, False]),
        ("none", [True, True, True]),
        ("first", [False, True, True]),
        ("last", [True, True, False]),
    ],
)
def test_binarize_keep_policies(keep, binary):
    net = small_net()
    w0 = net[0].weight
    binarize(net, "bnn", keep=keep)
    found = [isinstance(net[i], layers.BINARY_LAYERS) for i in (0, 3, 7)]
    assert found == binary
    # Parameters are carried over: the old values are the latent weights.
    assert net[0].weight is w0
    quants = [m for m in net.modules() if isinstance(m, quantizers.Quantizer)]
    assert len({id(q) for q in quants}) == len(quants) == sum(binary)


def test_binarize_1w1a_and_forward():
    torch.manual_seed(0)
    net = small_net()
    x = torch.randn(2, 3, 4, 4)
    binarize(net, "bc", "bc", keep="first_last", scaling="channel")
    assert isinstance(net[3].input_quantizer, quantizers.BinaryConnect)
    assert net(x).shape == (2, 10)


def test_binarize_errors():
    with pytest.raises(SigngradError, match="unknown quantizer 'xnor'"):
        binarize(small_net(), "xnor")
    with pytest.raises(SigngradError, match="unknown keep policy"):
        binarize(small_net(), "bnn", keep="middle")
    with pytest.raises(SigngradError, match="unknown scaling"):
        binarize(small_net(), "bnn", scaling="row")
    with pytest.raises(SigngradError, match="weights only"):
        binarize(small_net(), "bnn", "proxquant")
    with pytest.raises(SigngradError, match="no nn.Conv2d or nn.Linear"):
        binarize(nn.Sequential(nn.ReLU()), "bnn")


def test_set_epoch_and_post_step_reach_every_layer():
    net = binarize(small_net(), "proxquant", keep="none", weight_params={"rho": 10.0})
    sharp = layers.set_epoch(net, 2, 10)
    assert sharp == 20.0
    layers.post_step(net, lr=1.0)  # lambda = 20: every weight snaps to +-1
    for _, layer in layers.binary_layers(net):
        assert set(layer.weight.detach().unique().tolist()) <= {-1.0, 1.0}


def test_binarize_lives_in_convert():
    with pytest.raises(AttributeError, match=r"signgrad\.convert\.binarize"):
        layers.binarize  # noqa: B018
    assert not hasattr(layers, "binarize")


def test_every_binary_layer_follows_the_protocol():
    from signgrad.hyper import HyperConv2d, HyperLinear

    plain = [BinaryConv2d(3, 4, 3), BinaryLinear(5, 2)]
    generated = [HyperConv2d(3, 4, 3), HyperLinear(5, 2)]
    for m in plain + generated:
        assert isinstance(m, layers.BinaryLayer)
        assert tuple(m.latent_weight().shape) == m.kernel_shape
        assert m.generated_kernel == (m in generated)
    assert [m.kernel_shape for m in plain] == [m.kernel_shape for m in generated]
    assert [m.kernel_shape for m in plain] == [(4, 3, 3, 3), (2, 5)]


def test_lookahead_and_natural_gradient_hook():
    torch.manual_seed(0)
    lin = BinaryLinear(4, 3, bias=False, weight_quantizer="bc")
    w = lin.weight.detach()
    x = torch.randn(2, 4)
    lin.set_lookahead(2 * w)  # F(W - 2W) = -sign(W)
    got = []
    lin.set_natural_grad_hook(got.append)
    y = lin(x)
    torch.testing.assert_close(y, F.linear(x, -sign(w)), rtol=0, atol=0)
    y.sum().backward()
    torch.testing.assert_close(got[0], x.sum(0).expand(3, 4), rtol=0, atol=0)
    lin.clear_lookahead()
    lin.set_natural_grad_hook(None)
    lin(x).sum().backward()
    assert len(got) == 1
    torch.testing.assert_close(lin(x), F.linear(x, sign(w)), rtol=0, atol=0)


class _Halving(quantizers.Quantizer):
    """Not registered: a quantizer with a post-step, as a user might write one."""

    def derivative(self, x, s):
        return torch.ones_like(x)

    def post_step(self, weight, lr):
        weight.mul_(0.5)


def test_post_step_is_a_quantizer_capability():
    from signgrad.hyper import HyperLinear

    needing = [n for n in quantizers.names() if quantizers.get(n).needs_post_step]
    assert needing == ["proxquant"]
    assert _Halving.needs_post_step  # defining post_step is enough
    lin = BinaryLinear(3, 2, weight_quantizer=_Halving())
    w = lin.weight.detach().clone()
    layers.post_step(nn.Sequential(lin), lr=0.1)
    assert torch.equal(lin.weight.detach(), w * 0.5)
    with pytest.raises(SigngradError, match="cannot drive a hyper layer"):
        HyperLinear(3, 2, weight_quantizer=_Halving())


def test_no_import_cycle_through_the_layers():
    """layers <- hyper <- convert: the binary layers do not know their conversion."""
    import ast
    from pathlib import Path

    root = Path(layers.__file__).parent
    imports = {}
    for name in ("layers", "hyper", "convert"):
        found = set()
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "signgrad":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("signgrad."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if "." in a.name}
        imports[name] = found
    assert not imports["layers"] & {"hyper", "convert"}
    assert "convert" not in imports["hyper"]
    assert {"layers", "hyper"} <= imports["convert"]
