"""Export a trained network: the packed 1-bit file for :mod:`signgrad.runtime`, or ONNX.

Both start from :func:`signgrad.graph.build`, so both refuse the same things (a soft
quantizer before its exact-sign epochs, a layer the runtime has no operation for) with
the same one-line errors.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from signgrad import checkpoint, graph
from signgrad.errors import SigngradError
from signgrad.runtime import format as fmt

FORMATS = ("packed", "onnx")


@dataclass
class Source:
    """A model to export with what a deployed model must know besides its weights."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    classes: list[str]
    mean: list[float]
    std: list[float]
    description: dict[str, Any]


def from_checkpoint(path: str | os.PathLike, data_root: str | None = None) -> Source:
    """The model of a checkpoint or run directory, in its final state, on the CPU.

    Its classes, input shape and normalisation come from the checkpoint: no data set is
    read, except for a checkpoint written before signgrad recorded them (then from
    ``data_root``, else its configuration's)."""
    from signgrad import builders

    t = builders.load_trained(path, device="cpu", data_root=data_root, with_data=False)
    d = t.deploy
    cfg = t.config
    desc = {
        "checkpoint": str(path), "epoch": int(t.checkpoint["epoch"]), "model": cfg.model,
        "data": cfg.data, "quantizer": cfg.quantizer, "input_quantizer": cfg.input_quantizer,
        "keep": cfg.keep, "scaling": cfg.scaling,
    }  # fmt: skip
    shape = (d["in_channels"], d["height"], d["width"])
    return Source(t.model.eval(), shape, list(d["classes"]), list(d["mean"]), list(d["std"]),
                  desc)  # fmt: skip


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
        "preprocess": {"mean": src.mean, "std": src.std},
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
