"""Learned gradient estimators: the history, the meta-weight trick, FSG's switches, and
training on the real CIFAR-10 subset."""

import io
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signgrad import checkpoint, convert, estimators, layers
from signgrad.errors import SigngradError
from signgrad.estimators.base import GradientHistory

SMALL_FSG = {"d_inner": 4, "d_state": 3, "d_conv": 3, "fast_hidden": 8}


def small_model(quantizer: str = "dorefa", **binarize) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )
    return convert.binarize(net, quantizer, keep="none", **binarize)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def train_step(model, est, opt, lr, seed=0):
    x, y = batch(seed)
    est.begin_step(lr)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    est.zero_grad()
    loss.backward()
    fallbacks = est.end_step()
    opt.step()
    return loss.item(), fallbacks


def build(name, model, **params):
    if name.startswith("fsg"):
        params = {**SMALL_FSG, **params} if name == "fsg" else params
    return estimators.build(name, model, **params)


def test_history_keeps_the_last_l_gradients_in_order_across_save_and_load():
    h = GradientHistory(5)
    for step in range(7):
        h.push(torch.full((2, 3), float(step)))
    assert h.count == 7
    seq = h.sequence()
    assert seq.shape == (6, 5)
    assert seq[0].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    buf = io.BytesIO()
    torch.save(h.state_dict(), buf)
    buf.seek(0)
    h2 = GradientHistory(5)
    h2.load_state_dict(torch.load(buf, weights_only=True))
    h2.push(torch.full((2, 3), 7.0))
    assert h2.sequence()[0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    # Before L gradients exist, the front of the history is zero.
    h3 = GradientHistory(3)
    h3.push(torch.ones(2))
    assert h3.sequence()[0].tolist() == [0.0, 0.0, 1.0]


VARIANTS = [(n, {}) for n in estimators.names()] + [
    ("fsg", {"mode": "window"}),
    ("fsg", {"slow": "lstm"}),
    ("fsg", {"slow": "gru", "mode": "window"}),
]


@pytest.mark.parametrize(("name", "params"), VARIANTS)
def test_after_one_step_every_meta_parameter_has_a_gradient(name, params):
    model = small_model()
    est = build(name, model, **params)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in (lay.weight for lay in est.layers)]
    train_step(model, est, opt, lr=0.1, seed=0)
    # The first step has no previous gradient: binarized weights do not move.
    for w0, lay in zip(before, est.layers, strict=True):
        assert torch.equal(w0, lay.weight.detach())
    # Some meta-parameters only get a gradient from the second meta step on: those before
    # a read-out that starts at zero (the identity start), and LSTMFC's recurrent weights
    # (its first meta step starts from a zero recurrent state).
    reached: set[str] = set()
    for seed in (1, 2):
        train_step(model, est, opt, lr=0.1, seed=seed)
        reached |= {n for n, p in est.named_parameters() if p.grad is not None and p.grad.any()}
    assert reached == {n for n, _ in est.named_parameters()}
    for w0, lay in zip(before, est.layers, strict=True):
        assert not torch.equal(w0, lay.weight.detach())


def ste_natural_gradients(model, x, y):
    """dL/dW^ of every binary layer with plain straight-through training."""
    grads = {}
    hooks = []
    for name, lay in layers.binary_layers(model):
        lay.set_natural_grad_hook(lambda g, name=name: grads.__setitem__(name, g.detach()))
        hooks.append(lay)
    F.cross_entropy(model(x), y).backward()
    for lay in hooks:
        lay.set_natural_grad_hook(None)
    model.zero_grad(set_to_none=True)
    return grads


def fast_net_outputs_one(est):
    with torch.no_grad():
        for m in est.fast:
            if isinstance(m, nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        est.fast[-1].bias.fill_(1.0)


def test_beta_zero_and_unit_fast_net_give_the_plain_ste_update():
    model = small_model("dorefa")
    x, y = batch(0)
    expected_g = ste_natural_gradients(model, x, y)  # the same weights and batch
    est = build("fsg", model, beta=0.0)
    fast_net_outputs_one(est)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, est, opt, lr=0.1, seed=0)
    # Step 2: g^ = 1 * g_prev, calibrated with DoReFa's B'(W): the STE gradient of step 1.
    est.begin_step(0.1)
    for name, lay in zip(est.layer_names, est.layers, strict=True):
        q = lay.weight_quantizer
        w = lay.weight.detach()
        ste = expected_g[name] * q.derivative(w, q.sharpness)
        assert torch.equal(est._ghat[name_index(est, name)].detach(), ste)
    xb, yb = batch(1)
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    est.zero_grad()
    loss.backward()
    ghats = [g.detach().clone() for g in est._ghat]
    est.end_step()
    for ghat, lay in zip(ghats, est.layers, strict=True):
        assert torch.equal(lay.weight.grad, ghat)


def name_index(est, name):
    return est.layer_names.index(name)


@pytest.mark.parametrize("mode", ["stream", "window"])
def test_beta_one_only_the_slow_net_moves_the_weights(mode):
    def update_after_two_steps(perturb):
        model = small_model()
        est = build("fsg", model, beta=1.0, mode=mode)
        perturb(est)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, est, opt, lr=0.1, seed=0)
        est.begin_step(0.1)
        out = [g.detach().clone() for g in est._ghat]
        est.detach_layers()
        return out

    base = update_after_two_steps(lambda est: None)

    def bump(module):
        def f(est):
            with torch.no_grad():
                for p in getattr(est, module).parameters():
                    p.add_(0.5)

        return f

    same = update_after_two_steps(bump("fast"))
    other = update_after_two_steps(bump("slow"))
    assert all(torch.equal(a, b) for a, b in zip(base, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(base, other, strict=True))


def test_ablation_switches():
    model = small_model()
    fast_only = build("fsg", model, parts="fast")
    assert fast_only.slow is None and fast_only.beta == 0.0
    fast_only.detach_layers()
    slow_only = build("fsg", model, parts="slow", lre=False)
    assert slow_only.fast is None and slow_only.lre is None and slow_only.beta == 1.0
    slow_only.detach_layers()
    for slow in ("lstm", "gru"):
        est = build("fsg", model, slow=slow)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, est, opt, 0.1, 0)
        train_step(model, est, opt, 0.1, 1)
        assert all(p.grad is not None for p in est.slow.parameters())
        est.detach_layers()
    with pytest.raises(SigngradError, match="unknown slow-net"):
        build("fsg", model, slow="transformer")
    with pytest.raises(SigngradError, match="takes no parameter gamma"):
        estimators.build("fsg", model, gamma=1)
    with pytest.raises(SigngradError, match="unknown estimator 'fsg2'"):
        estimators.build("fsg2", model)


@pytest.mark.parametrize("slow", ["mamba", "lstm"])
@pytest.mark.parametrize("lre_feed", ["front", "input"])
def test_stream_mode_reads_each_weights_whole_history(slow, lre_feed):
    # The carried state is the window form over the whole history: [LRE, g_1, ..., g_k]
    # with the LRE in front, [g_1 + LRE, ..., g_k + LRE] with it as an input (normalisation
    # off, since it scales each step's token by that step's RMS; meta learning rate 0,
    # since the state was built by the slow-net of earlier steps; a random start, whose
    # slow-net does not start at 0).
    k = 4
    model = small_model()
    est = build("fsg", model, parts="slow", normalize=False, history=k, slow=slow, slow_lr=0.0,
                start="random", slow_form="direct", lre_feed=lre_feed)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(k):  # begin_step consumes g_1 ... g_{k-1}; the history holds g_1..g_k
        train_step(model, est, opt, 0.1, step)
    assert all(h.count == k for h in est.histories)
    ready = list(range(len(est.layers)))
    sizes = [lay.weight.numel() for lay in est.layers]
    with torch.no_grad():
        got = est.slow_output(ready, sizes).split(sizes)
        for i, h in enumerate(est.histories):
            seq = h.sequence().unsqueeze(-1)  # (n, k, 1)
            if lre_feed == "front":
                front = est.lre[i].expand(seq.shape[0], 1, 1)
                seq = torch.cat([front, seq], dim=1)
            else:
                seq = seq + est.lre[i]
            want = est.slow.last(seq).squeeze(-1)
            assert got[i].abs().max() > 0
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("name", estimators.names())
def test_bwn_with_binary_activations_and_sgd(name):
    # BWN: sign(W) scaled by mean |W|, identity pre-processing, so g^ needs no calibration.
    model = small_model("bc", input_quantizer="bnn", scaling="tensor")
    est = build(name, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [lay.weight.detach().clone() for lay in est.layers]
    for step in range(3):
        _, fallbacks = train_step(model, est, opt, 0.1, step)
        assert fallbacks == 0
    for w0, lay in zip(before, est.layers, strict=True):
        assert torch.isfinite(lay.weight).all()
        assert not torch.equal(w0, lay.weight.detach())


def test_list_names_the_estimators(run_cli, capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    assert all(name in out for name in estimators.names())


def _first_cosines(name: str, seed: int, **params) -> list[float]:
    """The cosine of g^ with the (calibrated) straight-through gradient it reads, per layer,
    at the first step that has a gradient history; asserts they are equal where they are."""
    model = small_model()
    torch.manual_seed(seed)  # the meta-networks' init
    est = build(name, model, **params)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, est, opt, 0.1, seed)  # the first step only fills the history
    est.begin_step(0.1)
    cosines = []
    for i, ghat in enumerate(est._ghat):
        ste = est.calibrate(i, est.histories[i].latest())
        cosines.append(F.cosine_similarity(ghat.flatten(), ste.flatten(), dim=0).item())
        if est.settings["start"] == "identity":
            assert torch.equal(ghat, ste), (name, seed, i)
    est.detach_layers()
    return cosines


IDENTITY_START = [n for n in estimators.names() if estimators.parameters(n)["start"] == "identity"]


@pytest.mark.parametrize("name", IDENTITY_START)
def test_the_identity_start_is_the_ste_gradient_for_every_seed(name):
    for seed in range(8):
        assert all(c == pytest.approx(1.0, abs=1e-6) for c in _first_cosines(name, seed))


def test_the_default_starts_and_a_random_start_is_a_coin_flip():
    assert set(IDENTITY_START) == {"fsg", "metaquant-fc", "metaquant-multifc", "metaquant-lstm"}
    # What the identity start removes: with PyTorch's init and the paper's slow gradient
    # (the slow-net's output itself), the first g^ points anywhere.
    paper = {"start": "random", "slow_form": "direct", "lre_feed": "front"}
    cosines = [c for seed in range(8) for c in _first_cosines("fsg", seed, **paper)]
    assert min(cosines) < 0 < max(cosines)


@pytest.mark.parametrize("mode", ["stream", "window"])
@pytest.mark.parametrize("start", ["identity", "random"])
def test_the_lre_gets_a_meta_gradient_at_every_step(mode, start):
    model = small_model()
    est = build("fsg", model, mode=mode, start=start)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, est, opt, 0.1, 0)  # history only
    # The identity start's first meta step reaches the slow-net's read-out only (it starts
    # at zero, so nothing before it has a gradient yet); every step after reaches the LRE.
    first = 1 if start == "random" else 2
    for seed in range(1, 7):
        train_step(model, est, opt, 0.1, seed)
        if seed >= first:
            # (zero_grad sets it to None before each step: this is this step's gradient)
            assert est.lre.grad is not None and bool((est.lre.grad != 0).all()), seed


def test_gate_form_slow_gradient_changes_sign_with_the_gradient():
    # s = g * (1 + slow): where g is 0 the slow gradient is 0, whatever the history says.
    model = small_model()
    torch.manual_seed(0)
    est = build("fsg", model, parts="slow", start="random")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(3):
        train_step(model, est, opt, 0.1, seed)
    ready = list(range(len(est.layers)))
    for h in est.histories:
        h.buffer[-1, ::2] = 0.0  # the latest gradient of every other weight
    w_tildes = [lay.weight.detach().reshape(-1) for lay in est.layers]
    with torch.no_grad():
        ghat = est.gradients(ready, w_tildes)
    for g in ghat:
        assert torch.all(g[::2] == 0) and g[1::2].abs().max() > 0


def test_a_resumed_estimator_keeps_the_settings_it_was_saved_with():
    from signgrad import builders, config

    cfg = config.Config(model="convnet", estimator="fsg").resolved()
    model = small_model()
    est = estimators.build("fsg", model)
    state = {"estimator": est.state_dict()}
    assert state["estimator"]["settings"]["start"] == "identity"
    # A state saved before settings were recorded: the estimator of that time.
    del state["estimator"]["settings"]
    est.detach_layers()
    old = builders.build_estimator(cfg, small_model(), state)
    assert {k: old.settings[k] for k in ("start", "slow_form", "lre_feed")} == {
        "start": "random",
        "slow_form": "direct",
        "lre_feed": "front",
    }
    old.detach_layers()
    # Settings that differ from the estimator's are refused, naming them.
    fresh = estimators.build("fsg", small_model())
    saved = estimators.build("fsg", small_model(), start="random").state_dict()
    with pytest.raises(ValueError, match=r"start='random' \(here 'identity'\)"):
        fresh.load_state_dict(saved)
    # A crafted checkpoint: settings that are not named values, or a value out of range.
    with pytest.raises(SigngradError, match="estimator settings are damaged"):
        builders.build_estimator(cfg, small_model(), {"estimator": {"settings": {1: 2}}})
    bad = {"estimator": {"settings": {**estimators.parameters("fsg"), "history": -1}}}
    with pytest.raises(SigngradError, match="history must be an integer"):
        builders.build_estimator(cfg, small_model(), bad)
    # Tensors of the wrong shape are refused as a whole, before a step could index them.
    ref = estimators.build("metaquant-multifc-ref", small_model())
    state = ref.state_dict()
    state["forward_weights"] = [torch.zeros(1)] * len(ref.layers)
    with pytest.raises(ValueError, match="forward_weights do not match"):
        ref.load_state_dict(state)
    state = ref.state_dict()
    state["extra"]["prev_weights"] = [torch.zeros(2)]
    with pytest.raises(ValueError, match="prev_weights do not match"):
        ref.load_state_dict(state)


@pytest.mark.parametrize("name", ["fsg", "metaquant-multifc"])
def test_step_norm_ste_keeps_the_straight_through_size(name):
    model = small_model()
    torch.manual_seed(3)
    est = build(name, model, start="random", step_norm="ste")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(3):
        train_step(model, est, opt, 0.1, seed)
    est.begin_step(0.1)
    for i, ghat in enumerate(est._ghat):
        ste = est.calibrate(i, est.histories[i].latest())
        assert ghat.norm().item() == pytest.approx(ste.norm().item(), rel=1e-5)
        assert not torch.allclose(ghat, ste)  # the direction is still the meta-nets'
    est.detach_layers()


def test_reference_update_uses_the_fast_gradient_only():
    model = small_model()
    est = build("fsg", model, update="fast", start="random")  # identity: both are g at first
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, est, opt, 0.1, 0)
    x, y = batch(1)
    est.begin_step(0.1)
    combined = [g.detach().clone() for g in est._ghat]
    fast = [f.clone() for f in est._fast_out]
    F.cross_entropy(model(x), y).backward()
    est.end_step()
    for lay, c, f in zip(est.layers, combined, fast, strict=True):
        q, w = lay.weight_quantizer, lay.weight.detach()
        expected = f.reshape(w.shape) * q.derivative(w, q.sharpness)
        assert torch.equal(lay.weight.grad, expected)
        assert not torch.equal(lay.weight.grad, c)


def test_non_finite_estimator_output_falls_back_to_ste():
    model = small_model()
    est = build("fsg", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, est, opt, 0.1, 0)
    with torch.no_grad():
        est.fast[-1].bias.fill_(float("nan"))
    _, fallbacks = train_step(model, est, opt, 0.1, 1)
    assert fallbacks == len(est.layers)
    assert est.nonfinite_steps == 1
    assert est.state is None  # the stream restarts rather than carry a poisoned state
    for lay in est.layers:
        assert torch.isfinite(lay.weight).all()
        assert lay.weight.grad is not None and torch.isfinite(lay.weight.grad).all()


# -- training on real data ---------------------------------------------------------------


COMMON = ["--model", "convnet", "--data", "cifar10", "--quantizer", "dorefa", "--keep", "none",
          "--batch-size", "64", "--lr", "3e-3", "--no-progress"]  # fmt: skip


# fsg-paper and fsg-ref are the fsg code with bigger sizes (covered by the unit tests
# above): three epochs of them take minutes on two cores, of LSTMFC-ref half a minute;
# tests/test_reference_estimators.py checks the reference presets' formulas instead.
TRAINED = [n for n in estimators.names() if n not in ("fsg-paper", "fsg-ref", "metaquant-lstm-ref")]


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_training_with_each_estimator_lowers_the_loss(tmp_path, cifar_root, run_cli, name):
    out = tmp_path / name
    # 3 epochs of 80 steps: a few hundred meta-learning steps.
    assert run_cli("train", *COMMON, "--estimator", name, "--epochs", "3",
                   "--out", str(out)) == 0  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(r["fallback_steps"] == 0 for r in records)
    state = checkpoint.load(out)["estimator"]
    assert [h["count"] for h in state["histories"]] == [240] * 4


@pytest.mark.slow
def test_estimator_runs_repeat_and_resume_exactly(tmp_path, cifar_root, run_cli):
    args = [*COMMON, "--estimator", "fsg", "--epochs", "2", "--seed", "3"]
    assert run_cli("train", *args, "--out", str(tmp_path / "a")) == 0
    assert run_cli("train", *args, "--out", str(tmp_path / "b"), "--stop-after", "1") == 0
    assert run_cli("train", "--out", str(tmp_path / "b"), "--resume", "--no-progress") == 0
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, v in a["estimator"]["meta"].items():
        assert torch.equal(v, b["estimator"]["meta"][k]), k
    for ha, hb in zip(a["estimator"]["histories"], b["estimator"]["histories"], strict=True):
        assert torch.equal(ha["buffer"], hb["buffer"])
    assert [r["test_loss"] for r in a["history"]] == [r["test_loss"] for r in b["history"]]


def test_estimator_flag_errors(tmp_path, run_cli, capsys):
    base = ["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r")]
    assert run_cli(*base, "--estimator", "fsg3") == 2
    assert "unknown estimator 'fsg3'" in capsys.readouterr().err
    assert run_cli(*base, "--estimator", "fsg", "--quantizer", "none") == 2
    assert "needs binarized weights" in capsys.readouterr().err
    assert run_cli(*base, "--estimator", "fsg", "--estimator-param", "beta") == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert run_cli(*base, "--estimator", "fsg", "--estimator-param", "beta=high") == 2
    assert "not a number" in capsys.readouterr().err


def test_metaquant_fc_gives_no_step_where_the_gradient_is_zero():
    # FC-Grad's MLP reads g: without biases MLP(0) = 0 whatever meta-training made of it.
    # With biases (bias=true) MLP(0) is a step that does not depend on the gradient.
    for bias, zero_step in ((False, True), (True, False)):
        model = small_model()
        torch.manual_seed(0)
        est = build("metaquant-fc", model, hidden=8, **({"bias": True} if bias else {}))
        assert est.settings["bias"] is bias
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for seed in range(3):
            train_step(model, est, opt, 0.1, seed)
        for h in est.histories:
            h.buffer[-1, ::2] = 0.0  # the latest gradient of every other weight
        ready = list(range(len(est.layers)))
        w_tildes = [lay.weight.detach().reshape(-1) for lay in est.layers]
        with torch.no_grad():
            ghat = est.gradients(ready, w_tildes)
        assert all(bool(torch.all(g[::2] == 0)) for g in ghat) is zero_step
        assert all(g[1::2].abs().max() > 0 for g in ghat)
        est.detach_layers()


def test_an_old_metaquant_fc_checkpoint_resumes_with_its_biases():
    from signgrad import builders, config

    cfg = config.Config(model="convnet", estimator="metaquant-fc").resolved()
    state = {"estimator": build("metaquant-fc", small_model(), bias=True).state_dict()}
    del state["estimator"]["settings"]  # saved before settings were recorded
    old = builders.build_estimator(cfg, small_model(), state)
    assert (old.settings["bias"], old.settings["start"]) == (True, "random")
    old.load_state_dict(state["estimator"])  # its meta-net has the biases' shapes
    assert builders.build_estimator(cfg, small_model()).settings["bias"] is False
