"""Whole-network latency of the packed runtime against what a user would pick instead, on
the CPU, as ratios measured in one run.

For 1W1A ResNet-20 and VGG-Small (first and last layer full precision, batch norm
statistics from a few training-mode batches), at batch 1 and 32 and on 1 and 2 threads,
each contender is what a user calls, on N x C x H x W float32 input, output included:

* ``packed``: ``PackedModel.run`` of the packed export (the compiled backend);
* ``torch``: the same architecture in full precision, eager, eval, ``no_grad``;
* ``compile``: that model after ``torch.compile`` (compilation not timed);
* ``onnxruntime``: the ONNX export of the binary network, on an onnxruntime session
  with as many intra-op threads and spinning switched off.

The contenders run round-robin after warm-up, so that a noisy machine's drifts hit all
alike; OpenMP spinning is switched off for all (``OMP_WAIT_POLICY=PASSIVE`` before
torch loads, onnxruntime's ``allow_spinning=0``; the runtime's threads exist only during
a call). Each block of rounds gives a median per contender; the block is repeated and
the tables show the median over the repeats with the range of the ratio.

The roofline: ``popcount_peak`` runs XOR, popcount and add on 8192 bits held in
registers with the instruction set the kernels use (no memory traffic): the most binary
multiply-accumulates per second one core can do. A binary convolution's share is its
useful multiply-accumulates (N x Ho x Wo x O x KH x KW x C) per second, from the
runtime's per-operation clock, over that peak times the threads it ran on. The clock's
times are means over a block of rounds; the share is that of the median block (of
``--repeats``), with the range over the blocks.

    python benchmarks/inference.py                       # 1 and 2 threads, all
    python benchmarks/inference.py --threads 1 --no-compile --repeats 1
    python benchmarks/inference.py --threads 1 --batches 32 --layers   # per binary layer
"""

from __future__ import annotations

import os

for _var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
    os.environ.setdefault(_var, {"OMP_WAIT_POLICY": "PASSIVE"}.get(_var, "0"))

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from timing import timed  # noqa: E402  (benchmarks/timing.py)

from signgrad import convert, export, graph, models  # noqa: E402
from signgrad.runtime import format as fmt  # noqa: E402
from signgrad.runtime import kernels, network  # noqa: E402
from signgrad.runtime import model as runtime  # noqa: E402

SHAPE = (3, 32, 32)
CLASSES = [str(i) for i in range(10)]


def calibrated(model: torch.nn.Module, shape: tuple[int, int, int]) -> torch.nn.Module:
    """Fill batch-norm statistics with a few training-mode batches, then eval()."""
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *shape, generator=g))
    return model.eval()


def network_of(arch: str, binary: bool) -> torch.nn.Module:
    """``arch`` for CIFAR-sized inputs: float, or 1W1A with calibrated batch norm."""
    torch.manual_seed(0)
    kw = {"image_size": 32} if arch == "vgg-small" else {}
    model = models.get(arch, num_classes=10, in_channels=3, activation="hardtanh", **kw)
    return calibrated(convert.binarize(model, "bnn", "bnn"), SHAPE) if binary else model.eval()


def source(model: torch.nn.Module) -> export.Source:
    return export.Source(model, SHAPE, CLASSES, [0.0] * 3, [1.0] * 3, {})


def packed_model(model: torch.nn.Module, threads: int) -> runtime.PackedModel:
    g, tensors = fmt.read_bytes(export.packed(source(model)))
    return runtime.build(g, tensors, backend="compiled", threads=threads)


def ort_session(model: torch.nn.Module, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    data = export.checked(source(model), "onnx").data
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def contenders(arch: str, threads: int, use_compile: bool) -> dict[str, Callable]:
    """For each contender, a function of a numpy batch returning its logits."""
    fp, binary = network_of(arch, binary=False), network_of(arch, binary=True)
    pm = packed_model(binary, threads)
    fns: dict[str, Callable] = {"packed": pm.run}

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return fp(torch.from_numpy(x)).numpy()

    fns["torch"] = eager
    if use_compile:
        compiled = torch.compile(fp)

        def comp(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return compiled(torch.from_numpy(x)).numpy()

        fns["compile"] = comp
    try:
        sess = ort_session(binary, threads)
        fns["onnxruntime"] = lambda x: sess.run(None, {"input": x})[0]
    except ImportError:
        print("(onnxruntime not installed: pip install 'signgrad[onnx]')")
    return fns


def whole_networks(args: argparse.Namespace) -> list[str]:
    lines = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for arch in args.networks:
            fns = contenders(arch, threads, not args.no_compile)
            names = list(fns)
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, *SHAPE), np.float32)
                calls = {k: (lambda f=f, x=x: f(x)) for k, f in fns.items()}
                rounds = args.rounds if batch == 1 else max(5, args.rounds // 4)
                runs = [timed(calls, rounds, args.warmup) for _ in range(args.repeats)]
                ms = {k: statistics.median(r[k] for r in runs) for k in names}
                cells = [f"{ms[k]:.3f}" for k in names]
                for k in names[1:]:
                    ratios = [r[k] / r["packed"] for r in runs]
                    cells.append(
                        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                    )
                if header(names) not in lines:
                    lines += ["", header(names), "|---|---:|---:|" + "---:|" * (2 * len(names) - 1)]
                    print(*lines[-3:], sep="\n")
                lines.append(f"| {arch} | {threads} | {batch} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return lines


def header(names: list[str]) -> str:
    ms = " | ".join(f"{k} ms" for k in names)
    ratio = " | ".join(f"{k} / packed" for k in names[1:])
    return f"| network | threads | batch | {ms} | {ratio} |"


def peak_per_thread() -> float:
    """Binary multiply-accumulates per second of one core (the popcount roofline)."""
    rounds = 2_000_000
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        kernels.popcount_peak(rounds)
        best = min(best, time.perf_counter() - t0)
    return kernels.PEAK_BITS_PER_ROUND * rounds / best


def roofline(args: argparse.Namespace, peak: float) -> list[str]:
    """Per network, batch and thread count: the binary convolutions' share of the
    popcount roofline, and where the time goes."""
    lines = [
        "",
        f"popcount roofline: {peak / 1e9:.0f} G binary MAC/s per core ({kernels.COMPILED})",
        "",
        "| network | threads | batch | forward ms | binary convs ms | binary MAC/s | "
        "share of roofline | slowest operations |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    print(*lines, sep="\n")
    per_layer = []
    for threads in args.threads:
        for arch in args.networks:
            net = packed_model(network_of(arch, binary=True), threads).network
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, *SHAPE), np.float32)
                reps = args.rounds if batch == 1 else max(5, args.rounds // 4)
                for _ in range(args.warmup):
                    net.run(x)
                # each operation's mean time per block of rounds, then the median block:
                # a burst of noise from outside moves one block, not the result
                blocks = np.zeros((args.repeats, len(net.rows)))
                for b in range(args.repeats):
                    for _ in range(reps):
                        net.run(x, blocks[b])
                blocks /= reps
                t = np.median(blocks, axis=0)
                used = net.threads_for(batch)
                binary = [i for i, r in enumerate(net.rows) if r[0] == network.BCONV]
                macs = sum(batch * bconv_macs(net.rows[i]) for i in binary)
                secs = sum(t[i] for i in binary)
                shares = sorted(100 * macs / blocks[:, binary].sum(1) / (peak * used))
                top = sorted(range(len(t)), key=lambda i: -t[i])[:3]
                slow = ", ".join(f"{net.names[i]} {100 * t[i] / t.sum():.0f}%" for i in top)
                lines.append(
                    f"| {arch} | {threads} ({used} used) | {batch} | {1000 * t.sum():.3f} | "
                    f"{1000 * secs:.3f} | {macs / secs / 1e9:.0f} G | "
                    f"{100 * macs / secs / (peak * used):.0f}% ({shares[0]:.0f}-{shares[-1]:.0f}%) "
                    f"| {slow} |"
                )
                print(lines[-1], flush=True)
                if args.layers:
                    per_layer.append((arch, threads, used, batch, net, t, binary))
    for arch, threads, used, batch, net, t, binary in per_layer:
        lines += [
            "",
            f"{arch}, {threads} thread(s) ({used} used), batch {batch}, each binary convolution:",
            "",
            "| layer | C | O | stride | signs only | ms | share of roofline |",
            "|---|---:|---:|---:|---|---:|---:|",
        ]
        for i in binary:
            f = dict(zip(network.FIELDS, net.rows[i], strict=True))
            share = 100 * batch * bconv_macs(net.rows[i]) / t[i] / (peak * used)
            only = "yes" if f["flags"] & network.BITS_ONLY else ""
            lines.append(
                f"| {net.names[i]} | {f['c']} | {f['o']} | {f['sw']} | {only} | "
                f"{1000 * t[i]:.4g} | {share:.0f}% |"  # 4 digits: batch 1 is microseconds
            )
        print(*lines[-len(binary) - 5 :], sep="\n", flush=True)
    return lines


def bconv_macs(row: list[int]) -> int:
    """Useful binary multiply-accumulates of one image in a binary convolution row."""
    f = dict(zip(network.FIELDS, row, strict=True))
    return f["ho"] * f["wo"] * f["o"] * f["kh"] * f["kw"] * f["c"]


def sizes() -> list[str]:
    """Exported size of 1W1A ResNet-20 against its float state_dict."""
    torch.manual_seed(0)
    m = models.get("resnet20", num_classes=10, in_channels=3, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    m.eval()
    packed, full = len(export.packed(source(m), graph.build(m, SHAPE))), export.float_size(m)
    return [
        "",
        f"1W1A ResNet-20 (first/last full precision): packed file {packed} bytes, float "
        f"state_dict {full} bytes, {full / packed:.1f}x smaller",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=40, help="per block at batch 1 (/4 at 32)")
    p.add_argument("--repeats", type=int, default=3, help="blocks of rounds")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--networks", nargs="+", default=["resnet20", "vgg-small"])
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--layers", action="store_true", help="each binary convolution's share")
    args = p.parse_args()
    if kernels.COMPILED is None:
        raise SystemExit(f"the compiled kernels are not built: {kernels.UNAVAILABLE}")
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"runtime kernels {kernels.COMPILED}, median of {args.rounds} rounds (batch 1; "
        f"{max(5, args.rounds // 4)} at larger batches) x {args.repeats} repeats",
        flush=True,
    )
    # the roofline pass first, before any other contender has run in this process: it
    # compares the runtime with the CPU, not with the others
    roofline(args, peak_per_thread())
    whole_networks(args)
    print(*sizes(), sep="\n")


if __name__ == "__main__":
    main()
