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
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from signgrad import __version__
from signgrad.errors import SigngradError

if TYPE_CHECKING:
    from signgrad import export


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are one line, like signgrad's own (the usage of ``train``
    alone is a screenful)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"signgrad: error: {message} (see '{self.prog} --help')\n")


class _LazyParser(_Parser):
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


def _name_flag(p: argparse.ArgumentParser, flag: str, what: str, names: str, **kw: Any) -> None:
    """A flag whose value is a registered name: its help lists the registry's names, and
    its value is turned into the registered spelling (or refused) as it is read."""
    from signgrad import config, registry

    field = flag.lstrip("-").replace("-", "_")
    canonical = config.name_fields()[field]
    p.add_argument(flag, type=registry.cli_type(canonical, field), metavar="NAME",
                   help=f"{what}: {names}", **kw)  # fmt: skip


def _model_flags(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The flags that define a binary network (train, and summary of a model name)."""
    from signgrad import convert, data, layers, quantizers

    _name_flag(p, "--quantizer", f"{prefix}weight quantizer", quantizers.QUANTIZERS.help("bnn"))
    _name_flag(p, "--input-quantizer", f"{prefix}activation quantizer for 1W1A",
               quantizers.QUANTIZERS.help("none"))  # fmt: skip
    _name_flag(p, "--scaling", f"{prefix}binary weight scaling", layers.SCALINGS.help("none"))
    _name_flag(p, "--keep", f"{prefix}layers kept full precision",
               convert.KEEP_POLICIES.help("first_last"))  # fmt: skip
    folders = ["imagefolder:PATH"]  # any folder of images, beside the built-in sets
    _name_flag(p, "--data", f"{prefix}data set", data.DATASETS.help("cifar10", also=folders))


def _train_flags(p: argparse.ArgumentParser) -> None:
    from signgrad import config, estimators, hyper, models, optim, schedules

    hyper_form = f"{config.HYPER_PREFIX}MODEL for its Hyper-BinaryNet form"
    _name_flag(p, "--model", "architecture",
               models.MODELS.help("resnet20", also=[hyper_form]))  # fmt: skip
    _model_flags(p)
    p.add_argument("--sharpness", help="schedule of the quantizer's sharpness: "
                   f"{schedules.forms()}, e.g. linear:1:10")  # fmt: skip
    p.add_argument("--exact-sign-after", type=int, help="epoch (0-based) from which a soft "
                   "forward becomes the exact sign (default: the last 10%%)")  # fmt: skip
    _name_flag(p, "--activation", "nonlinearity",
               models.ACTIVATIONS.help("relu; hardtanh with --input-quantizer"))  # fmt: skip
    p.add_argument("--input-sharpness", help="schedule of the input quantizer's sharpness")
    p.add_argument("--sharpness-per-step", action="store_true", help="move sharpness "
                   "schedules every step (epoch fractions), not once per epoch")  # fmt: skip
    p.add_argument("--hyper", action="store_true", help="Hyper-BinaryNet layers: generated "
                   "latent kernels (also: --model hyper-MODEL)")  # fmt: skip
    p.add_argument("--z-dim", type=int, help="hyper layers: embedding size per kernel (9)")
    _name_flag(p, "--generator", "hyper layers' kernel generator",
               hyper.GENERATORS.help("linear"))  # fmt: skip
    _name_flag(p, "--estimator", "learned gradient estimator",
               estimators.ESTIMATORS.help("none"))  # fmt: skip
    p.add_argument("--estimator-param", dest="estimator_params", action="append",
                   metavar="KEY=VALUE", help="estimator setting, e.g. beta=0.5 "
                   "(repeatable)")  # fmt: skip
    _name_flag(p, "--optimizer", "optimizer", optim.OPTIMIZERS.help("adam"))
    default_lr = ", ".join(f"{k} {v:g}" for k, v in config.DEFAULT_LR.items())
    p.add_argument("--lr", type=float, help=f"base learning rate ({default_lr})")
    p.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    p.add_argument("--betas", type=float, nargs=2, help="Adam's betas (0.9 0.999)")
    p.add_argument("--weight-decay", type=float, help="on conv/linear weights only (0)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (off)")
    p.add_argument("--bn-momentum", type=float, help="batch norm momentum (PyTorch's 0.1)")
    _name_flag(p, "--recipe", "preset of optimizer settings, overridden by flags given",
               config.RECIPES.help())  # fmt: skip
    _name_flag(p, "--schedule", "lr schedule", optim.LR_SCHEDULES.help("cosine"))
    p.add_argument("--milestones", type=int, nargs="+", help="epochs of the step schedule")
    p.add_argument("--gamma", type=float, help="factor of the step schedule (0.1)")
    p.add_argument("--epochs", type=int, help="number of epochs (30)")
    p.add_argument("--batch-size", type=int, help="batch size (128); under torchrun the "
                   "global batch, split over the ranks")  # fmt: skip
    p.add_argument("--accumulate", type=int, help="optimizer step every N batches, on the sum "
                   "of their gradients (1)")  # fmt: skip
    p.add_argument("--seed", type=int, help="random seed (0)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--fp16", action="store_true", help="fp16 autocast with dynamic loss "
                   "scaling (for GPUs without fast bf16)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model "
                   "(may change on --resume)")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: batch norm "
                   "statistics of the global batch, not of each rank's part")  # fmt: skip
    p.add_argument("--diagnostics", action="store_true", help="record per step and layer how "
                   "the applied gradient compares with STE's (RUN/diagnostics.jsonl)")  # fmt: skip
    p.add_argument("--init", help="start from this full-precision checkpoint or run "
                   "directory, or a plain PyTorch state_dict of the same architecture")  # fmt: skip
    p.add_argument("--teacher", help="distil from this full-precision run directory or "
                   "checkpoint (same classes and input shape)")  # fmt: skip
    p.add_argument("--distill-weight", type=float, help="with --teacher: the KL "
                   "term's share of the loss, the rest cross-entropy (1: KL alone)")  # fmt: skip
    p.add_argument("--distill-temperature", type=float, help="with --teacher: softmax "
                   "temperature of both sides (1)")  # fmt: skip
    p.add_argument("--mean", type=float, nargs="+", help="input normalisation per channel, "
                   "e.g. that of an --init model (default: the data set's)")  # fmt: skip
    p.add_argument("--std", type=float, nargs="+", help="with --mean: its standard deviations")
    p.add_argument("--data-root", help="data root (default: $SIGNGRAD_DATA, else "
                   "~/.cache/signgrad/data)")  # fmt: skip
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="fail instead of downloading missing data")  # fmt: skip
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, help="the data "
                   "set's standard augmentation (default: on, off for digits)")  # fmt: skip
    p.add_argument("--data-mode", choices=("auto", "memory", "stream"), help="image folders: "
                   "hold decoded images in memory or stream them from disk (auto)")  # fmt: skip
    p.add_argument("--image-size", type=int, help="image folders: train on S x S inputs "
                   "(default: the first image's shorter side, at most 224)")  # fmt: skip
    p.add_argument("--workers", type=int, help="image folders: decoding processes when "
                   "streaming (default: the cores available, at most 8)")  # fmt: skip
    p.add_argument("--skip-bad-images", action="store_true", help="image folders: leave "
                   "unreadable images out (logged and counted) instead of stopping")  # fmt: skip
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
    if not _is_main_rank():
        return  # under torchrun, rank 0 reports
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

    _check_data_root(args.data_root)
    t = builders.load_trained(args.checkpoint, device=args.device, data_root=args.data_root)
    # The normalisation the model was trained with (the checkpoint's), on today's test set.
    ds = dataclasses.replace(t.data, mean=tuple(t.deploy["mean"]), std=tuple(t.deploy["std"]))
    loader = train.test_loader(ds, next(t.model.parameters()).device)
    loss, acc = train.evaluate(
        t.model, loader, bf16=t.config.bf16, channels_last=t.config.channels_last,
        fp16=t.config.fp16,
    )  # fmt: skip
    print(
        f"{args.checkpoint}: {t.config.model} on {t.config.data}, epoch "
        f"{t.checkpoint['epoch']}: test loss {loss:.4f}, test accuracy {100 * acc:.2f}% "
        f"({loader.num_images} images)"
    )


def _png_path(text: str) -> Path:
    """Where to write a figure: writing it must not create folders the user did not ask
    for (a typo)."""
    png = Path(text)
    if not png.parent.is_dir():
        raise SigngradError(
            f"--png {png}: the folder {png.parent} does not exist (create it first)"
        )
    if png.is_dir():
        raise SigngradError(f"--png {png} is a folder; give a file name such as curves.png")
    return png


def _compare(args: argparse.Namespace) -> None:
    from signgrad import diagnostics, report

    png = _png_path(args.png)
    print(report.compare(args.runs, png), end="")
    print(f"\ncurves: {png}")
    if all((Path(run) / diagnostics.DIAGNOSTICS_NAME).is_file() for run in args.runs):
        # Runs trained with --diagnostics: their gradients side by side too.
        diag = png.with_name(f"{png.stem}-diagnostics{png.suffix}")
        print("\n" + report.diagnose(args.runs, diag), end="")
        print(f"\ndiagnostics: {diag}\n")
        print(report.step_losses(args.runs), end="")


def _diagnose(args: argparse.Namespace) -> None:
    from signgrad import report

    png = _png_path(args.png)
    print(report.diagnose(args.runs, png, early=args.early), end="")
    print(f"\nplots: {png}")


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
        return export.from_checkpoint(target, data_root=args.data_root, check_images=strict)
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
                         {"model": cfg.model})  # fmt: skip


def _summary(args: argparse.Namespace) -> None:
    from signgrad import summary

    print(summary.summarize(_source(args, strict=False)).table(), end="")


def _export(args: argparse.Namespace) -> None:
    from signgrad import export

    run_dir = Path(args.target) if Path(args.target).is_dir() else Path(args.target).parent
    options = {}
    if export.FORMATS.canonical(args.format) == "c":
        # The .c file's name gives the symbols' prefix and the header's name.
        from signgrad import c_export

        if args.out and Path(args.out).suffix != ".c":
            raise SigngradError(f"--out {args.out}: the C export writes a .c file (and its .h)")
        options["prefix"] = c_export.check_name(Path(args.out).stem if args.out else "model")
    src = _source(args, strict=True)
    built = export.checked(src, args.format, **options)  # refuses before anything is written
    out = Path(args.out or run_dir / built.filename)
    for name, data in built.companions.items():
        export.write(out.with_name(name), data)
    export.write(out, built.data)
    full = export.float_size(src.model)
    size = len(built.data)
    ratio = f", {full / size:.1f}x smaller" if args.format == "packed" else ""
    also = "".join(f" and {out.with_name(n)}" for n in built.companions)
    print(f"wrote {out}{also}: {size:,} bytes (float state_dict {full:,} bytes{ratio})")
    for note in built.notes:
        print(note)
    print(export.check_report(src, built))


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
    # The evaluation's centre crop where the model was trained on one (streamed folders).
    arrays = [images.read(p, c, (w, h), crop=pm.crop) for p in files]
    probs = pm.predict(np.stack(arrays))
    names = pm.classes
    for p, row in zip(files, probs, strict=True):
        top = np.argsort(-row, kind="stable")[: args.top]
        print(f"{p}: " + ", ".join(f"{names[k]} {100 * row[k]:.1f}%" for k in top))


def _registries() -> dict[str, Any]:
    """What ``signgrad list`` shows: every registry, by the word for its kind."""
    from signgrad import (
        config,
        convert,
        data,
        estimators,
        export,
        hyper,
        layers,
        models,
        optim,
        quantizers,
        schedules,
    )
    from signgrad.estimators import base

    return {
        "quantizers": quantizers.QUANTIZERS,
        "estimators": estimators.ESTIMATORS,
        "models": models.MODELS,
        "data": data.DATASETS,
        "activations": models.ACTIVATIONS,
        "generators": hyper.GENERATORS,
        "optimizers": optim.OPTIMIZERS,
        "lr-schedules": optim.LR_SCHEDULES,
        "sharpness-schedules": schedules.KINDS,
        "recipes": config.RECIPES,
        "scalings": layers.SCALINGS,
        "keep": convert.KEEP_POLICIES,
        "meta-activations": base.ACTIVATIONS,
        "export-formats": export.FORMATS,
    }


# Forms accepted beside a registry's names, shown in listings.
_ALSO = {"models": "each also as hyper-MODEL", "data": "and imagefolder:PATH"}


def _list(args: argparse.Namespace) -> None:
    regs = _registries()
    if args.kind is None:
        width = max(map(len, regs)) + 1
        for kind, reg in regs.items():
            also = f" ({_ALSO[kind]})" if kind in _ALSO else ""
            print(f"{kind + ':':<{width}} {', '.join(reg)}{also}")
        return
    if args.kind not in regs:
        raise SigngradError(f"unknown kind {args.kind!r}; valid: {', '.join(regs)}")
    rows = regs[args.kind].summaries()
    width = max(len(name) for name, _ in rows)
    for name, summary in rows:
        print(f"{name:<{width}}  {summary}".rstrip())
    if args.kind in _ALSO:
        print(f"({_ALSO[args.kind]})")


def _summary_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("target", metavar="CKPT|MODEL", help="checkpoint, run directory, or a "
                   "model name (built with the flags below)")  # fmt: skip
    _model_flags(s, prefix="with a model name: ")
    s.add_argument("--hyper", action="store_true", default=None, help="with a model name: "
                   "Hyper-BinaryNet layers")  # fmt: skip
    s.add_argument("--data-root", default=None)


def _predict_flags(r: argparse.ArgumentParser) -> None:
    from signgrad.runtime import model as runtime

    r.add_argument("model", help="packed model file (signgrad export)")
    r.add_argument("images", metavar="IMAGE|FOLDER", help="an image file or a folder of them")
    r.add_argument("--top", type=int, default=1, help="how many classes to show (1)")
    r.add_argument("--backend", choices=runtime.BACKENDS, default="auto",
                   help=f"kernels: {', '.join(runtime.BACKENDS)} (auto)")  # fmt: skip
    r.add_argument("--threads", type=int, default=None, help="kernel threads (all CPUs)")


def _export_flags(x: argparse.ArgumentParser) -> None:
    from signgrad import export

    x.add_argument("target", metavar="CKPT", help="checkpoint or run directory")
    formats = export.FORMATS.help("packed")
    x.add_argument("--format", type=export.FORMATS.cli_type(), default="packed",
                   metavar="NAME", help=f"file format: {formats}")  # fmt: skip
    x.add_argument("--out", help="file to write (default: in the run directory)")
    x.add_argument("--data-root", default=None, help="data set root, only for a checkpoint "
                   "written before signgrad recorded its classes and normalisation")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="signgrad", description="Train and compare binary neural networks.")
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
    d = sub.add_parser("diagnose", help="gradient-fidelity diagnostics of runs trained with "
                       "--diagnostics: table and plots")  # fmt: skip
    d.add_argument("runs", nargs="+", help="run directories")
    d.add_argument("--png", default="diagnostics.png", help="where to write the plots")
    d.add_argument("--early", type=int, default=10, help="steps in the 'first' columns (10)")
    d.set_defaults(func=_diagnose)
    li = sub.add_parser("list", help="the names signgrad knows: quantizers, estimators, "
                        "models, data sets, ...; with a KIND, each with its summary")  # fmt: skip
    li.add_argument("kind", nargs="?", metavar="KIND", help="one kind, e.g. quantizers")
    li.set_defaults(func=_list)
    sub.add_parser(
        "summary",
        help="per-layer bits, parameters, memory and MACs; the exported size against float 32",
        populate=_summary_flags,
    ).set_defaults(func=_summary)
    sub.add_parser(
        "export",
        help="write a trained model as a packed 1-bit file or ONNX",
        populate=_export_flags,
    ).set_defaults(func=_export)
    sub.add_parser(
        "predict",
        help="class and probability of images, with the packed runtime",
        populate=_predict_flags,
    ).set_defaults(func=_predict)
    return parser


def _is_main_rank() -> bool:
    """False in the processes of ranks 1, 2, ... under torchrun: they train, rank 0 talks."""
    return os.environ.get("RANK", "0") in ("0", "")


def _is_multi_rank() -> bool:
    """True in every process of a torchrun run of more than one rank (read from the
    environment, as distributed.from_environment does, without importing torch)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # the command's own parser says it, pointing at the command's help
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help, --version, or a mistake argparse has printed
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(
        level=logging.ERROR
        if not _is_main_rank()
        else logging.WARNING
        if args.quiet
        else logging.INFO,
        format="%(message)s" if not args.quiet else "%(levelname)s: %(message)s",
    )
    try:
        args.func(args)
    except SigngradError as e:
        # One write: under torchrun several ranks share the stream, and print's separate
        # newline could land after another rank's line.
        sys.stderr.write(f"signgrad: error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("signgrad: interrupted; the last finished epoch is kept, continue with --resume",
              file=sys.stderr)  # fmt: skip
        return 130
    return 0


def entry() -> NoReturn:
    """The process entry of ``signgrad`` and ``python -m signgrad``: run :func:`main` and
    exit with its status; a rank of a multi-process ``torchrun`` run exits through
    :func:`signgrad.distributed.exit_process` (why: there)."""
    code = main()
    if _is_multi_rank():
        from signgrad import distributed  # torch is there: torchrun is part of it

        distributed.exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
