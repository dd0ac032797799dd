"""Does the streaming image-folder loader keep up with training? Images per second of
the loader (JPEG files, decoded and augmented to 224 x 224 by worker processes) next to
images per second of a ResNet-18-ImageNet training step, measured in one run.

The folder is written first, in a temporary directory (``benchmarks/jpeg_folder.py``):
real CIFAR-10 training images upscaled (bicubic) to ImageNet's typical 500 x 375 and
saved as JPEG (quality 90), so
decoding costs what a real photo of that size costs. The loader is timed through what
the trainer calls: ``folders.open_folder(..., mode="stream")`` and iterating a
``folders.StreamLoader`` over the training split (random-resized crop + flip, batches of
uint8 moved to float and normalised), with 0 (in this process), 1 and 2 workers. The
training step is forward + backward + Adam on ResNet-18-ImageNet, full precision and
1W1A (``bnn``, first and last layers full precision), on a batch from the loader.
Loader epochs and training steps alternate, round-robin, so that the machine's drifts
hit all of them alike; medians of the rounds are shown.

    SIGNGRAD_DATA=/path/to/data python benchmarks/loader.py
    SIGNGRAD_DATA=/path/to/data python benchmarks/loader.py --images 256 --rounds 3
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads between contenders

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jpeg_folder  # benchmarks/jpeg_folder.py, beside this script
import torch
from torch.nn import functional as F

from signgrad import convert, folders, models


def loader_epoch(ds: folders.StreamSet, batch: int) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    loader = folders.StreamLoader(ds, split="train", batch_size=batch, train=True, generator=g)
    t0 = time.perf_counter()
    seen = sum(len(y) for _, y in loader)
    return time.perf_counter() - t0, seen


def train_steps(model, opt, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512, help="training images in the folder")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()

    cpu = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cores} cores, {cpu}")
    with tempfile.TemporaryDirectory() as tmp:
        root = jpeg_folder.write("cifar10", Path(tmp) / "jpeg", (args.images // 10, 1), (500, 375))
        sets = {w: folders.open_folder(str(root), mode="stream", image_size=224, workers=w)
                for w in args.workers}  # fmt: skip
        x, y = next(iter(folders.StreamLoader(sets[args.workers[0]], split="train",
                                              batch_size=args.batch, train=True)))  # fmt: skip
        nets = {}
        for label, wq, iq in (("fp32", None, None), ("1W1A bnn", "bnn", "bnn")):
            torch.manual_seed(0)
            act = "hardtanh" if iq else "relu"
            m = models.get("resnet18-imagenet", num_classes=10, in_channels=3, activation=act)
            if wq:
                convert.binarize(m, wq, iq)
            nets[label] = (m, torch.optim.Adam(m.parameters(), lr=1e-3))
        for m, opt in nets.values():  # warm-up
            train_steps(m, opt, x, y, 1)
        for ds in sets.values():
            loader_epoch(ds, args.batch)
        loader_rates: dict[int, list[float]] = {w: [] for w in sets}
        step_rates: dict[str, list[float]] = {k: [] for k in nets}
        for _ in range(args.rounds):
            for w, ds in sets.items():
                seconds, seen = loader_epoch(ds, args.batch)
                loader_rates[w].append(seen / seconds)
            for label, (m, opt) in nets.items():
                seconds = train_steps(m, opt, x, y, args.steps)
                step_rates[label].append(args.steps * len(y) / seconds)
    print(f"{args.images} JPEG files of 500 x 375, batch {args.batch}, {args.rounds} rounds "
          "(median, min-max)")  # fmt: skip
    print("| what | images / s |\n|---|---:|")
    for w, r in loader_rates.items():
        label = "in this process" if w == 0 else f"{w} worker{'s' if w > 1 else ''}"
        print(f"| loader, 224 x 224 random-resized crops, {label} | "
              f"{statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f}) |")  # fmt: skip
    for label, r in step_rates.items():
        print(f"| training step, ResNet-18-ImageNet {label} | "
              f"{statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f}) |")  # fmt: skip
    best = max(statistics.median(r) for r in loader_rates.values())
    slowest = min(statistics.median(r) for r in step_rates.values())
    fastest = max(statistics.median(r) for r in step_rates.values())
    print(
        f"loader / training: {best / fastest:.0f}x the fastest step's need, "
        f"{best / slowest:.0f}x the slowest's"
    )


if __name__ == "__main__":
    main()
