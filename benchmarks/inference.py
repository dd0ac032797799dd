"""Latency of the packed runtime against float PyTorch on the CPU, as ratios in one run.

* one 1W1A 3x3 convolution, 64 -> 64 channels, on 32x32 and 16x16 maps: the runtime's
  whole layer (sign-packing the float input, XNOR-popcount, scale/shift epilogue, float
  output) against ``F.conv2d`` on float tensors;
* whole 1W1A ResNet-20 and VGG-Small (first and last layer full precision, batch norm
  statistics from a few training-mode batches): ``PackedModel.run`` against the same
  architecture in full precision (``nn.Conv2d``, eager, eval, no_grad), and against the
  binarized PyTorch model it was exported from;

at batch 1 and 32, PyTorch and the runtime on the same number of threads. Calls are
timed round-robin after warm-up and the median is shown, so that drifts of a noisy
machine hit every contender alike.

    python benchmarks/inference.py                   # all, 2 threads
    python benchmarks/inference.py --threads 1 --rounds 50
    python benchmarks/inference.py --profile     # + where a packed network's time goes
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F

from signgrad import convert, export, graph, layers, models
from signgrad.runtime import format as fmt
from signgrad.runtime import kernels
from signgrad.runtime import model as runtime


def timed(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function, measured round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def calibrated(model: torch.nn.Module, shape: tuple[int, int, int]) -> torch.nn.Module:
    """Fill batch-norm statistics with a few training-mode batches, then eval()."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *shape, generator=g))
    return model.eval()


def packed_model(model: torch.nn.Module, shape: tuple[int, int, int], threads: int):
    src = export.Source(
        model, shape, [str(i) for i in range(10)], [0.0] * shape[0], [1.0] * shape[0], {}
    )
    g, tensors = fmt.read_bytes(export.packed(src))
    return runtime.build(g, tensors, backend="compiled", threads=threads)


def single_conv(size: int, batch: int, threads: int, rounds: int, warmup: int) -> list[str]:
    torch.manual_seed(0)
    conv = layers.BinaryConv2d(64, 64, 3, padding=1, weight_quantizer="bnn", input_quantizer="bnn")
    # A packed model ends in N x classes, hence the head; only step 0, the conv, is timed.
    head = (torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    net = calibrated(torch.nn.Sequential(conv, torch.nn.BatchNorm2d(64), *head), (64, size, size))
    pm = packed_model(net, (64, size, size), threads)
    x = torch.randn(batch, 64, size, size)
    x_nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    w = torch.randn(64, 64, 3, 3)
    step = pm.steps[0]
    name = pm.graph["input"]["name"]
    with torch.no_grad():
        ms = timed(
            {
                "float": lambda: F.conv2d(x, w, padding=1),
                "packed": lambda: step.fn({name: x_nhwc}),
            },
            rounds,
            warmup,
        )
    return [
        f"| 1W1A conv 64->64 3x3, {size}x{size} | {batch} | {ms['float']:.3f} | "
        f"{ms['packed']:.3f} | {ms['float'] / ms['packed']:.2f} |"
    ]


SHAPE = (3, 32, 32)


def network(arch: str, binary: bool) -> torch.nn.Module:
    """``arch`` for CIFAR-sized inputs: float, or 1W1A with calibrated batch norm."""
    torch.manual_seed(0)
    kw = {"image_size": 32} if arch == "vgg-small" else {}
    model = models.get(arch, num_classes=10, in_channels=3, activation="hardtanh", **kw)
    return calibrated(convert.binarize(model, "bnn", "bnn"), SHAPE) if binary else model.eval()


def whole_network(arch: str, batch: int, threads: int, rounds: int, warmup: int) -> list[str]:
    fp, binary = network(arch, binary=False), network(arch, binary=True)
    pm = packed_model(binary, SHAPE, threads)
    x = torch.randn(batch, *SHAPE)
    xn = x.numpy()
    with torch.no_grad():
        ms = timed(
            {"float": lambda: fp(x), "binary": lambda: binary(x), "packed": lambda: pm.run(xn)},
            rounds,
            warmup,
        )
    return [
        f"| 1W1A {arch} | {batch} | {ms['float']:.3f} | {ms['packed']:.3f} | "
        f"{ms['float'] / ms['packed']:.2f} | {ms['binary']:.3f} |"
    ]


def profile(arch: str, batch: int, threads: int, rounds: int, warmup: int) -> list[str]:
    """Median milliseconds of each step of the packed network, slowest first."""
    pm = packed_model(network(arch, binary=True), SHAPE, threads)
    x = np.transpose(
        np.random.default_rng(0).standard_normal((batch, *SHAPE), np.float32), (0, 2, 3, 1)
    )
    times: dict[str, list[float]] = {s.name: [] for s in pm.steps}
    for r in range(warmup + rounds):
        values = {pm.graph["input"]["name"]: x}
        for s in pm.steps:
            t0 = time.perf_counter()
            values[s.output] = s.fn(values)
            if r >= warmup:
                times[s.name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    total = sum(ms.values())
    kind = {s.name: "binary" if s.binary else "numpy" for s in pm.steps}
    binary_ms = sum(v for k, v in ms.items() if kind[k] == "binary")
    lines = [
        f"\n{arch}, batch {batch}: {total:.3f} ms in {len(ms)} steps, of which binary "
        f"kernels {binary_ms:.3f} ms"
    ]
    for k, v in sorted(ms.items(), key=lambda kv: -kv[1])[:6]:
        lines.append(f"  {k:24s} {kind[k]:6s} {v:7.3f} ms ({100 * v / total:.0f}%)")
    return lines


def sizes() -> list[str]:
    """Exported size of 1W1A ResNet-20 against its float state_dict."""
    torch.manual_seed(0)
    m = models.get("resnet20", num_classes=10, in_channels=3, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    m.eval()
    src = export.Source(m, (3, 32, 32), [str(i) for i in range(10)], [0.0] * 3, [1.0] * 3, {})
    packed, full = len(export.packed(src, graph.build(m, (3, 32, 32)))), export.float_size(m)
    return [
        f"1W1A ResNet-20 (first/last full precision): packed file {packed} bytes, float "
        f"state_dict {full} bytes, {full / packed:.1f}x smaller"
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--networks", nargs="+", default=["resnet20", "vgg-small"])
    p.add_argument("--profile", action="store_true", help="also time each packed step")
    args = p.parse_args()
    if kernels.COMPILED is None:
        raise SystemExit(f"the compiled kernels are not built: {kernels.UNAVAILABLE}")
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, CPU "
        f"capability {torch.backends.cpu.get_cpu_capability()}, runtime kernels "
        f"{kernels.COMPILED}, {args.threads} threads, median of {args.rounds} rounds\n"
    )
    print("| layer | batch | float PyTorch ms | packed ms | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for size in (32, 16):
        for b in args.batches:
            print(*single_conv(size, b, args.threads, args.rounds, args.warmup), flush=True)
    print("\n| network | batch | float PyTorch ms | packed ms | speed-up | binarized PyTorch ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch in args.networks:
        for b in args.batches:
            rounds = max(5, args.rounds // 3) if arch == "vgg-small" and b > 1 else args.rounds
            print(*whole_network(arch, b, args.threads, rounds, args.warmup), flush=True)
    if args.profile:
        for arch in args.networks:
            for b in args.batches:
                print(*profile(arch, b, args.threads, args.rounds, args.warmup), sep="\n")
    print()
    print(*sizes())


if __name__ == "__main__":
    main()
