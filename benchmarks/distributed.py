"""Training images per second on 1 and 2 data-parallel ranks (torchrun, Gloo, one thread
per rank), straight-through and ``fsg``, the scaling efficiency ips(2) / (2 ips(1)), and
2 ranks against what a user would run instead on the same two cores: one process with
two threads.

What is timed is signgrad's training loop, :func:`signgrad.train.train_epoch`, over a
fixed number of batches of the global batch (default 128), as ``signgrad train`` runs it
under ``torchrun``: each rank's shard of the batch from the in-memory loader, forward,
backward with DistributedDataParallel's gradient all-reduce, the learned estimator's
all-reduce of its natural and meta-gradients, the optimizer step, and the epoch's final
reduction of loss and accuracy. Model building and the first (warm-up) pass are not timed.

Each (configuration, ranks) pair is a separate ``torchrun`` launch; the pairs are run
round-robin, ``--rounds`` times, and the median per pair is shown, so that the drifts of a
noisy machine hit all of them alike. Spinning OpenMP threads are switched off
(OMP_WAIT_POLICY=PASSIVE) so that two ranks on two cores do not steal each other's time.

    SIGNGRAD_DATA=/path/to/data python benchmarks/distributed.py             # ResNet-20
    python benchmarks/distributed.py --rounds 5 --steps 20 --estimators none fsg
    python benchmarks/distributed.py --device cuda --ranks 1 2 4 8           # on GPUs

Without SIGNGRAD_DATA it trains on random images of CIFAR-10's shape.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One rank: build the run as ``signgrad train`` does, time ``train_epoch``."""
    from signgrad import builders, data, distributed, hooks, train
    from signgrad.config import Config

    ctx = distributed.from_environment()
    device = ctx.device(builders.pick_device(args.device))
    created = distributed.setup(ctx, device)
    estimator = None if args.estimator == "none" else args.estimator
    cfg = Config(
        model=args.model, data="cifar10", quantizer="dorefa", keep="none", estimator=estimator,
        batch_size=args.batch_size, schedule="constant", epochs=1, bf16=args.bf16,
        download=False,
    ).resolved()  # fmt: skip
    if os.environ.get("SIGNGRAD_DATA"):
        ds = builders.load_data(cfg)
        images, labels = ds.train_images, ds.train_labels
        mean, std = ds.mean, ds.std
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (5120, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (5120,), generator=g)
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    n = args.batch_size * args.steps
    images, labels = images[:n], labels[:n]

    torch.manual_seed(0)
    model = builders.build_architecture(cfg, 10, 3, 32).to(device)
    optimizer = builders.make_optimizer(cfg, model)
    est = builders.build_estimator(cfg, model, None)
    if est is not None and ctx.enabled:
        est.reduce_gradients = lambda ts: distributed.all_reduce_mean_(ctx, ts)
    net = distributed.wrap(model, ctx, device)
    step_hooks = hooks.for_config(cfg, model, est, ctx=ctx)
    loader = data.Loader(
        images, labels, batch_size=args.batch_size, mean=mean, std=std, train=True,
        augment=True, device=device, generator=torch.Generator().manual_seed(0),
        drop_last=True, shard=(ctx.rank, ctx.world_size),
    )  # fmt: skip
    train.train_epoch(cfg, net, optimizer, loader, step_hooks, 0, progress=False, ctx=ctx)
    ctx.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    train.train_epoch(cfg, net, optimizer, loader, step_hooks, 1, progress=False, ctx=ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ctx.barrier()
    seconds = time.perf_counter() - t0
    if ctx.is_main:
        print(f"RESULT images_per_s={len(loader) * args.batch_size / seconds:.3f}", flush=True)
    distributed.teardown(created)


def launch(args: argparse.Namespace, estimator: str, ranks: int, threads: int) -> float:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__,
        "--worker", "--estimator", estimator, "--model", args.model,
        "--batch-size", str(args.batch_size), "--steps", str(args.steps),
        "--device", args.device,
    ] + (["--bf16"] if args.bf16 else [])  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    found = re.search(r"RESULT images_per_s=([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return float(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--estimator", default="none", help=argparse.SUPPRESS)
    p.add_argument("--estimators", nargs="+", default=["none", "fsg"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-size", type=int, default=128, help="the global batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per launch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="threads per rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    if args.worker:
        from signgrad import distributed

        worker(args)
        distributed.exit_process(0)  # Gloo's workers could abort a finalizing interpreter
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {args.model}, global batch "
        f"{args.batch_size}, {args.steps} steps per launch, {args.threads} thread(s) per "
        f"rank, device {args.device}, {args.rounds} rounds (median)"
    )
    # (estimator, ranks, threads per rank); the last of each estimator is what a user
    # would run instead on the same cores: one process with all of their threads.
    most = max(args.ranks)
    runs = [(e, r, args.threads) for e in args.estimators for r in args.ranks]
    if most > 1:
        runs += [(e, 1, most * args.threads) for e in args.estimators]
    results: dict[tuple[str, int, int], list[float]] = {run: [] for run in runs}
    for _ in range(args.rounds):
        for run in runs:
            results[run].append(launch(args, *run))
    print()
    print("| estimator | ranks x threads | images/s (median) | range | scaling efficiency |")
    print("|---|---|---:|---|---:|")
    for e, r, t in runs:
        ips = statistics.median(results[(e, r, t)])
        base = statistics.median(results[(e, args.ranks[0], args.threads)]) * r / args.ranks[0]
        eff = f"{ips / base:.2f}" if t == args.threads else "-"
        spread = f"{min(results[(e, r, t)]):.1f}-{max(results[(e, r, t)]):.1f}"
        print(f"| {e} | {r} x {t} | {ips:.1f} | {spread} | {eff} |")
    if most > 1:
        print()
        for e in args.estimators:
            ddp = statistics.median(results[(e, most, args.threads)])
            alone = statistics.median(results[(e, 1, most * args.threads)])
            print(f"{e}: {most} ranks x {args.threads} thread(s) / 1 process x "
                  f"{most * args.threads} threads: {ddp / alone:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
