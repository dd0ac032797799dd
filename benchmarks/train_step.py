"""Milliseconds per training step of ResNet-20 (batch 128): full precision vs binary
weights with each quantizer vs 1W1A, as ratios to full precision measured in the same run.

A step is forward + backward + Adam step on a fixed random batch (data loading excluded).
Configurations are measured round-robin (one step of each in turn, after warm-up), so
that drifts of a noisy machine hit all of them alike; the median of the rounds is shown.

    python benchmarks/train_step.py                      # fp32 and bf16, every quantizer
    python benchmarks/train_step.py --precisions fp32 --rounds 20
    python benchmarks/train_step.py --hyper resnet18 --quantizers bnn --precisions fp32

``--hyper MODEL`` instead compares the Hyper-BinaryNet form of MODEL (HyperConv layers)
with its plain binary form, same quantizer, 1W32A and 1W1A, as ratios hyper / binary.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from signgrad import convert, layers, models, quantizers


def build(
    weight_q: str | None,
    input_q: str | None,
    channels_last: bool,
    model_name: str = "resnet20",
    hyper: bool = False,
) -> nn.Module:
    torch.manual_seed(0)
    act = "hardtanh" if input_q else "relu"
    model = models.get(model_name, num_classes=10, in_channels=3, activation=act)
    if weight_q or input_q:
        convert.binarize(model, weight_q or "none", input_q, hyper=hyper)
        layers.set_epoch(model, 0, 100)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool
) -> float:
    """One timed training step."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    every = [q for q in quantizers.names() if q != "none"]
    p.add_argument("--quantizers", nargs="+", default=every)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--hyper", metavar="MODEL", help="compare hyper-MODEL with binary MODEL")
    args = p.parse_args()

    model_name = args.hyper or "resnet20"
    if args.hyper:
        configs = []
        for q in args.quantizers:
            for iq, kind in ((None, "1W32A"), (q, "1W1A")):
                configs += [
                    (f"{kind} {q} binary", q, iq, False),
                    (f"{kind} {q} hyper", q, iq, True),
                ]
    else:
        configs = [("full precision", None, None, False)]
        configs += [(f"1W32A {q}", q, None, False) for q in args.quantizers]
        configs += [("1W1A bnn/bnn", "bnn", "bnn", False)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, {model_name}, batch {args.batch_size}, "
        f"channels_last {args.channels_last}, {args.rounds} rounds"
    )
    print()
    against = "binary of the same kind" if args.hyper else "full precision"
    print(f"| configuration | precision | ms / step (median) | ratio to {against} |")
    print("|---|---|---:|---:|")
    base_ms: dict[str, float] = {}
    for precision in args.precisions:
        bf16 = precision == "bf16"
        runs = []
        for label, wq, iq, hyper in configs:
            model = build(wq, iq, args.channels_last, model_name, hyper)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            runs.append((label, model, opt, []))

        for r in range(args.warmup + args.rounds):
            for _, model, opt, times in runs:
                t = step(model, opt, x, y, bf16)
                if r >= args.warmup:
                    times.append(t)
        base_ms[precision] = 1000 * statistics.median(runs[0][3])
        for k, (label, _, _, times) in enumerate(runs):
            ms = 1000 * statistics.median(times)
            # --hyper: each hyper configuration against the binary one just before it.
            base = (
                1000 * statistics.median(runs[k - k % 2][3]) if args.hyper else base_ms[precision]
            )
            print(f"| {label} | {precision} | {ms:.1f} | {ms / base:.3f} |", flush=True)
    if len(base_ms) == 2:
        # Measured in separate passes (not interleaved): a coarse figure.
        print(f"\nfull precision, bf16 / fp32 step time: {base_ms['bf16'] / base_ms['fp32']:.2f}")


if __name__ == "__main__":
    main()
