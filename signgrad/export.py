"""Export a trained network: the packed 1-bit file for :mod:`signgrad.runtime`, ONNX, or
dependency-free C (:mod:`signgrad.c_export`).

:func:`checked` is the way in: it builds the export in any format of :data:`FORMATS` and
runs it against PyTorch before handing it back, so a Python caller gets the same check as
``signgrad export``. Every format starts from :func:`signgrad.graph.build`, so all refuse
the same things (a soft quantizer before its exact-sign epochs, a layer the runtime has
no operation for) with the same one-line errors.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signgrad import agreement, checkpoint, graph
from signgrad.errors import SigngradError
from signgrad.registry import Registry
from signgrad.runtime import format as fmt

#: How many random inputs :func:`checked` runs through the export and PyTorch when it has
#: no real images.
CHECK_INPUTS = 64
#: At most this many of the run's test images check an export (the first ones), and at
#: most CHECK_VALUES input values' worth of them (but CHECK_INPUTS at least): all 1,017 of
#: the CIFAR-10 subset, 64 ImageNet-sized ones.
CHECK_IMAGES = 2000
CHECK_VALUES = 2000 * 3 * 32 * 32
#: An export whose class differs from PyTorch's on more than this share of the check
#: inputs is refused (a few flips are float rounding next to a sign; more is a fault).
MAX_DIFFERING = 0.01


@dataclass
class Source:
    """A model to export with what a deployed model must know besides its weights."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    classes: list[str]
    mean: list[float]
    std: list[float]
    description: dict[str, Any]
    crop: float | None = None  # the evaluation's centre crop, if the model was trained so
    #: real images (uint8 N x C x H x W) to check the export on, and what they are; None:
    #: random inputs (see :func:`test_images`)
    images: np.ndarray | None = None
    images_from: str = ""


def from_checkpoint(
    path: str | os.PathLike, data_root: str | None = None, check_images: bool = False
) -> Source:
    """The model of a checkpoint or run directory, in its final state, on the CPU.

    Its classes, input shape and normalisation come from the checkpoint: no data set is
    needed, except for a checkpoint written before signgrad recorded them (then from
    ``data_root``, else its configuration's). With ``check_images``, the run's test
    images are read when they are at hand (:func:`test_images`), to check an export on."""
    from signgrad import builders

    t = builders.load_trained(path, device="cpu", data_root=data_root, with_data=False)
    d = t.deploy
    cfg = t.config
    desc = {
        "checkpoint": str(path),
        "epoch": int(t.checkpoint["epoch"]),
        "model": cfg.model,
        "data": cfg.data,
        "quantizer": cfg.quantizer,
        "input_quantizer": cfg.input_quantizer,
        "keep": cfg.keep,
        "scaling": cfg.scaling,
    }
    shape = (d["in_channels"], d["height"], d["width"])
    images, where = test_images(cfg, shape) if check_images else (None, "")
    return Source(
        t.model.eval(), shape, list(d["classes"]), list(d["mean"]), list(d["std"]), desc,
        d.get("crop"), images, where,
    )  # fmt: skip


def test_images(cfg: Any, shape: tuple[int, int, int]) -> tuple[np.ndarray | None, str]:
    """The first :data:`CHECK_IMAGES` test images of a run's data set (uint8 N x C x H x W)
    and what they are, when the data set is at hand in the input size (nothing is
    downloaded); else None and why not."""
    import dataclasses

    from signgrad import builders, data

    if cfg.data.startswith("imagefolder:") and cfg.data_mode == "stream":
        return None, "a streamed image folder"
    try:
        ds = builders.load_data(dataclasses.replace(cfg, download=False))
    except SigngradError as e:
        return None, f"its data set is not at hand: {str(e).split(';')[0]}"
    if not isinstance(ds, data.DataSet) or tuple(ds.test_images.shape[1:]) != shape:
        return None, "its test images are not in the model's input size"
    per_image = math.prod(shape)
    n = min(len(ds.test_images), CHECK_IMAGES, max(CHECK_INPUTS, CHECK_VALUES // per_image))
    return ds.test_images[:n].numpy(), f"{n:,} test images of {cfg.data}"


def check_finite(model: nn.Module) -> None:
    """Refuse a network with a NaN or infinite parameter or buffer, naming the first: its
    export would compute garbage that a check against PyTorch cannot catch (NaN logits
    agree with NaN logits on every argmax)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SigngradError(
                f"the network's {name} holds {bad:,} NaN or infinite value(s) of "
                f"{t.numel():,}; not exported (was its training diverging?)"
            )


def packed(src: Source, g: graph.Graph | None = None) -> bytes:
    """The packed file's bytes (layout: :mod:`signgrad.runtime.format`)."""
    g = g or graph.build(src.model, src.input_shape)
    tensors: dict[str, np.ndarray] = dict(g.tensors)
    binary: dict[str, list[int]] = {}
    for n in g.nodes:
        if n["op"] in ("conv2d", "linear") and n["binary_weight"]:
            w = tensors[n["weight"]]
            binary[n["weight"]] = list(w.shape)
            tensors[n["weight"]] = fmt.pack_signs(w)
    doc = {
        "input": {"name": g.input, "shape": g.input_shape},
        "output": g.output,
        "nodes": g.nodes,
        "binary_tensors": binary,
        "preprocess": {
            "mean": src.mean,
            "std": src.std,
            **({} if src.crop is None else {"crop": src.crop}),
        },
        "classes": src.classes,
        "source": src.description,
    }
    return fmt.to_bytes(doc, tensors)


def float_size(model: nn.Module) -> int:
    """Bytes of the model's float state_dict as ``torch.save`` writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically: a good file already there is never half-replaced."""
    checkpoint.atomic_write(Path(path), lambda f: f.write(data))


@dataclass(frozen=True)
class Built:
    """What a format's builder gives back: the file's bytes, its usual name in a run
    directory, what ran it in the check, and how it compared with PyTorch on the check
    inputs (largest |logit difference|, fraction of inputs whose class agrees)."""

    data: bytes
    filename: str
    checker: str
    max_diff: float
    agree: float
    #: more files written beside the main one (the C export's header), name -> bytes
    companions: dict[str, bytes] = field(default_factory=dict)
    #: what the format reports besides its size (the C export's flash and RAM)
    notes: list[str] = field(default_factory=list)


#: The export formats by name: builders of (source, graph, check inputs) -> :class:`Built`.
FORMATS: Registry[Callable[..., Built]] = Registry("export format", inputs=("src", "g", "x"))


def _run_packed(pm: Any, x: torch.Tensor) -> np.ndarray:
    """The packed runtime's logits of ``x``, a chunk at a time."""
    return agreement.in_chunks(lambda c: pm.run(c.numpy()), x)


@FORMATS.register("packed")
def _packed_format(src: Source, g: graph.Graph, x: torch.Tensor) -> Built:
    """The packed 1-bit file of signgrad's runtime (safetensors layout)."""
    from signgrad.runtime import model as runtime

    blob = packed(src, g)
    pm = runtime.build(*fmt.read_bytes(blob, "the packed export"))
    diff, agree = agreement.compare(_run_packed(pm, x), agreement.torch_logits(src.model, x))
    return Built(blob, "model-packed.safetensors", f"the runtime ({pm.backend})", diff, agree)


@FORMATS.register("onnx")
def _onnx_format(src: Source, g: graph.Graph, x: torch.Tensor) -> Built:
    """ONNX with standard operators, for onnxruntime and other ONNX engines."""
    from signgrad import onnx_export

    meta = {"classes": ",".join(src.classes), "mean": str(src.mean), "std": str(src.std)}
    if src.crop is not None:
        meta["crop"] = str(src.crop)
    proto = onnx_export.to_onnx(g, metadata=meta)
    diff, agree = onnx_export.check_onnx(proto, src.model, x)
    return Built(proto.SerializeToString(), "model.onnx", "onnxruntime", diff, agree)


@FORMATS.register("c")
def _c_format(src: Source, g: graph.Graph, x: torch.Tensor, prefix: str = "model") -> Built:
    """One C99 source and its header: the network with signgrad's kernels, const tables
    and static buffers, for firmware (``prefix`` prefixes its symbols and names its
    files: ``model.c``, ``model.h``, ``model_run``)."""
    from signgrad import c_export
    from signgrad.runtime import model as runtime

    doc, tensors = fmt.read_bytes(packed(src, g), "the packed export")
    cx = c_export.generate(doc, tensors, prefix)
    pm = runtime.build(doc, tensors)
    want = _run_packed(pm, x)
    cc = c_export.compiler()
    if cc is None:
        checker = "the packed runtime's plan (no C compiler here to build the export)"
        got = want
    else:
        got = c_export.compile_and_run(cx, x.numpy(), [cc, "-std=c99", "-O2"])
        same = np.array_equal(got.view(np.uint32), want.view(np.uint32))
        if pm.backend == "compiled" and not same:
            raise SigngradError(
                "the compiled C export's logits differ from the packed runtime's on the "
                "check inputs; nothing written"
            )
        checker = f"the C export built with {cc}" + (
            ", bit-identical to the packed runtime" if pm.backend == "compiled" else ""
        )
    diff, agree = agreement.compare(got, agreement.torch_logits(src.model, x))
    notes = [
        f"flash: {cx.flash:,} bytes of tables and weights, plus the code; RAM: "
        f"{cx.ram:,} bytes of static buffers; no heap"
    ]
    return Built(
        cx.source.encode(), f"{prefix}.c", checker, diff, agree,
        companions={f"{prefix}.h": cx.header.encode()}, notes=notes,
    )  # fmt: skip


def check_inputs(src: Source) -> torch.Tensor:
    """What :func:`checked` runs: ``src.images`` normalised as in training, else
    :data:`CHECK_INPUTS` seeded random inputs."""
    if src.images is not None:
        mean = torch.tensor(src.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(src.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (torch.from_numpy(src.images).float() / 255.0 - mean) / std
    gen = torch.Generator().manual_seed(0)
    return torch.randn((CHECK_INPUTS, *src.input_shape), generator=gen)


def checked(src: Source, format: str = "packed", **options: Any) -> Built:
    """The export of ``src`` in ``format`` (see :data:`FORMATS`; ``options`` go to its
    builder, e.g. ``prefix`` for C), run against PyTorch first on :func:`check_inputs`
    (the run's test images when they are at hand): a network with non-finite weights or
    outputs, or whose export changes the class of more than :data:`MAX_DIFFERING` of the
    check inputs, is a SigngradError and nothing is returned. ``Built.agree`` says how
    many classes agree."""
    name = FORMATS.canonical(format)
    check_finite(src.model)  # before anything is built
    g = graph.build(src.model, src.input_shape)
    x = check_inputs(src)
    built = FORMATS.build(name, src, g, x, **options)
    if not math.isfinite(built.max_diff):
        # Finite weights can still overflow; NaN logits would "agree" on every argmax.
        raise SigngradError(
            f"the network's outputs on the check inputs are not finite (largest logit "
            f"difference {built.max_diff}); nothing written"
        )
    if 1.0 - built.agree > MAX_DIFFERING:
        wrong = round((1.0 - built.agree) * len(x))
        raise SigngradError(
            f"the exported model's class differs from PyTorch's on {wrong} of {len(x)} check "
            f"inputs ({src.images_from or 'random inputs'}), more than "
            f"{100 * MAX_DIFFERING:g}%; nothing written"
        )
    return built


def check_report(src: Source, built: Built) -> str:
    """What the check of :func:`checked` found, in one line."""
    n = len(src.images) if src.images is not None else CHECK_INPUTS
    on = src.images_from if src.images is not None else f"{n} random inputs"
    differ = round((1.0 - built.agree) * n)
    classes = "every class agrees" if differ == 0 else f"the class differs on {differ:,}"
    why = "" if src.images is not None or not src.images_from else f" ({src.images_from})"
    return (
        f"checked with {built.checker} against PyTorch on {on}{why}: {classes}, largest "
        f"logit difference {built.max_diff:.2e}"
    )
