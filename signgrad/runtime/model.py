"""A packed model, loaded and ready to run: numpy and the compiled kernels, no PyTorch.

At load time each node of the graph becomes a step over NHWC float32 arrays. 1W1A
convolution and linear layers run as XNOR + popcount on bit-packed activations and
weights; their epilogue (scale and shift, i.e. weight scaling and folded batch norm, a
following residual ``add`` and activation) is fused into the kernel, which also packs
the signs of its output when the next binary layer needs them. 1W32A layers run as
float convolutions with the sign-folded weights (+-1 times the scale). Everything else
is numpy.
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

#: threads for the compiled kernels: at most this many, and at most THREADS_PER_CPU per CPU
#: of the machine (more only oversubscribes the cores; far more exhausts the OpenMP
#: runtime). The C glue refuses more than 1024 itself.
MAX_THREADS = 1024
THREADS_PER_CPU = 8
#: predict() splits its images into batches whose activations fit in this many bytes
PREDICT_BATCH_BYTES = 2 << 30

log = logging.getLogger(__name__)

BACKENDS = ("auto", "compiled", "numpy")
_ACTS = ("relu", "hardtanh", "prelu")


def _bits_key(value: str) -> str:
    """Where a value's packed signs sit beside the values (no value name has a NUL)."""
    return "\0bits:" + value


def _pair(v: list[int]) -> tuple[int, int]:
    return int(v[0]), int(v[1])


@dataclass
class _Step:
    """One executable step: ``fn(values)`` computes ``output`` from earlier values."""

    name: str
    output: str
    fn: Callable[[dict[str, np.ndarray]], np.ndarray]
    binary: bool = False  # ran on the bit-packed kernel


@dataclass
class PackedModel:
    """A packed network: call :meth:`run` on normalised N x C x H x W float32 inputs, or
    :meth:`predict` on uint8 images.

    Its layers reuse their output buffers from call to call, so one object serves one
    caller at a time: load one per thread to run several at once."""

    graph: dict[str, Any]
    backend: str
    threads: int
    steps: list[_Step] = field(default_factory=list)
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
        values: dict[str, Any] = {self.graph["input"]["name"]: np.transpose(x, (0, 2, 3, 1))}
        for step in self.steps:
            values[step.output] = step.fn(values)
        out = values[self.graph["output"]]
        # A copy: the steps' buffers are reused by the next call.
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
    checked = validate.check(graph, tensors)
    model = PackedModel(graph, backend, threads, image_bytes=checked.image_bytes)
    try:
        _Planner(model, tensors).plan()
    except (KeyError, TypeError, ValueError, IndexError) as e:
        # The check above admits only consistent graphs; this is its safety net.
        raise SigngradError(f"packed model: malformed graph ({type(e).__name__}: {e})") from None
    return model


class _Planner:
    """Turns graph nodes into steps, fusing epilogues into binary convolutions."""

    def __init__(self, model: PackedModel, tensors: dict[str, np.ndarray]) -> None:
        self.m = model
        self.graph = model.graph
        self.tensors = tensors
        # validate.check has already checked the whole graph (ops, order, shapes, tensors).
        self.nodes: list[dict[str, Any]] = self.graph["nodes"]
        self.users: dict[str, list[dict[str, Any]]] = {}
        for n in self.nodes:
            for v in n["inputs"]:
                self.users.setdefault(v, []).append(n)
        self.fused: set[int] = set()  # ids of nodes absorbed into an earlier step
        self.packed_values: set[str] = set()  # values whose signs a kernel packs as well

    # -- tensors (their names, dtypes and shapes checked by validate.check) -------------
    def _tensor(self, name: str | None, dtype: type = np.float32) -> np.ndarray | None:
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
            return fmt.unpack_signs(self._tensor(n["weight"], np.uint8), shape)
        return self._tensor(n["weight"])

    # -- planning ---------------------------------------------------------------------
    def plan(self) -> None:
        for n in self.nodes:
            if id(n) in self.fused:
                continue
            op = n["op"]
            if op in ("conv2d", "linear"):
                self.m.steps.append(self.weight_layer(n))
            else:
                self.m.steps.append(_Step(n["name"], n["output"], self.simple(n)))

    def _only_user(self, value: str) -> dict[str, Any] | None:
        users = self.users.get(value, [])
        if len(users) == 1 and value != self.graph["output"]:
            return users[0]
        return None

    def weight_layer(self, n: dict[str, Any]) -> _Step:
        linear = n["op"] == "linear"
        w = self.weight(n)
        if linear:
            w = w.reshape(*w.shape, 1, 1)
            kernel, stride, padding = (1, 1), (1, 1), (0, 0)
        else:
            kernel, stride, padding = _pair(n["kernel"]), _pair(n["stride"]), _pair(n["padding"])
        scale, shift = self._tensor(n["scale"]), self._tensor(n["shift"])
        x_name = n["inputs"][0]
        o, c = w.shape[:2]
        for what, t in (("scale", scale), ("shift", shift)):
            if t is not None and t.shape != (o,):
                raise SigngradError(
                    f"packed model: {what} of layer {n['name']!r} has shape {t.shape}, not ({o},)"
                )
        if n["binary_input"] and n["binary_weight"] and self.m.backend == "compiled":
            return self._binary_step(n, w, c, kernel, stride, padding, scale, shift, linear)
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

        return _Step(n["name"], n["output"], run)

    def _binary_step(
        self,
        n: dict[str, Any],
        w: np.ndarray,
        c: int,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        scale: np.ndarray | None,
        shift: np.ndarray | None,
        linear: bool,
    ) -> _Step:
        w_words = K.pack_weight_words(w)
        o = w.shape[0]
        scale = np.ones(o, np.float32) if scale is None else np.ascontiguousarray(scale)
        shift = np.zeros(o, np.float32) if shift is None else np.ascontiguousarray(shift)
        x_name = n["inputs"][0]
        out_name = n["output"]
        residual_name = None
        act, act_args = None, (0.0, 0.0, None)
        # Fuse "conv -> [add residual] -> [activation]" when each link has one user.
        nxt = self._only_user(out_name)
        if nxt is not None and nxt["op"] == "add":
            other = [v for v in nxt["inputs"] if v != out_name]
            if len(other) == 1 and other[0] in self._available(n):
                residual_name, out_name = other[0], nxt["output"]
                self.fused.add(id(nxt))
                nxt = self._only_user(out_name)
        if nxt is not None and nxt["op"] in _ACTS:
            act = nxt["op"]
            if act == "hardtanh":
                act_args = (float(nxt["min"]), float(nxt["max"]), None)
            elif act == "prelu":
                act_args = (0.0, 0.0, np.ascontiguousarray(self._tensor(nxt["weight"]).ravel()))
            out_name = nxt["output"]
            self.fused.add(id(nxt))
        # Pack the output's signs in the kernel when a binary layer reads this value.
        want_bits = any(
            u["op"] in ("conv2d", "linear") and u["binary_input"] and u["binary_weight"]
            for u in self.users.get(out_name, [])
        )
        if want_bits:
            self.packed_values.add(out_name)
        have_bits = x_name in self.packed_values
        threads = self.m.threads
        buffers = K.Buffers()

        def run(values: dict[str, np.ndarray]) -> np.ndarray:
            x_bits = values.get(_bits_key(x_name)) if have_bits else None
            if x_bits is None:
                x = values[x_name]
                x = x.reshape(x.shape[0], 1, 1, -1) if linear else x
                x_bits = K.pack_words(x, threads, buffers)
            residual = values[residual_name] if residual_name else None
            if residual is not None:
                residual = np.ascontiguousarray(residual, dtype=np.float32)
            y, bits = K.bconv2d(
                x_bits,
                w_words,
                c,
                kernel,
                stride,
                padding,
                scale,
                shift,
                residual,
                act,
                act_args,
                want_bits,
                threads,
                buffers,
            )
            if bits is not None:
                values[_bits_key(out_name)] = bits
            return y.reshape(y.shape[0], -1) if linear else y

        return _Step(n["name"], out_name, run, binary=True)

    def _available(self, node: dict[str, Any]) -> set[str]:
        """Values computed before ``node`` in execution order (and the input)."""
        seen = {self.graph["input"]["name"]}
        for n in self.nodes:
            if n is node:
                break
            seen.add(n["output"])
        return seen

    def simple(self, n: dict[str, Any]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        op, ins = n["op"], n["inputs"]
        x_name = ins[0]
        if op == "affine":
            s, t = self._tensor(n["scale"]), self._tensor(n["shift"])
            return lambda v: v[x_name] * s + t
        if op == "relu":
            return lambda v: np.maximum(v[x_name], np.float32(0))
        if op == "hardtanh":
            lo, hi = np.float32(n["min"]), np.float32(n["max"])
            return lambda v: np.clip(v[x_name], lo, hi)
        if op == "prelu":
            a = self._tensor(n["weight"])
            return lambda v: np.where(v[x_name] >= 0, v[x_name], v[x_name] * a)
        if op == "add":
            return lambda v: v[ins[0]] + v[ins[1]]
        if op == "shortcut_a":
            st, before, after = int(n["stride"]), int(n["pad_before"]), int(n["pad_after"])
            return lambda v: np.pad(
                v[x_name][:, ::st, ::st], ((0, 0), (0, 0), (0, 0), (before, after))
            )
        if op in ("maxpool2d", "avgpool2d"):
            k, s, p = _pair(n["kernel"]), _pair(n["stride"]), _pair(n["padding"])
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
