import pytest
import torch
from torch.nn import functional as F

from signgrad.errors import SigngradError
from signgrad.estimators import mamba
from signgrad.estimators.mamba import Mamba, selective_scan

D64 = torch.float64


def selective_scan_reference(x, delta, A, B, C, D):
    """The scan written out per sequence, channel and state with scalar ops."""
    batch, length, d = x.shape
    n = A.shape[1]
    out = []
    for b in range(batch):
        rows = []
        for k in range(length):
            rows.append([D[c] * x[b, k, c] for c in range(d)])
        for c in range(d):
            for j in range(n):
                h = torch.zeros((), dtype=x.dtype)
                for k in range(length):
                    h = (
                        torch.exp(delta[b, k, c] * A[c, j]) * h
                        + delta[b, k, c] * B[b, k, j] * x[b, k, c]
                    )
                    rows[k][c] = rows[k][c] + C[b, k, j] * h
        out.append(torch.stack([torch.stack(r) for r in rows]))
    return torch.stack(out)


def block_reference(m: Mamba, u):
    """The whole block with F.conv1d and the reference scan."""
    d, n, r = m.d_inner, m.d_state, m.dt_rank
    x, z = m.in_proj(u).split([d, d], dim=-1)
    length = u.shape[1]
    conv = F.conv1d(
        x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=d
    )
    x = F.silu(conv[..., :length].transpose(1, 2))
    delta_raw, B, C = m.x_proj(x).split([r, n, n], dim=-1)
    delta = F.softplus(m.dt_proj(delta_raw))
    y = selective_scan_reference(x, delta, -torch.exp(m.A_log), B, C, m.D)
    return m.out_proj(y * F.silu(z))


def scan_inputs(batch, length, d, n, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, d, generator=g, dtype=D64)
    delta = torch.rand(batch, length, d, generator=g, dtype=D64) * 0.5 + 0.01
    A = -torch.rand(d, n, generator=g, dtype=D64) * 3 - 0.1
    B = torch.randn(batch, length, n, generator=g, dtype=D64)
    C = torch.randn(batch, length, n, generator=g, dtype=D64)
    D = torch.randn(d, generator=g, dtype=D64)
    return [t.requires_grad_(requires_grad) for t in (x, delta, A, B, C, D)]


def tiny(chunk_size=None, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=2, d_inner=4, d_state=3, d_conv=3, bias=True, chunk_size=chunk_size)
    return Mamba(**{**cfg, **kw}).double()


@pytest.fixture
def small_blocks(monkeypatch):
    # Two rows per scan block, so that every test batch spans several blocks.
    monkeypatch.setattr(mamba, "_block_rows", lambda d, n, device: 2)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 4, 3), (5, 7, 2, 5)])
def test_scan_matches_reference(shape, small_blocks):
    args = scan_inputs(*shape, requires_grad=True)
    y = selective_scan(*args)
    y_ref = selective_scan_reference(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), args)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), args)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_scan_gradcheck(small_blocks):
    assert torch.autograd.gradcheck(selective_scan, scan_inputs(3, 4, 3, 2, requires_grad=True))


def test_block_matches_reference():
    m = tiny()
    u = torch.randn(3, 5, 2, dtype=D64)
    torch.testing.assert_close(m(u), block_reference(m, u), rtol=1e-10, atol=1e-12)


def test_conv_longer_than_sequence():
    m = tiny(d_conv=8)
    u = torch.randn(2, 3, 2, dtype=D64)
    torch.testing.assert_close(m(u), block_reference(m, u), rtol=1e-10, atol=1e-12)


def test_causal():
    m = tiny()
    u = torch.randn(4, 6, 2, dtype=D64)
    base = m(u)
    for k in range(6):
        v = u.clone()
        v[:, k] += torch.randn(4, 2, dtype=D64)
        out = m(v)
        torch.testing.assert_close(out[:, :k], base[:, :k], rtol=0, atol=0)
        assert not torch.allclose(out[:, k], base[:, k])


@pytest.mark.parametrize("length", [1, 2, 6])
def test_last_equals_forward(length):
    m = tiny()
    u = torch.randn(5, length, 2, dtype=D64)
    torch.testing.assert_close(m.last(u), m(u)[:, -1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("last", [False, True])
def test_chunked_equals_unchunked(last):
    u = torch.randn(11, 5, 2, dtype=D64)  # 11 = 3 + 3 + 3 + 2
    results = []
    for chunk_size in (None, 3):
        m = tiny(chunk_size)
        out = m.last(u) if last else m(u)
        out.pow(2).sum().backward()
        results.append((out.detach(), {k: p.grad for k, p in m.named_parameters()}))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-12, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)


def test_chunked_without_grad():
    u = torch.randn(7, 4, 2, dtype=D64)
    with torch.no_grad():
        torch.testing.assert_close(tiny(2).last(u), tiny(None).last(u), rtol=1e-12, atol=1e-12)


def test_every_parameter_gets_gradient():
    m = tiny(chunk_size=2)
    m.last(torch.randn(5, 4, 2, dtype=D64)).pow(2).sum().backward()
    names = {name for name, _ in m.named_parameters()}
    assert {"A_log", "D", "conv1d.weight", "conv1d.bias", "dt_proj.bias"} <= names
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


class _Last(torch.nn.Module):
    def __init__(self, m: Mamba):
        super().__init__()
        self.m = m

    def forward(self, u):
        return self.m.last(u)


@pytest.mark.parametrize("last", [False, True])
def test_gradcheck_block(last, small_blocks):
    torch.manual_seed(0)
    m = Mamba(d_model=1, d_inner=4, d_state=3, d_conv=3, bias=True).double()
    net = _Last(m) if last else m
    names = [name for name, _ in net.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in net.parameters()]
    u = torch.randn(3, 4, 1, dtype=D64, requires_grad=True)

    def f(u, *ps):
        # Parameters as explicit inputs, so that their gradients are checked too.
        return torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (u,))

    assert torch.autograd.gradcheck(f, (u, *params))


def test_init():
    m = Mamba(d_inner=7, d_state=5, dt_rank=2)
    A = -torch.exp(m.A_log)
    torch.testing.assert_close(A, -torch.arange(1.0, 6.0).expand(7, 5))
    torch.testing.assert_close(m.D.detach(), torch.ones(7))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-7
    assert m.dt_proj.weight.abs().max() <= 2**-0.5


def test_default_config_is_the_papers():
    m = Mamba()
    assert (m.d_model, m.d_inner, m.d_state, m.d_conv, m.dt_rank) == (1, 100, 16, 8, 1)
    assert m.x_proj.out_features == 1 + 2 * 16
    assert m(torch.randn(3, 6, 1)).shape == (3, 6, 1)
    assert m.last(torch.randn(3, 6, 1)).shape == (3, 1)


def test_deterministic():
    u = torch.randn(64, 6, 1)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = Mamba(d_inner=16, d_state=4, d_conv=4, chunk_size=24)
        out = m.last(u)
        out.sum().backward()
        outs.append((out.detach(), m.A_log.grad, m.in_proj.weight.grad))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_float32_close_to_float64():
    m = tiny()
    u = torch.randn(6, 6, 2, dtype=D64)
    ref = m(u)
    torch.testing.assert_close(m.float()(u.float()), ref.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 3), (3, 0, 2), (2, 3, 4, 2)])
def test_bad_input_shape(shape):
    with pytest.raises(SigngradError):
        tiny().float()(torch.randn(*shape))


def test_empty_batch():
    m = tiny(chunk_size=2)
    assert m(torch.randn(0, 4, 2, dtype=D64)).shape == (0, 4, 2)
    assert m.last(torch.randn(0, 4, 2, dtype=D64)).shape == (0, 2)


def test_bad_config():
    with pytest.raises(SigngradError):
        Mamba(d_state=0)
    with pytest.raises(SigngradError):
        Mamba(chunk_size=0)


@pytest.mark.parametrize("d_conv", [1, 3, 6])
def test_step_by_step_equals_forward(d_conv):
    torch.manual_seed(0)
    m = Mamba(d_model=2, d_inner=5, d_state=3, d_conv=d_conv, dt_rank=2).double()
    u = torch.randn(4, 7, 2, dtype=D64)
    expected = m(u)
    state = None
    for t in range(u.shape[1]):
        out, state = m.step(u[:, t], state)
        torch.testing.assert_close(out, expected[:, t], rtol=1e-10, atol=1e-12)
    with pytest.raises(SigngradError, match="Mamba.step expects"):
        m.step(u)
