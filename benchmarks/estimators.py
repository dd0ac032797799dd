"""Milliseconds per training step of ResNet-20 (batch 128, every layer binarized, DoReFa
forward, Adam) with plain STE and with each learned estimator, as ratios to STE measured
in the same run, and the size of each estimator's state (meta-networks, their optimizer,
gradient history, recurrent states).

Configurations are measured round-robin (one step of each in turn, after warm-up); the
median over rounds is shown.

    python benchmarks/estimators.py
    python benchmarks/estimators.py --estimators fsg metaquant-multifc --rounds 10
    python benchmarks/estimators.py --estimators fsg fsg:parts=fast fsg:d_inner=4,d_state=2
    python benchmarks/estimators.py --estimators fsg --diagnostics   # + their recording

An estimator is NAME or NAME:KEY=VALUE,KEY=VALUE (settings as for ``--estimator-param``),
so that variants of one estimator can be timed side by side.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from signgrad import convert, estimators, hooks, models


def build(spec: str | None) -> tuple[nn.Module, estimators.LearnedEstimator | None]:
    torch.manual_seed(0)
    model = models.get("resnet20", num_classes=10, in_channels=3)
    convert.binarize(model, "dorefa", keep="none")
    if spec is None:
        return model, None
    name, _, settings = spec.partition(":")
    params = estimators.parse_params(settings.split(",") if settings else [], name)
    return model, estimators.build(name, model, **params)


def step(model, est, opt, x, y, diag=None, lr: float = 1e-3) -> float:
    """One training step; with ``diag`` (a GradientDiagnostics hook) recorded as
    ``signgrad train --diagnostics`` records it, its file written every 40 steps."""
    t0 = time.perf_counter()
    if est is not None:
        est.begin_step(lr)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    if est is not None:
        est.zero_grad()
    loss.backward()
    if est is not None:
        est.end_step()
    s = hooks.Step(0, 0, 40, lr, x, y, train_loss=loss.detach()) if diag else None
    if diag:
        diag.after_backward(s)
    opt.step()
    if diag:
        diag.after_step(s)
        if len(diag.writer.pending) >= 40:
            diag.end_epoch({})
    return time.perf_counter() - t0


def state_bytes(est: estimators.LearnedEstimator | None) -> int:
    if est is None:
        return 0
    total = 0

    def walk(obj) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    walk(est.state_dict())
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimators", nargs="+", default=estimators.names())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--diagnostics", action="store_true",
                   help="also time each configuration with --diagnostics recording")  # fmt: skip
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    runs = []
    for name in [None, *args.estimators]:
        for diagnose in (False, True) if args.diagnostics else (False,):
            model, est = build(name)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            label = (name or "STE (dorefa)") + (" + diagnostics" if diagnose else "")
            out = Path(tmp.name) / f"run{len(runs)}"
            out.mkdir()
            diag = hooks.GradientDiagnostics(model, est, out, 0) if diagnose else None
            runs.append((label, model, est, opt, diag, []))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, ResNet-20, batch {args.batch_size}, "
        f"{args.rounds} rounds"
    )
    for r in range(args.warmup + args.rounds):
        for _, model, est, opt, diag, times in runs:
            t = step(model, est, opt, x, y, diag)
            if r >= args.warmup:
                times.append(t)
    base = statistics.median(runs[0][5])
    print()
    print("| estimator | ms / step (median) | ratio to STE | estimator state (MB) |")
    print("|---|---:|---:|---:|")
    for label, _, est, _, _, times in runs:
        ms = 1000 * statistics.median(times)
        mb = state_bytes(est) / 2**20
        print(f"| {label} | {ms:.1f} | {ms / (1000 * base):.2f} | {mb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
