"""The ``signgrad`` command line: train, eval, compare, list, summary, export, predict.

A user's mistake (a :class:`SigngradError`) is one line on stderr and exit status 2;
Ctrl-C during training leaves the last complete epoch's checkpoint and exits 130.

Each command imports what it needs when it runs: ``predict`` (the packed runtime) works
where PyTorch is not installed, and the flags whose help lists the registered models or
quantizers are added only when their command is parsed or its help is shown.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signgrad import __version__
from signgrad.errors import SigngradError

if TYPE_CHECKING:
    from signgrad import export


class _LazyParser(argparse.ArgumentParser):
    """A command's parser whose arguments ``populate`` adds on first use (parsing, usage or
    help), so that building the whole command line imports nothing heavy."""

    def __init__(self, *args: Any, populate: Callable[[Any], None] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self._populate = populate

    def _fill(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, *args: Any, **kw: Any) -> Any:
        self._fill()
        return super().parse_known_args(*args, **kw)

    def format_usage(self) -> str:
        self._fill()
        return super().format_usage()

    def format_help(self) -> str:
        self._fill()
        return super().format_help()


def _add_train(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "train",
        help="train a (binary) network",
        description="Train a network; every flag left out keeps its default "
        "(or, with --resume, the value saved in the run).",
        argument_default=argparse.SUPPRESS,
        populate=_train_flags,
    ).set_defaults(func=_train)


def _train_flags(p: argparse.ArgumentParser) -> None:
    from signgrad import models, quantizers

    p.add_argument("--model", help=f"architecture: {', '.join(models.names())}, or "
                   "hyper-MODEL for its Hyper-BinaryNet form (resnet20)")  # fmt: skip
    p.add_argument("--data", help="data set: cifar10, cifar100, fashion-mnist, mnist, "
                   "imagefolder:PATH (cifar10)")  # fmt: skip
    p.add_argument("--quantizer", help=f"weight quantizer: {', '.join(quantizers.names())} (bnn)")
    p.add_argument("--input-quantizer", help="activation quantizer for 1W1A (none)")
    p.add_argument("--scaling", help="binary weight scaling: none, tensor, channel (none)")
    p.add_argument("--keep", help="layers kept full precision: first_last, first, last, none "
                   "(first_last)")  # fmt: skip
    p.add_argument("--sharpness", help="schedule of the quantizer's sharpness, e.g. const:5, "
                   "linear:1:10, exp:0.1:10, decay:1:0.95")  # fmt: skip
    p.add_argument("--exact-sign-after", type=int, help="epoch (0-based) from which a soft "
                   "forward becomes the exact sign (default: the last 10%%)")  # fmt: skip
    p.add_argument("--activation", help="relu, hardtanh, prelu, identity "
                   "(relu; hardtanh with --input-quantizer)")  # fmt: skip
    p.add_argument("--input-sharpness", help="schedule of the input quantizer's sharpness")
    p.add_argument("--sharpness-per-step", action="store_true", help="move sharpness "
                   "schedules every step (epoch fractions), not once per epoch")  # fmt: skip
    p.add_argument("--hyper", action="store_true", help="Hyper-BinaryNet layers: generated "
                   "latent kernels (also: --model hyper-MODEL)")  # fmt: skip
    p.add_argument("--z-dim", type=int, help="hyper layers: embedding size per kernel (9)")
    p.add_argument("--generator", help="hyper layers: linear, mlp-elu, mlp-hardtanh (linear)")
    p.add_argument("--estimator", help="learned gradient estimator: fsg, fsg-paper, "
                   "metaquant-fc, metaquant-multifc, metaquant-lstm (none)")  # fmt: skip
    p.add_argument("--estimator-param", dest="estimator_params", action="append",
                   metavar="KEY=VALUE", help="estimator setting, e.g. beta=0.5 "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--optimizer", help="adam or sgd (adam)")
    p.add_argument("--lr", type=float, help="base learning rate (adam 1e-3, sgd 0.1)")
    p.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    p.add_argument("--betas", type=float, nargs=2, help="Adam's betas (0.9 0.999)")
    p.add_argument("--weight-decay", type=float, help="on conv/linear weights only (0)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (off)")
    p.add_argument("--bn-momentum", type=float, help="batch norm momentum (PyTorch's 0.1)")
    p.add_argument("--recipe", help="preset of optimizer settings, overridden by flags given: "
                   "hyper-binarynet")  # fmt: skip
    p.add_argument("--schedule", help="lr schedule: cosine, step, constant (cosine)")
    p.add_argument("--milestones", type=int, nargs="+", help="epochs of the step schedule")
    p.add_argument("--gamma", type=float, help="factor of the step schedule (0.1)")
    p.add_argument("--epochs", type=int, help="number of epochs (30)")
    p.add_argument("--batch-size", type=int, help="batch size (128)")
    p.add_argument("--seed", type=int, help="random seed (0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--init", help="start from this full-precision checkpoint or run directory")
    p.add_argument("--data-root", help="data root (default: $SIGNGRAD_DATA, else "
                   "~/.cache/signgrad/data)")  # fmt: skip
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="fail instead of downloading missing data")  # fmt: skip
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (auto)")
    p.add_argument("--out", help="run directory (default: runs/<model>-<data>-<quantizer>-...)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stop-after", type=int, help="stop after this many epochs in total, "
                   "keeping the schedules of --epochs; continue later with --resume")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train(args: argparse.Namespace) -> None:
    from signgrad import checkpoint, config, rundir, train

    fields = {f.name for f in dataclasses.fields(config.Config)}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    resume = getattr(args, "resume", False)
    stop_after = getattr(args, "stop_after", None)
    config.check_stop_after(stop_after)
    done = 0  # epochs finished before this command, to say honestly what it did
    if resume:
        if "out" not in flags:
            raise SigngradError("--resume needs --out RUN_DIR")
        out = flags.pop("out")
        cfg = rundir.resume_config(out, flags)
        done = checkpoint.load(out)["epoch"]
    else:
        cfg = config.Config(**config.with_recipe(flags))
    history = train.train(
        cfg,
        resume=resume,
        stop_after=stop_after,
        progress=not getattr(args, "no_progress", False),
    )
    if len(history) <= done and done < cfg.epochs:
        print(
            f"nothing trained: the run in {cfg.out} has done {done} of its {cfg.epochs} "
            f"epochs, and --stop-after {stop_after} is not above that; continue with a larger "
            "--stop-after or without it"
        )
    elif history and len(history) > done:
        last = history[-1]
        print(
            f"epoch {last['epoch']}/{cfg.epochs}: test accuracy {100 * last['test_acc']:.2f}% "
            f"(test loss {last['test_loss']:.4f}, train loss {last['train_loss']:.4f}) "
            f"in {sum(r['time_s'] for r in history):.0f}s; run in {cfg.out}"
        )
    else:
        print(f"nothing to do: the run in {cfg.out} has finished its {cfg.epochs} epochs")


def _eval(args: argparse.Namespace) -> None:
    from signgrad import builders, train
    from signgrad import data as data_mod

    _check_data_root(args.data_root)
    t = builders.load_trained(args.checkpoint, device=args.device, data_root=args.data_root)
    # The normalisation the model was trained with (the checkpoint's), on today's test set.
    loader = data_mod.Loader(
        t.data.test_images, t.data.test_labels, batch_size=500, mean=t.deploy["mean"],
        std=t.deploy["std"], train=False, augment=False,
        device=next(t.model.parameters()).device,
    )  # fmt: skip
    loss, acc = train.evaluate(
        t.model, loader, bf16=t.config.bf16, channels_last=t.config.channels_last
    )
    print(
        f"{args.checkpoint}: {t.config.model} on {t.config.data}, epoch "
        f"{t.checkpoint['epoch']}: test loss {loss:.4f}, test accuracy {100 * acc:.2f}% "
        f"({len(t.data.test_labels)} images)"
    )


def _compare(args: argparse.Namespace) -> None:
    from signgrad import report

    png = Path(args.png)
    # Writing the curves must not create folders the user did not ask for (a typo).
    if not png.parent.is_dir():
        raise SigngradError(
            f"--png {png}: the folder {png.parent} does not exist (create it first)"
        )
    if png.is_dir():
        raise SigngradError(f"--png {png} is a folder; give a file name such as curves.png")
    print(report.compare(args.runs, png), end="")
    print(f"\ncurves: {png}")


def _check_data_root(root: str | None) -> None:
    """A --data-root given to eval/summary/export must exist: reading a trained run's data
    must not download it into (and create) a mistyped folder."""
    if root is not None and not Path(root).expanduser().is_dir():
        raise SigngradError(f"--data-root {root} is not a folder")


def _source(args: argparse.Namespace, strict: bool) -> export.Source:
    """What summary/export work on: a checkpoint or run directory, or (summary) a model name
    built and binarized with the train flags given."""
    from signgrad import builders, config, data, export

    target = args.target
    _check_data_root(args.data_root)
    if Path(target).exists():
        return export.from_checkpoint(target, data_root=args.data_root)
    if strict:
        raise SigngradError(f"no checkpoint or run directory at {target}")
    names = ("quantizer", "input_quantizer", "scaling", "keep", "hyper", "data")
    flags = {"model": target, **{k: getattr(args, k) for k in names}}
    cfg = config.Config(**{k: v for k, v in flags.items() if v is not None}).resolved()
    builders.check_sizes(cfg)  # as before the split: resolved() checked the sizes too
    classes, (c, h, w) = data.describe(cfg.data)
    model = builders.build_architecture(cfg, classes, c, h)
    names = [str(i) for i in range(classes)]
    return export.Source(model.eval(), (c, h, w), names, [0.0] * c, [1.0] * c,
                         {"model": target})  # fmt: skip


def _summary(args: argparse.Namespace) -> None:
    from signgrad import summary

    print(summary.summarize(_source(args, strict=False)).table(), end="")


def _export(args: argparse.Namespace) -> None:
    import math

    import numpy as np
    import torch

    from signgrad import export, graph

    src = _source(args, strict=True)
    export.check_finite(src.model)  # before anything is built or written
    run_dir = Path(args.target) if Path(args.target).is_dir() else Path(args.target).parent
    g = graph.build(src.model, src.input_shape)
    # Every export is checked against PyTorch before it is written.
    x = torch.randn((64, *src.input_shape), generator=torch.Generator().manual_seed(0))
    if args.format == "packed":
        from signgrad.runtime import format as fmt
        from signgrad.runtime import model as runtime

        out = Path(args.out or run_dir / "model-packed.safetensors")
        blob = export.packed(src, g)
        pm = runtime.build(*fmt.read_bytes(blob, str(out)))
        with torch.no_grad():
            ref = src.model(x).numpy()
        got = pm.run(x.numpy())
        diff = float(np.abs(got - ref).max())
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        checker = f"the runtime ({pm.backend})"
    else:
        from signgrad import onnx_export

        out = Path(args.out or run_dir / "model.onnx")
        meta = {"classes": ",".join(src.classes), "mean": str(src.mean), "std": str(src.std)}
        proto = onnx_export.to_onnx(g, metadata=meta)
        diff, agree = onnx_export.check_onnx(proto, src.model, x)
        blob = proto.SerializeToString()
        checker = "onnxruntime"
    if not math.isfinite(diff):
        # Finite weights can still overflow; NaN logits would "agree" on every argmax.
        raise SigngradError(
            f"the network's outputs on the check inputs are not finite (largest logit "
            f"difference {diff}); nothing written"
        )
    if agree < 1.0:
        wrong = f"{100 * (1 - agree):.0f}%"
        raise SigngradError(
            f"the exported model disagrees with PyTorch on {wrong} of the check inputs; "
            "nothing written"
        )
    export.write(out, blob)
    full = export.float_size(src.model)
    ratio = f", {full / len(blob):.1f}x smaller" if args.format == "packed" else ""
    print(f"wrote {out}: {len(blob):,} bytes (float state_dict {full:,} bytes{ratio})")
    print(f"checked with {checker} against PyTorch on 64 random inputs: every class agrees, "
          f"largest logit difference {diff:.2e}")  # fmt: skip


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm",
                  ".ppm", ".pnm"}  # fmt: skip


def _predict(args: argparse.Namespace) -> None:
    import numpy as np

    from signgrad import images
    from signgrad.runtime import model as runtime

    if args.top < 1:
        raise SigngradError(f"--top must be at least 1, got {args.top}")
    pm = runtime.load(args.model, backend=args.backend, threads=args.threads)
    target = Path(args.images)
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and p.is_file() and not p.name.startswith("."))  # fmt: skip
        if not files:
            raise SigngradError(f"no image files in {target}")
    elif target.is_file():
        files = [target]
    else:
        raise SigngradError(f"no image or folder at {target}")
    c, h, w = pm.input_shape
    # The image-folder loader's decoder: 16-bit and float pixels are scaled alike.
    arrays = [images.read(p, c, (w, h)) for p in files]
    probs = pm.predict(np.stack(arrays))
    names = pm.classes
    for p, row in zip(files, probs, strict=True):
        top = np.argsort(-row, kind="stable")[: args.top]
        print(f"{p}: " + ", ".join(f"{names[k]} {100 * row[k]:.1f}%" for k in top))


def _list(args: argparse.Namespace) -> None:
    from signgrad import data, estimators, models, quantizers

    print("quantizers:", ", ".join(quantizers.names()))
    print("estimators:", ", ".join(estimators.names()))
    print("models:    ", ", ".join(models.names()), "(each also as hyper-MODEL)")
    print("data:      ", ", ".join(data.names()))


def _export_flags(x: argparse.ArgumentParser) -> None:
    from signgrad import export

    x.add_argument("target", metavar="CKPT", help="checkpoint or run directory")
    x.add_argument("--format", choices=export.FORMATS, default="packed")
    x.add_argument("--out", help="file to write (default: in the run directory)")
    x.add_argument("--data-root", default=None, help="data set root, only for a checkpoint "
                   "written before signgrad recorded its classes and normalisation")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signgrad", description="Train and compare binary neural networks."
    )
    parser.add_argument("--version", action="version", version=f"signgrad {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)
    _add_train(sub)
    e = sub.add_parser("eval", help="test loss and accuracy of a run or checkpoint")
    e.add_argument("checkpoint", help="run directory or checkpoint file")
    e.add_argument("--device", default="auto")
    e.add_argument("--data-root", default=None)
    e.set_defaults(func=_eval)
    c = sub.add_parser("compare", help="markdown table and curves of several runs")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--png", default="comparison.png", help="where to write the curves")
    c.set_defaults(func=_compare)
    sub.add_parser(
        "list", help="the available quantizers, estimators, models and data sets"
    ).set_defaults(func=_list)
    s = sub.add_parser("summary", help="per-layer bits, parameters, memory and MACs; the "
                       "exported size against float 32")  # fmt: skip
    s.add_argument("target", metavar="CKPT|MODEL", help="checkpoint, run directory, or a "
                   "model name (built with the flags below)")  # fmt: skip
    for flag, text in (
        ("--quantizer", "weight quantizer (bnn)"),
        ("--input-quantizer", "activation quantizer (none)"),
        ("--scaling", "none, tensor, channel (none)"),
        ("--keep", "first_last, first, last, none (first_last)"),
        ("--data", "built-in data set giving the input shape (cifar10)"),
    ):
        s.add_argument(flag, help=f"with a model name: {text}")  # fmt: skip
    s.add_argument("--hyper", action="store_true", default=None, help="with a model name: "
                   "Hyper-BinaryNet layers")  # fmt: skip
    s.add_argument("--data-root", default=None)
    s.set_defaults(func=_summary)
    sub.add_parser(
        "export",
        help="write a trained model as a packed 1-bit file or ONNX",
        populate=_export_flags,
    ).set_defaults(func=_export)
    r = sub.add_parser("predict", help="class and probability of images, with the packed "
                       "runtime")  # fmt: skip
    r.add_argument("model", help="packed model file (signgrad export)")
    r.add_argument("images", metavar="IMAGE|FOLDER", help="an image file or a folder of them")
    r.add_argument("--top", type=int, default=1, help="how many classes to show (1)")
    r.add_argument("--backend", default="auto", help="auto, compiled, numpy (auto)")
    r.add_argument("--threads", type=int, default=None, help="kernel threads (all CPUs)")
    r.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s" if not args.quiet else "%(levelname)s: %(message)s",
    )
    try:
        args.func(args)
    except SigngradError as e:
        print(f"signgrad: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("signgrad: interrupted; the last finished epoch is kept, continue with --resume",
              file=sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
