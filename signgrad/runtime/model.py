"""A packed model, loaded and ready to run: numpy and the compiled kernels, no PyTorch.

With the compiled kernels (the default where they were built) the whole graph runs in
one call into C (:mod:`signgrad.runtime.network`): 1W1A convolution and linear layers as
XNOR + popcount on bit-packed activations and weights, with their epilogue (scale and
shift, i.e. weight scaling and folded batch norm, a following residual ``add`` and
activation) fused and the signs of their output packed when the next binary layer
needs them; the float layers, poolings, shortcuts and the layout change in C as well.
The numpy backend runs each node as a numpy step over NHWC float32 arrays: binary
layers as float matrix products of signs, which gives the same integers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from signgrad.errors import SigngradError
from signgrad.runtime import format as fmt
from signgrad.runtime import kernels as K
from signgrad.runtime import validate
from signgrad.runtime.network import Network, pair, window

#: threads for the compiled kernels: at most this many, and at most THREADS_PER_CPU per CPU
#: of the machine (more only oversubscribes the cores; far more, and the system refuses
#: to start them). The C glue refuses more than 1024 itself.
MAX_THREADS = 1024
THREADS_PER_CPU = 8
#: predict() splits its images into batches whose activations fit in this many bytes
PREDICT_BATCH_BYTES = 2 << 30

log = logging.getLogger(__name__)

BACKENDS = ("auto", "compiled", "numpy")
_ACTS = ("relu", "hardtanh", "prelu")


@dataclass
class _Step:
    """One executable step: ``fn(values)`` computes ``output`` from earlier values."""

    name: str
    output: str
    fn: Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class PackedModel:
    """A packed network: call :meth:`run` on normalised N x C x H x W float32 inputs, or
    :meth:`predict` on uint8 images.

    It reuses its activation buffers from call to call, so one object serves one caller
    at a time: load one per thread to run several at once."""

    graph: dict[str, Any]
    backend: str
    threads: int
    #: the numpy backend's steps
    steps: list[_Step] = field(default_factory=list)
    #: the compiled backend's plan
    network: Network | None = None
    #: activation bytes one image needs (see :mod:`signgrad.runtime.validate`)
    image_bytes: int = 0

    @property
    def classes(self) -> list[str]:
        return list(self.graph["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.graph["input"]["shape"]
        return int(c), int(h), int(w)

    @property
    def crop(self) -> float | None:
        """The centre crop (share of an image's shorter side) the model was evaluated on
        before resizing to :attr:`input_shape`, or None: the whole image, resized."""
        crop = self.graph["preprocess"].get("crop")
        return None if crop is None else float(crop)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x C x H x W -> normalised float32, as the training loader does it."""
        pre = self.graph["preprocess"]
        mean = np.asarray(pre["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(pre["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        return (images.astype(np.float32) / np.float32(255.0) - mean) / std

    def _takes(self) -> str:
        return f"N x {' x '.join(map(str, self.input_shape))}"

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits (N x classes) of normalised inputs x (N x C x H x W real numbers, run as
        float32); an empty batch gives an empty 0 x classes result."""
        if not isinstance(x, np.ndarray):
            raise SigngradError(
                f"run() takes a numpy array ({self._takes()} float32), got a {type(x).__name__}"
            )
        if x.dtype.kind not in "iuf":
            raise SigngradError(
                f"run() takes real numbers ({self._takes()} float32), got dtype {x.dtype}"
            )
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise SigngradError(
                f"input of shape {tuple(x.shape)}; this model takes {self._takes()}"
            )
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        with np.errstate(over="ignore"):  # float64 beyond float32: inf, refused just below
            x = np.asarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise SigngradError(
                "the input holds NaN or infinite values (or values beyond "
                "float32); run() needs finite normalised inputs"
            )
        if self.network is not None:
            return self.network.run(np.ascontiguousarray(x))
        values: dict[str, Any] = {self.graph["input"]["name"]: np.transpose(x, (0, 2, 3, 1))}
        for step in self.steps:
            values[step.output] = step.fn(values)
        out = values[self.graph["output"]]
        # A copy: the steps may return a view of their input.
        return np.array(out.reshape(out.shape[0], -1) if out.ndim == 4 else out)

    def predict(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (softmax) of uint8 images N x C x H x W (pixels 0..255)."""
        if type(batch_size) is not int or batch_size < 1:
            raise SigngradError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise SigngradError(
                f"predict() takes uint8 images {self._takes()} with pixels 0..255, got {got}; "
                "convert them (for floats in [0, 1]: (x * 255).round().astype(np.uint8)), or "
                "call run() on inputs normalised with the model's mean and std"
            )
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise SigngradError(
                f"images of shape {tuple(images.shape)}; this model takes {self._takes()}"
            )
        # Batches whose activations fit in memory, however large one image's are.
        step = max(1, min(batch_size, PREDICT_BATCH_BYTES // max(self.image_bytes, 1)))
        probs = []
        for i in range(0, len(images), step):
            z = self.run(self.preprocess(images[i : i + step]))
            z = np.exp(z - z.max(axis=1, keepdims=True))
            probs.append(z / z.sum(axis=1, keepdims=True))
        return np.concatenate(probs) if probs else np.zeros((0, len(self.classes)), np.float32)


def max_threads() -> int:
    """The most kernel threads :func:`load` accepts on this machine."""
    return min(MAX_THREADS, THREADS_PER_CPU * (os.cpu_count() or 1))


def _check_threads(threads: Any) -> None:
    if threads is None:
        return
    top = max_threads()
    if type(threads) is not int or not 1 <= threads <= top:
        raise SigngradError(
            f"threads must be an integer from 1 to {top} ({THREADS_PER_CPU} per CPU of this "
            f"machine, at most {MAX_THREADS}), got {threads!r}"
        )


def load(
    path: str | os.PathLike, *, backend: str = "auto", threads: int | None = None
) -> PackedModel:
    """Load a packed model file (``signgrad export --format packed``).

    ``backend``: ``"compiled"`` (the bit-packed C kernels; an error where they are not
    built), ``"numpy"`` (the slower fallback), or ``"auto"`` (compiled when available,
    else numpy with a warning saying why). ``threads``: for the compiled kernels
    (default: the CPUs this process may use; at most :func:`max_threads`).

    The file is checked as a whole before it is accepted (see
    :mod:`signgrad.runtime.validate`): a file edited and signed again is refused with a
    :class:`SigngradError` naming what is inconsistent, never run into a crash.
    """
    _check_threads(threads)  # before reading what may be a large file
    graph, tensors = fmt.read(path)
    return build(graph, tensors, backend=backend, threads=threads)


def build(
    graph: dict[str, Any],
    tensors: dict[str, np.ndarray],
    *,
    backend: str = "auto",
    threads: int | None = None,
) -> PackedModel:
    """A :class:`PackedModel` from a graph and its tensors (as :func:`load` reads them),
    after checking them as a whole (:func:`signgrad.runtime.validate.check`)."""
    if backend not in BACKENDS:
        raise SigngradError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "compiled" and K.COMPILED is None:
        raise SigngradError(f"the compiled kernels are not available: {K.UNAVAILABLE}")
    if backend == "auto":
        if K.COMPILED is None:
            log.warning(
                "signgrad runtime: compiled kernels unavailable (%s); running the numpy "
                "fallback, which is much slower",
                K.UNAVAILABLE,
            )
        backend = "numpy" if K.COMPILED is None else "compiled"
    _check_threads(threads)
    threads = threads or min(len(os.sched_getaffinity(0)), max_threads())
    return _planned(graph, tensors, backend, threads)


def plan(
    graph: dict[str, Any], tensors: dict[str, np.ndarray], threads: int = 1, align: bool = True
) -> Network:
    """The compiled backend's plan of a graph, after checking it as a whole: what the C
    export writes out (it needs no compiled kernels here). ``align``: see
    :class:`~signgrad.runtime.network.Network`."""
    network = _planned(graph, tensors, "compiled", threads, align).network
    assert network is not None
    return network


def _planned(
    graph: dict[str, Any],
    tensors: dict[str, np.ndarray],
    backend: str,
    threads: int,
    align: bool = True,
) -> PackedModel:
    """The graph checked as a whole, then planned for ``backend``: the compiled one's
    network, or the numpy one's steps."""
    checked = validate.check(graph, tensors)
    model = PackedModel(graph, backend, threads, image_bytes=checked.image_bytes)
    try:
        planner = _Planner(model, tensors)
        if backend == "compiled":
            model.network = Network(
                graph, checked.shapes, planner.weight, planner.tensor, threads, align
            )
        else:
            planner.plan()
    except (KeyError, TypeError, ValueError, IndexError) as e:
        # The check above admits only consistent graphs; this is its safety net.
        raise SigngradError(f"packed model: malformed graph ({type(e).__name__}: {e})") from None
    return model


class _Planner:
    """Turns graph nodes into the numpy backend's steps; gives the tensors to both."""

    def __init__(self, model: PackedModel, tensors: dict[str, np.ndarray]) -> None:
        self.m = model
        self.graph = model.graph
        self.tensors = tensors
        # validate.check has already checked the whole graph (ops, order, shapes, tensors).
        self.nodes: list[dict[str, Any]] = self.graph["nodes"]

    # -- tensors (their names, dtypes and shapes checked by validate.check) -------------
    def tensor(self, name: str | None, dtype: type = np.float32) -> np.ndarray | None:
        if name is None:
            return None
        t = self.tensors.get(name)
        if t is None or t.dtype != dtype:
            raise SigngradError(f"packed model: tensor {name!r} is missing or not {dtype.__name__}")
        return t

    def weight(self, n: dict[str, Any]) -> np.ndarray:
        """The layer's weights as float32 (binary ones as +-1)."""
        if n["binary_weight"]:
            shape = self.graph["binary_tensors"][n["weight"]]
            return fmt.unpack_signs(self.tensor(n["weight"], np.uint8), shape)
        return self.tensor(n["weight"])

    # -- planning ---------------------------------------------------------------------
    def plan(self) -> None:
        for n in self.nodes:
            step = self.weight_layer(n) if n["op"] in ("conv2d", "linear") else self.simple(n)
            self.m.steps.append(_Step(n["name"], n["output"], step))

    def weight_layer(self, n: dict[str, Any]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        linear = n["op"] == "linear"
        w, kernel, stride, padding = window(n, self.weight(n))
        scale, shift = self.tensor(n["scale"]), self.tensor(n["shift"])
        x_name = n["inputs"][0]
        wmat = K.conv_matrix(w)
        sign_input = n["binary_input"]

        def run(values: dict[str, np.ndarray]) -> np.ndarray:
            x = values[x_name]
            x = x.reshape(x.shape[0], 1, 1, -1) if linear else x
            if sign_input:
                x = K.sign(x)
            y = K.im2col(x, kernel, stride, padding) @ wmat
            if scale is not None:
                y *= scale
            if shift is not None:
                y += shift
            return y.reshape(y.shape[0], -1) if linear else y

        return run

    def simple(self, n: dict[str, Any]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        op, ins = n["op"], n["inputs"]
        x_name = ins[0]
        if op == "affine":
            s, t = self.tensor(n["scale"]), self.tensor(n["shift"])
            return lambda v: v[x_name] * s + t
        if op == "relu":
            return lambda v: np.maximum(v[x_name], np.float32(0))
        if op == "hardtanh":
            lo, hi = np.float32(n["min"]), np.float32(n["max"])
            return lambda v: np.clip(v[x_name], lo, hi)
        if op == "prelu":
            a = self.tensor(n["weight"])
            return lambda v: np.where(v[x_name] >= 0, v[x_name], v[x_name] * a)
        if op == "add":
            return lambda v: v[ins[0]] + v[ins[1]]
        if op == "shortcut_a":
            st, before, after = int(n["stride"]), int(n["pad_before"]), int(n["pad_after"])
            return lambda v: np.pad(
                v[x_name][:, ::st, ::st], ((0, 0), (0, 0), (0, 0), (before, after))
            )
        if op in ("maxpool2d", "avgpool2d"):
            k, s, p = pair(n["kernel"]), pair(n["stride"]), pair(n["padding"])
            kind = "max" if op == "maxpool2d" else "avg"
            return lambda v: K.pool(v[x_name], k, s, p, kind)
        if op == "global_avgpool":
            return lambda v: v[x_name].mean(axis=(1, 2), keepdims=True, dtype=np.float32)
        if op == "flatten":

            def flatten(v: dict[str, np.ndarray]) -> np.ndarray:
                x = v[x_name]
                # NHWC here; the flattened order is PyTorch's, channel-major.
                x = np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x
                return np.ascontiguousarray(x).reshape(x.shape[0], -1)

            return flatten
        raise AssertionError(op)  # validate.check admits only known ops
