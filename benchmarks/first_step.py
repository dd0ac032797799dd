"""The first learned gradient of each estimator against the straight-through gradient it
reads, over seeds.

Protocol (the MetaQuant/FSG setting): ResNet-20 with option-B shortcuts from the authors'
full-precision model (``$SIGNGRAD_DATA/pretrained/ResNet20-CIFAR10-pretrain.pth``, their
normalisation), every layer binarized with DoReFa, Adam 1e-3, batch 128 of the CIFAR-10
subset. Per seed (the meta-networks' init and the batches): one step fills the gradient
history, then the estimator's first g^ is compared with B'(W) * g, the straight-through
gradient of the same natural gradient g: the cosine over all binarized weights at once.

    python benchmarks/first_step.py --seeds 8

Variants are written ``NAME:KEY=VALUE,...`` (e.g. ``fsg:start=random``).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
from torch.nn import functional as F

from signgrad import builders, config, data, estimators

DEFAULT = [
    "fsg", "fsg:start=random", "metaquant-fc", "metaquant-fc:start=random",
    "metaquant-multifc", "metaquant-multifc:start=random", "metaquant-lstm",
    "metaquant-lstm:start=random", "metaquant-fc-ref", "metaquant-multifc-ref",
    "metaquant-lstm-ref",
]  # fmt: skip
AUTHORS_NORM = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}


def first_cosine(spec: str, seed: int, ds: data.DataSet, init: Path) -> float:
    name, _, rest = spec.partition(":")
    params = estimators.parse_params([p for p in rest.split(",") if p], name)
    cfg = config.Config(model="resnet20-b", quantizer="dorefa", keep="none", init=str(init),
                        seed=seed, **AUTHORS_NORM).resolved()  # fmt: skip
    torch.manual_seed(seed)
    model = builders.build_model(cfg, ds)
    est = estimators.build(name, model, **params)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = data.Loader(ds.train_images, ds.train_labels, batch_size=128, mean=ds.mean,
                         std=ds.std, train=True, augment=True,
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    x, y = next(iter(loader))
    est.begin_step(1e-3)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    est.zero_grad()
    loss.backward()
    est.end_step()
    opt.step()
    est.begin_step(1e-3)
    ghat = torch.cat([g.flatten() for g in est._ghat])
    ste = torch.cat([est.calibrate(i, h.latest()).flatten() for i, h in enumerate(est.histories)])
    est.detach_layers()
    return F.cosine_similarity(ghat, ste, dim=0).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimators", nargs="+", default=DEFAULT)
    p.add_argument("--seeds", type=int, default=8)
    root = Path(os.environ.get("SIGNGRAD_DATA", "~/.cache/signgrad/data")).expanduser()
    p.add_argument("--init", type=Path, default=root / "pretrained/ResNet20-CIFAR10-pretrain.pth")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ds = builders.normalised(
        config.Config(**AUTHORS_NORM), data.load("cifar10", root=root, download=False)
    )
    print(f"torch {torch.__version__}, ResNet-20-b from {args.init.name}, DoReFa, "
          f"seeds 0-{args.seeds - 1}\n")  # fmt: skip
    print("| estimator | cosine per seed | min | mean |")
    print("|---|---|---:|---:|")
    for spec in args.estimators:
        cos = [first_cosine(spec, seed, ds, args.init) for seed in range(args.seeds)]
        cells = ", ".join(f"{c:+.2f}" for c in cos)
        print(f"| {spec} | {cells} | {min(cos):+.3f} | {statistics.mean(cos):+.3f} |", flush=True)


if __name__ == "__main__":
    main()
