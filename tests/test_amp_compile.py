"""The GPU-path options on the CPU: fp16 autocast with loss scaling (plain and with a
learned estimator, including a step whose gradients overflow) and torch.compile, each
against the plain fp32 eager loop on real CIFAR-10 batches."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from signgrad import builders, data, hooks, train
from signgrad.config import Config
from signgrad.errors import SigngradError


def _setup(cifar_root, estimator: str | None, steps: int, batch: int = 64, **flags):
    cfg = Config(
        model="convnet", quantizer="dorefa", keep="none", estimator=estimator,
        batch_size=batch, schedule="constant", epochs=1, data_root=str(cifar_root),
        download=False, **flags,
    ).resolved()  # fmt: skip
    ds = builders.load_data(cfg)
    torch.manual_seed(0)
    model = builders.build_model(cfg, ds)
    n = batch * steps

    def loader() -> data.Loader:  # a fresh generator: every run sees the same batches
        return data.Loader(
            ds.train_images[:n], ds.train_labels[:n], batch_size=batch, mean=ds.mean,
            std=ds.std, train=True, augment=False, generator=torch.Generator().manual_seed(0),
            drop_last=True,
        )  # fmt: skip

    return cfg, model, loader


class _Losses(hooks.StepHook):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def after_step(self, step: hooks.Step) -> None:
        self.losses.append(float(step.train_loss))


def _train(cfg, model, loader, *, scaler=None, net=None) -> tuple[list[float], object]:
    optimizer = builders.make_optimizer(cfg, model)
    est = builders.build_estimator(cfg, model, None)
    record = _Losses()
    step_hooks = [*hooks.for_config(cfg, model, est, scaler=scaler), record]
    net = model if net is None else net  # (a compiled module has no truth value)
    train.train_epoch(cfg, net, optimizer, loader(), step_hooks, 0, progress=False, scaler=scaler)
    return record.losses, est


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [None, "fsg"])
def test_fp16_with_loss_scaling_follows_fp32(cifar_root, estimator) -> None:
    cfg, model, loader = _setup(cifar_root, estimator, steps=5, batch=32)
    fp32, _ = _train(cfg, copy.deepcopy(model), loader)
    cfg16 = dataclasses.replace(cfg, fp16=True)
    scaler = torch.amp.GradScaler("cpu")
    fp16, _ = _train(cfg16, model, loader, scaler=scaler)
    assert scaler.get_scale() == 2.0**16  # no overflow at the default scale
    torch.testing.assert_close(torch.tensor(fp16), torch.tensor(fp32), rtol=0.03, atol=0)
    assert fp16[-1] < fp16[0]


def test_an_overflowing_fp16_step_changes_no_weight_and_no_estimator_state(cifar_root) -> None:
    cfg, model, loader = _setup(cifar_root, "fsg", steps=2, batch=16, fp16=True)
    before = copy.deepcopy(model.state_dict())
    # A scale so large that the fp16 backward pass overflows at every step here.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, growth_interval=1000)
    losses, est = _train(cfg, model, loader, scaler=scaler)
    assert scaler.get_scale() == 2.0**98  # halved once per skipped step
    assert all(h.count == 0 for h in est.histories)  # no overflowed gradient stored
    for k, v in model.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(v, before[k]), k
    # Batch norm's running statistics move in the forward pass, as they do in fp32.
    assert len(losses) == 2


def test_fp16_refuses_bf16_and_accumulate() -> None:
    with pytest.raises(SigngradError, match="--bf16 and --fp16 exclude each other"):
        Config(fp16=True, bf16=True).resolved()
    with pytest.raises(SigngradError, match="--fp16 does not combine with --accumulate"):
        Config(fp16=True, accumulate=2).resolved()


@pytest.mark.slow
def test_torch_compile_trains_as_eager_with_a_learned_estimator(cifar_root) -> None:
    """torch.compile (inductor) through the look-ahead weights and the natural-gradient
    hooks of a learned estimator: the same losses as the eager loop."""
    cfg, model, loader = _setup(cifar_root, "fsg", steps=3)
    eager, _ = _train(cfg, copy.deepcopy(model), loader)
    compiled, _ = _train(cfg, model, loader, net=torch.compile(model))
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=0)


def test_an_fp16_run_resumes_exactly_and_refuses_a_damaged_scaler_state(
    pictures, tmp_path, run_cli, run_child, one_line_error
) -> None:
    """The loss scaler's state travels in the checkpoint: 1 epoch + resume equals 2
    epochs; a checkpoint whose scaler state is not one is a one-line error."""
    args = ["train", "--model", "convnet", "--data", f"imagefolder:{pictures}", "--fp16",
            "--batch-size", "8", "--epochs", "2", "--no-progress"]  # fmt: skip
    assert run_cli(*args, "--out", tmp_path / "whole") == 0
    assert run_cli(*args, "--out", tmp_path / "cut", "--stop-after", "1") == 0
    assert run_cli("train", "--out", tmp_path / "cut", "--resume", "--no-progress") == 0
    whole, cut = (torch.load(tmp_path / r / "checkpoint.pt") for r in ("whole", "cut"))
    assert whole["scaler"]["scale"] == cut["scaler"]["scale"]
    for k, v in whole["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    cut["scaler"] = {"scale": "big"}
    cut["epoch"], cut["history"] = 1, cut["history"][:1]
    torch.save(cut, tmp_path / "cut" / "checkpoint.pt")
    proc = run_child("-q", "train", "--out", tmp_path / "cut", "--resume", "--no-progress")
    one_line_error(proc, "its loss scaler state", "not the state of a torch.amp.GradScaler")
