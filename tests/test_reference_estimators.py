"""The reference presets (``*-ref``) against the formulas of the authors' code, written
out by hand: one step of each, after two steps that fill the history and make one update,
with SGD (no momentum) as the base optimizer, DoReFa weights and every layer binary.

What is checked per layer: the value the forward pass subtracts from the latent weights
(the look-ahead), the real update, and the meta-gradient of every meta-parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signgrad import convert, estimators

LR = 0.1
SMALL_REF = {"d_inner": 4, "d_state": 3, "d_conv": 3, "fast_hidden": 6}  # fsg-ref, smaller


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 25, 5),
    )
    return convert.binarize(net, "dorefa", keep="none")


def _step(model, est, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 5, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    est.begin_step(LR)
    ahead = [None if lay.lookahead is None else lay.lookahead.detach().clone()
             for lay in est.layers]  # fmt: skip
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    est.zero_grad()
    loss.backward()
    est.end_step()
    opt.step()
    return ahead


def _c(w):
    """DoReFa's calibration as the reference computes it: (1 - tanh^2 W) / max|tanh W|."""
    t = torch.tanh(w)
    return (1 - t * t) / t.abs().max()


def _w_tilde(w):
    t = torch.tanh(w)
    return t / (2 * t.abs().max()) + 0.5


def _linear_chain(x, net):
    """A bias-free, activation-free MLP by hand: x W1^T W2^T ... (per coordinate)."""
    out = x.unsqueeze(1)
    for layer in net:
        if isinstance(layer, nn.Linear):
            assert layer.bias is None
            out = out @ layer.weight.t()
        else:
            assert isinstance(layer, nn.Identity)
    return out.squeeze(1)


def _lstm_by_hand(x, cell, state):
    """One LSTM step with PyTorch's gate order (input, forget, cell, output)."""
    h, c = state if state is not None else (x.new_zeros(len(x), cell.hidden_size),) * 2
    gates = (
        x.unsqueeze(1) @ cell.weight_ih.t() + cell.bias_ih + h @ cell.weight_hh.t() + cell.bias_hh
    )
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c)


@pytest.mark.parametrize("name", ["metaquant-fc-ref", "metaquant-multifc-ref",
                                  "metaquant-lstm-ref", "fsg-ref"])  # fmt: skip
def test_one_step_of_the_reference_preset_is_the_authors_formula(name):
    model = _model()
    torch.manual_seed(1)
    est = estimators.build(name, model, **(SMALL_REF if name == "fsg-ref" else {}))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    _step(model, est, opt, 0)  # fills the history; no update
    _step(model, est, opt, 1)  # the first update
    # What step 2 starts from.
    w_prev = [w.detach().clone() for w in est._prev_weights] if name != "fsg-ref" else None
    w_now = [lay.weight.detach().clone() for lay in est.layers]
    forward_w = [w.clone() for w in est._forward]  # W' of step 1: the meta-nets' W~ is of it
    g_prev = [h.latest().clone() for h in est.histories]
    seqs = [h.sequence().clone() for h in est.histories]
    nets = copy.deepcopy(est)  # the meta-networks before the meta step of step 2
    states = copy.deepcopy(getattr(est, "states", None))
    ahead = _step(model, est, opt, 2)
    g_now = [h.latest() for h in est.histories]

    for i, lay in enumerate(est.layers):
        shape, c = w_now[i].shape, _c(w_now[i])
        x = _w_tilde(forward_w[i]).flatten()
        g = g_prev[i]
        # g^ (or the fast gradient), from the meta-nets as they were.
        if name == "metaquant-fc-ref":
            ghat = _linear_chain(g, nets.net)
        elif name == "metaquant-multifc-ref":
            ghat = g * _linear_chain(x, nets.net)
        elif name == "metaquant-lstm-ref":
            h = _lstm_by_hand(x, nets.cell, states[i])
            head = nets.head[0]
            ghat = g * (h @ head.weight.t() + head.bias).squeeze(1)
        else:
            fast = g * _linear_chain(x, nets.fast)
            lre = nets.lre[i].expand(len(g), 1, 1)
            slow = nets.slow.last(torch.cat([lre, seqs[i].unsqueeze(-1)], dim=1)).squeeze(-1)
        with torch.no_grad():
            if name == "fsg-ref":
                # W' = W - lr (beta s + (1 - beta) c f); the real update: c f alone.
                want_ahead = LR * (0.9 * slow.reshape(shape) + 0.1 * c * fast.reshape(shape))
                want_update = LR * c * fast.reshape(shape)
            else:
                # W' = W - lr * (the previous step, again); the real update: c g^.
                want_ahead = w_prev[i] - w_now[i]
                want_update = LR * c * ghat.reshape(shape)
            torch.testing.assert_close(ahead[i], want_ahead, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(w_now[i] - lay.weight.detach(), want_update,
                                       rtol=1e-5, atol=1e-7)  # fmt: skip
        # The meta-gradient: dL/dphi = sum(dL/dW' * dW'/dphi), dL/dW' = g_now * c(W').
        dl_dw = (g_now[i] * _c(w_now[i] - ahead[i]).flatten()).reshape(shape)
        path = (0.9 * slow.reshape(shape) + 0.1 * c * fast.reshape(shape)) if name == "fsg-ref" \
            else c * ghat.reshape(shape)  # fmt: skip
        (-LR * path * dl_dw).sum().backward()
    for (pname, got), (_, want) in zip(est.named_parameters(), nets.named_parameters(),
                                       strict=True):  # fmt: skip
        if want.grad is None:
            assert got.grad is None or not got.grad.any(), pname
            continue
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-9, msg=pname)


def test_the_reference_meta_nets_are_bias_free_and_linear():
    model = _model()
    fc = estimators.build("metaquant-fc-ref", model)
    assert [type(m) for m in fc.net] == [nn.Linear, nn.Identity, nn.Linear]
    assert all(m.bias is None for m in fc.net if isinstance(m, nn.Linear))
    fc.detach_layers()
    multi = estimators.build("metaquant-multifc-ref", model)
    assert sum(isinstance(m, nn.Linear) for m in multi.net) == 3
    multi.detach_layers()
    lstm = estimators.build("metaquant-lstm-ref", model)
    assert len(lstm.head) == 1 and lstm.head[0].bias is not None
    lstm.detach_layers()
    ref = estimators.parameters("fsg-ref")
    assert (ref["d_inner"], ref["d_state"], ref["d_conv"], ref["fast_hidden"]) == (100, 16, 8, 100)
    assert ref["update"] == "fast" and not ref["calibrate_slow"] and not ref["normalize"]
