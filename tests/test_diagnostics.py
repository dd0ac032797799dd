"""Gradient-fidelity diagnostics: what the hook records, that it changes nothing, that a
resumed run keeps one record per step, and the diagnose command."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from signgrad import config, convert, diagnostics, estimators, hooks


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 5),
    )
    return convert.binarize(net, "dorefa", keep="none")


def _steps(model, est, tmp_path, n=4):
    """Run ``n`` steps through the hooks of a diagnostics run; the records it wrote."""
    cfg = config.Config(diagnostics=True, estimator=None if est is None else est.name)
    step_hooks = hooks.for_config(cfg, model, est, tmp_path, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)
        step = hooks.Step(0, i, n, 0.1, x, y)
        for h in step_hooks:
            h.before_forward(step)
        step.loss = F.cross_entropy(model(step.x), y)
        step.train_loss = step.loss.detach()
        opt.zero_grad(set_to_none=True)
        for h in step_hooks:
            h.before_backward(step)
        step.loss.backward()
        for h in step_hooks:
            h.after_backward(step)
        before = [lay.weight.detach().clone() for lay in step_hooks[-1].layers]
        grads = [None if lay.weight.grad is None else lay.weight.grad.clone()
                 for lay in step_hooks[-1].layers]  # fmt: skip
        natural = None if est is None else [h.latest().clone() for h in est.histories]
        opt.step()
        for h in step_hooks:
            h.after_step(step)
        seen.append((before, grads, natural))
    step_hooks[-1].end_epoch({})
    names, records = diagnostics.read(tmp_path)
    return names, records, seen, step_hooks[-1].layers


def test_a_plain_run_applies_the_straight_through_gradient(tmp_path):
    names, records, seen, lays = _steps(_model(), None, tmp_path)
    assert names == ["0", "4"] and [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r["cos"] == pytest.approx([1.0, 1.0], abs=1e-6)
        assert r["norm_ratio"] == pytest.approx([1.0, 1.0], abs=1e-6)
        assert r["fallbacks"] == 0 and r["loss"] > 0
        assert all(0 <= f <= 1 for f in r["flips"])
    # The last step's flips, recomputed from the weights.
    after = [lay.weight.detach() for lay in lays]
    want = [
        ((a >= 0) != (b >= 0)).float().mean().item()
        for a, b in zip(after, seen[-1][0], strict=True)
    ]
    assert records[-1]["flips"] == pytest.approx(want)


def test_a_learned_estimator_is_compared_with_the_gradient_of_the_same_batch(tmp_path):
    model = _model()
    est = estimators.build("metaquant-multifc", model, start="random")
    _, records, seen, lays = _steps(model, est, tmp_path)
    assert len(lays) == 2
    assert records[0]["cos"] == [None, None]  # the first step has no learned gradient
    for r, (before, grads, natural) in zip(records[1:], seen[1:], strict=True):
        for i in range(len(lays)):
            applied = grads[i].flatten()
            # B'(W) * this batch's dL/dF(W), at the weights before the update
            ste = est.calibrate(i, natural[i], before[i]).flatten()
            cos = F.cosine_similarity(applied, ste, dim=0).item()
            assert r["cos"][i] == pytest.approx(cos, abs=1e-6)
            assert r["norm_ratio"][i] == pytest.approx((applied.norm() / ste.norm()).item())
            drift = (applied.mean().abs() / applied.pow(2).mean().sqrt()).item()
            assert r["drift"][i] == pytest.approx(drift, rel=1e-5)
    assert any(abs(c - 1) > 1e-3 for r in records[1:] for c in r["cos"])


@pytest.mark.slow
def test_diagnostics_change_nothing_and_a_resumed_run_keeps_one_record_per_step(
    tmp_path, cifar_root, run_cli, capsys
):
    common = ["train", "--model", "convnet", "--quantizer", "dorefa", "--keep", "none",
              "--estimator", "fsg", "--epochs", "2", "--batch-size", "256", "--no-progress",
              "--data-root", cifar_root]  # fmt: skip
    assert run_cli(*common, "--out", tmp_path / "plain") == 0
    assert run_cli(*common, "--out", tmp_path / "diag", "--diagnostics", "--stop-after", "1") == 0
    steps = len(diagnostics.read(tmp_path / "diag")[1])
    # A killed run may have written records past its checkpoint: resume drops them.
    with open(tmp_path / "diag" / diagnostics.DIAGNOSTICS_NAME, "a") as f:
        f.write(json.dumps({**diagnostics.read(tmp_path / "diag")[1][-1], "step": steps}) + "\n")
    assert run_cli(*common, "--out", tmp_path / "diag", "--resume") == 0
    _, records = diagnostics.read(tmp_path / "diag")
    assert [r["step"] for r in records] == list(range(2 * steps))
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    diag = torch.load(tmp_path / "diag" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(plain[k], diag[k]) for k in plain)
    capsys.readouterr()
    png = tmp_path / "d.png"
    assert run_cli("diagnose", tmp_path / "diag", "--png", png) == 0
    out = capsys.readouterr().out
    assert "| cos (first 10) |" in out and png.stat().st_size > 0
    assert run_cli("diagnose", tmp_path / "plain", "--png", png) == 2
    err = capsys.readouterr().err
    assert "train the run with --diagnostics" in err and len(err.strip().splitlines()) == 1


def _fake_run(path, estimator, losses, test_acc, seed):
    """A run directory as training writes it, with a per-step loss of ``losses``."""
    path.mkdir()
    cfg = {**vars(config.Config(estimator=estimator, seed=seed)), "out": str(path)}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0,
        "test_acc": test_acc, "test_loss": 1.0, "time_s": len(losses) * 0.5}) + "\n")  # fmt: skip
    w = diagnostics.Writer(path, ["conv"], 0)
    for step, loss in enumerate(losses):
        w.add({"step": step, "loss": loss, "fallbacks": 0, "cos": [1.0], "norm_ratio": [1.0],
               "drift": [0.0], "flips": [0.0]})  # fmt: skip
    w.flush()


def test_step_losses_table(tmp_path):
    from signgrad import report

    steps = 8
    _fake_run(tmp_path / "ste0", None, [2.0] * 4 + [1.0] * 4, 0.5, 0)
    _fake_run(tmp_path / "ste1", None, [2.0] * 4 + [1.0] * 4, 0.7, 1)
    # Reaches STE's final loss (1.0, averaged over 2 steps) at step 6.
    _fake_run(tmp_path / "fsg0", "fsg", [3.0] * 4 + [1.0] * 4, 0.4, 0)
    # Paired with STE's seeds 0 and 1: final losses 1.0 and 1.5 against 1.0 and 1.0.
    _fake_run(tmp_path / "mq0", "metaquant-fc", [3.0] * 8, 0.4, 0)
    _fake_run(tmp_path / "mq1", "metaquant-fc", [3.0] * 4 + [1.5] * 4, 0.4, 1)
    order = ["ste0", "ste1", "fsg0", "mq0", "mq1"]
    table = report.step_losses([tmp_path / r for r in order], window=2)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines()[2:5]}
    ste, fsg = rows["estimator=none"], rows["estimator=fsg"]
    assert ste[2] == str(steps) and ste[5] == "1.000 ± 0.000" and ste[6] == "6"
    assert ste[7] == "60.00 ± 10.00" and fsg[7] == "40.00" and fsg[6] == "6"
    assert fsg[3] == "3.000" and ste[8].startswith("0.500")
    # Paired by seed: fsg's one run has STE's seed 0 as its partner, equal final losses;
    # metaquant-fc's differences are +2.0 and +0.5: mean 1.25, 1.96 * 1.0607 / sqrt(2) = 1.47.
    mq = rows["estimator=metaquant-fc"]
    assert ste[9] == "baseline |" and fsg[9] == "+0.000 (1 pair) |"
    assert mq[9] == "+1.250 ± 1.470 (2 pairs) |"
