"""Every quantizer's forward map and pseudo-gradient against independent references.

References are written from the papers' definitions in float64 NumPy, and derivatives
are taken by central finite differences of the reference *backward* functions (Sign-Swish,
Bi-Real's piecewise polynomial, k tanh(t x), the brute-force proximal map), so a wrong
closed form in the library cannot agree with them by construction.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signgrad import quantizers, schedules
from signgrad.errors import SigngradError

# 0, the clip boundaries +-1, points on both sides of them, and the far tails.
GRID = np.array(
    [-3.0, -2.0, -1.5, -1.0 - 1e-3, -1.0, -1.0 + 1e-3, -0.5, -0.1, -1e-6, 0.0, 1e-6, 0.1,
     0.5, 1.0 - 1e-3, 1.0, 1.0 + 1e-3, 1.5, 2.0, 3.0]
)  # fmt: skip


def run(q: quantizers.Quantizer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward values and dL/dx for L = sum(q(x)) * 1, in float64."""
    t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = q(t)
    y.backward(torch.ones_like(y))
    return y.detach().numpy(), t.grad.numpy()


def ref_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def numeric_derivative(f, x, h=1e-6):
    return (f(x + h) - f(x - h)) / (2 * h)


def ref_sign_swish(x, b):
    s = 1 / (1 + np.exp(-b * x))
    return 2 * s * (1 + b * x * (1 - s)) - 1


def ref_prox(x, mu):
    """argmin_z (z - x)^2 / 2 + mu * min(|z - 1|, |z + 1|), by brute force on a fine grid;
    at x = 0 both +-(mu) are minimisers and the larger wins, as sign(0) = +1 does."""
    z = np.linspace(5, -5, 200001)
    out = []
    for xi in np.atleast_1d(x):
        obj = 0.5 * (z - xi) ** 2 + mu * np.minimum(np.abs(z - 1), np.abs(z + 1))
        out.append(z[np.argmin(obj)])
    return np.array(out)


def ref_approxsign_forward_surrogate(x):
    """Bi-Real Net's piecewise polynomial whose derivative ApproxSign uses."""
    return np.where(x < -1, -1.0, np.where(x < 0, 2 * x + x**2, np.where(x < 1, 2 * x - x**2, 1.0)))


def test_registry_names_and_errors():
    expected = set(
        "none bc bnn bnn+ bnn++ pc rpc proxquant approxsign ede dorefa ste-warmup".split()
    )
    assert set(quantizers.names()) == expected
    with pytest.raises(SigngradError, match=r"unknown quantizer 'sgn'; valid: none, bc, bnn"):
        quantizers.get("sgn")
    with pytest.raises(SigngradError, match="takes no parameter beta; it takes: bits"):
        quantizers.get("dorefa", beta=3)
    with pytest.raises(SigngradError, match="has no sharpness"):
        quantizers.BNN(sharpness="const:2")
    with pytest.raises(SigngradError, match="unknown schedule"):
        quantizers.get("bnn+", sharpness="cosine:1")
    with pytest.raises(SigngradError, match="bits must be an integer"):
        quantizers.get("dorefa", bits=0)


@pytest.mark.parametrize("name", quantizers.names())
def test_sign_of_zero_is_plus_one_and_precision(name):
    q = quantizers.get(name)
    q.set_epoch(9, 10)  # the last epoch: every soft forward has become the exact sign
    y, _ = run(q, np.array([0.0, -0.0, 1e-30, -1e-30]))
    if name == "none":
        assert q.precision == 32
        np.testing.assert_array_equal(y, [0.0, 0.0, 1e-30, -1e-30])
    else:
        assert q.precision == 1
        np.testing.assert_array_equal(y, [1.0, 1.0, 1.0, -1.0])


def test_bc():
    y, g = run(quantizers.get("bc"), GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    np.testing.assert_array_equal(g, np.ones_like(GRID))


def test_bnn_hardtanh_derivative_includes_boundary():
    y, g = run(quantizers.get("bnn"), GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    np.testing.assert_array_equal(g, (np.abs(GRID) <= 1).astype(float))
    assert g[GRID == 1.0].item() == 1 and g[GRID == 1.0 + 1e-3].item() == 0


@pytest.mark.parametrize("beta", [5.0, 1.0, 10.0])
def test_bnn_plus(beta):
    q = quantizers.get("bnn+", sharpness=f"const:{beta}")
    y, g = run(q, GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    ref = numeric_derivative(lambda v: ref_sign_swish(v, beta), GRID)
    np.testing.assert_allclose(g, ref, atol=1e-6)
    assert g[GRID == 0.0].item() == pytest.approx(beta)  # SS'(0) = beta


def test_bnn_plus_default_beta_is_5():
    assert quantizers.get("bnn+").sharpness == 5


def test_bnn_plus_plus_soft_forward_then_sign():
    q = quantizers.get("bnn++", sharpness="linear:2:8")
    q.set_epoch(0, 10)
    y, g = run(q, GRID)
    np.testing.assert_allclose(y, ref_sign_swish(GRID, 2.0), atol=1e-12)
    np.testing.assert_allclose(
        g, numeric_derivative(lambda v: ref_sign_swish(v, 2.0), GRID), atol=1e-6
    )
    q.set_epoch(9, 10)  # last 10%: exact sign forward, backward keeps SS'_mu at the end mu
    assert q.exact and q.sharpness == 8
    y, g = run(q, GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    np.testing.assert_allclose(
        g, numeric_derivative(lambda v: ref_sign_swish(v, 8.0), GRID), atol=1e-5
    )


@pytest.mark.parametrize("mu", [0.0, 0.3, 1.0])
def test_pc_forward_is_the_proximal_map(mu):
    q = quantizers.get("pc", sharpness=f"const:{mu}")
    y, g = run(q, GRID)
    np.testing.assert_allclose(y, ref_prox(GRID, mu), atol=1e-4)
    np.testing.assert_array_equal(g, np.ones_like(GRID))


def test_rpc_forward_sign_and_both_backwards():
    mu = 0.3
    q = quantizers.get("rpc", sharpness=f"const:{mu}")
    y, g = run(q, GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    np.testing.assert_array_equal(g, np.ones_like(GRID))
    q = quantizers.get("rpc", sharpness=f"const:{mu}", backward="prox")
    x = np.array([-3.0, -1.5, -1.0, -0.5, -0.1, 0.1, 0.5, 1.0, 1.5, 3.0])  # away from kinks
    _, g = run(q, x)
    ref = numeric_derivative(lambda v: ref_prox(v, mu), x, h=1e-3)
    np.testing.assert_allclose(g, ref, atol=1e-2)
    with pytest.raises(SigngradError, match="rpc backward"):
        quantizers.get("rpc", backward="tanh")


def test_proxquant_identity_forward_and_prox_step():
    q = quantizers.get("proxquant", rho=2.0)
    y, g = run(q, GRID)
    np.testing.assert_array_equal(y, GRID)
    np.testing.assert_array_equal(g, np.ones_like(GRID))
    q.set_epoch(3, 100)
    lam = 0.05 * 2.0 * 3
    w = torch.tensor(GRID.copy())
    q.post_step(w, lr=0.05)
    # ProxQuant's proximal step in closed form, then the clip to [-1, 1].
    a = np.abs(GRID)
    spec = ref_sign(GRID) * (1 + np.sign(a - 1) * np.maximum(np.abs(a - 1) - lam, 0))
    np.testing.assert_allclose(w.numpy(), np.clip(spec, -1, 1))
    np.testing.assert_allclose(w.numpy(), np.clip(ref_prox(GRID, lam), -1, 1), atol=1e-4)
    q.set_epoch(95, 100)  # hard sign, prox step frozen
    y, _ = run(q, GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    before = w.clone()
    q.post_step(w, lr=0.05)
    assert torch.equal(before, w)


def test_approxsign():
    y, g = run(quantizers.get("approxsign"), GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    ref = numeric_derivative(ref_approxsign_forward_surrogate, GRID, h=1e-9)
    # At exactly +-1 the left derivative is 0 and the right one 0 too.
    np.testing.assert_allclose(g, ref, atol=1e-5)
    assert g[GRID == 0.0].item() == 2.0


@pytest.mark.parametrize("t", [0.1, 1.0, 10.0])
def test_ede(t):
    q = quantizers.get("ede", sharpness=f"const:{t}")
    y, g = run(q, GRID)
    np.testing.assert_array_equal(y, ref_sign(GRID))
    k = max(1 / t, 1)
    ref = numeric_derivative(lambda v: k * np.tanh(t * v), GRID)
    np.testing.assert_allclose(g, ref, atol=1e-6)


def test_ede_default_ramp():
    q = quantizers.get("ede")
    q.set_epoch(0, 50)
    assert q.sharpness == pytest.approx(0.1)
    q.set_epoch(49, 50)
    assert q.sharpness == pytest.approx(10.0)


def test_ste_warmup_temperature_and_exact_sign():
    q = quantizers.get("ste-warmup")
    for epoch in [0, 1, 5, 20]:
        q.set_epoch(epoch, 100)
        assert q.sharpness == pytest.approx(0.95**epoch)
        y, g = run(q, GRID)
        np.testing.assert_allclose(y, np.clip(GRID / 0.95**epoch, -1, 1))
        np.testing.assert_array_equal(g, (np.abs(GRID) <= 1).astype(float))
    q.set_epoch(90, 100)
    assert q.exact
    np.testing.assert_array_equal(run(q, GRID)[0], ref_sign(GRID))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_dorefa(bits):
    x = GRID * 0.7
    y, g = run(quantizers.get("dorefa", bits=bits), x)
    n = 2**bits - 1
    m = np.max(np.abs(np.tanh(x)))
    levels = -1 + 2 * np.arange(n + 1) / n
    wt = np.tanh(x) / (2 * m) + 0.5  # in [0, 1]
    # Nearest level, ties toward the larger one.
    expected = levels[np.floor(wt * n + 0.5).astype(int)]
    np.testing.assert_allclose(y, expected, atol=1e-12)
    assert set(np.unique(y)) <= set(levels)
    ref = numeric_derivative(lambda v: 2 * (np.tanh(v) / (2 * m) + 0.5), x)
    np.testing.assert_allclose(g, ref, atol=1e-6)
    if bits == 1:
        np.testing.assert_array_equal(y, ref_sign(x))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=64),
    st.sampled_from([n for n in quantizers.names() if n != "none"]),
)
def test_forward_is_binary_when_exact(values, name):
    q = quantizers.get(name)
    q.set_epoch(99, 100)
    y, g = run(q, np.array(values))
    assert set(np.unique(y)) <= {-1.0, 1.0}
    assert np.all(np.isfinite(g))


def test_float32_and_bfloat16_inputs_keep_their_dtype():
    for name in quantizers.names():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(16, dtype=dtype, requires_grad=True)
            y = quantizers.get(name)(x)
            y.sum().backward()
            assert y.dtype == dtype and x.grad.dtype == dtype, name


# -- schedules ---------------------------------------------------------------------------


def test_schedules_reach_their_end_values():
    total = 30
    assert schedules.parse("const:5")(17, total) == 5
    lin = schedules.parse("linear:1:10")
    assert lin(0, total) == 1 and lin(total - 1, total) == 10
    assert lin(14.5, total) == pytest.approx(5.5)
    ex = schedules.parse("exp:0.1:10")
    assert ex(0, total) == pytest.approx(0.1) and ex(total - 1, total) == pytest.approx(10)
    assert ex((total - 1) / 2, total) == pytest.approx(1.0)
    dec = schedules.parse("decay:1:0.95")
    assert dec(10, total) == pytest.approx(0.95**10)
    for s in ("const:5", "linear:1:10", "exp:0.1:10", "decay:1:0.95"):
        assert schedules.parse(schedules.parse(s).spec()) == schedules.parse(s)


@pytest.mark.parametrize("bad", ["linear:1", "exp:0:1", "const:x", "decay:1:0", "warp:1"])
def test_bad_schedules(bad):
    with pytest.raises(SigngradError):
        schedules.parse(bad)


def test_exact_sign_after_epoch():
    q = quantizers.get("pc", exact_sign_after=3)
    for epoch in range(6):
        q.set_epoch(epoch, 6)
        assert q.exact == (epoch >= 3)
    # Default: the last 10% of the epochs (at least one).
    q = quantizers.get("pc")
    q.set_epoch(8, 10)
    assert not q.exact
    q.set_epoch(9, 10)
    assert q.exact
    assert math.isclose(q.sharpness, 1.0)


# -- the PC++ decomposition criterion -------------------------------------------------


@pytest.mark.parametrize("name", quantizers.names())
def test_every_registered_pair_has_the_pc_plus_plus_form(name):
    q = quantizers.get(name)
    for epoch in (0, 5, 9):
        q.set_epoch(epoch, 10)
        # Up to the trapezoid rule's error in B (about 1e-7 for sharp Sign-Swish maps).
        assert quantizers.decomposition_gap(q) < 1e-6, (name, epoch)


def test_decomposition_gap_finds_pairs_without_the_form():
    # hardtanh(x / T) with T = 2 keeps changing where hardtanh(x) is flat: no P exists.
    q = quantizers.get("ste-warmup", sharpness="const:2")
    assert quantizers.decomposition_gap(q) == pytest.approx(0.5, abs=1e-3)

    class Reversed(quantizers.Quantizer):
        """A user-defined pair: sign forward, decreasing backward map B(x) = -x."""

        def derivative(self, x, s):
            return -torch.ones_like(x)

    assert quantizers.decomposition_gap(Reversed()) == pytest.approx(2.0)
