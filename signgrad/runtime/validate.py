"""The whole-graph check of a packed model, before the runtime plans a single step.

A packed file's checksum only proves that it was not damaged by accident: anyone can
edit the graph and sign it again. So :func:`check` trusts nothing in it. It type-checks
every field (an int is an int, not a bool, float or string), follows the shape of every
value from the input through every node (channels, spatial sizes, features), checks
every tensor a node names against the shape that node needs (a binary weight's declared
shape against its stored packed rows, exactly), refuses non-finite floats, and bounds
the activation memory one image needs. Each refusal is a :class:`SigngradError` naming
the layer and what is wrong. The planner and the kernels can then rely on consistent
shapes: a file that passes computes *something* well defined, on both backends alike
(whether it computes what its exporter meant is a matter of trusting its source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from signgrad.errors import SigngradError
from signgrad.runtime import format as fmt

#: every size or count in a graph is at most this (the kernels' C ints)
MAX_DIM = 2**31 - 1
#: the most activation memory (bytes) one image may need: every value the graph computes,
#: kept for the whole forward pass, plus the largest temporary of one layer (padded input
#: and im2col patches of a convolution). A ResNet-18 at 224 x 224 needs about 60 MiB.
MAX_IMAGE_BYTES = 1 << 30
_F32_MAX = float(np.finfo(np.float32).max)
_SHAPED_OPS = {"conv2d", "shortcut_a", "maxpool2d", "avgpool2d", "global_avgpool"}


@dataclass
class Checked:
    """What the check learnt: each value's shape without the batch dimension ((C, H, W)
    or (features,)) and the activation bytes one image needs."""

    shapes: dict[str, tuple[int, ...]]
    image_bytes: int


def size_text(n: int) -> str:
    """Bytes in words: 1.5 GiB, 12.0 MiB, 300 bytes."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _fail(message: str) -> SigngradError:
    return SigngradError(f"packed model: {message}")


def _shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float


def _int(v: Any, what: str, lo: int, hi: int = MAX_DIM) -> int:
    if not _is_int(v) or not lo <= v <= hi:
        bound = f"between {lo} and {hi}" if hi < MAX_DIM else f"at least {lo}"
        raise _fail(f"{what} must be an integer {bound}, got {v!r:.60}")
    return v


def _number(v: Any, what: str) -> float:
    """A finite number that float32 holds (int or float, not bool)."""
    if type(v) not in (int, float) or not abs(v) <= _F32_MAX:  # NaN fails the comparison
        raise _fail(f"{what} must be a finite number, got {v!r:.60}")
    return float(v)


def _name(v: Any, what: str) -> str:
    # Value names key the runtime's value table; a NUL would reach its packed-bits keys.
    if not isinstance(v, str) or not v or "\0" in v:
        raise _fail(f"{what} must be a non-empty string without NUL, got {v!r:.60}")
    return v


class _Checker:
    def __init__(self, graph: Any, tensors: dict[str, np.ndarray]) -> None:
        if not isinstance(graph, dict):
            raise _fail(f"malformed graph: a {type(graph).__name__}, not a JSON object")
        self.graph = graph
        self.tensors = tensors
        self.finite: set[str] = set()  # float tensors already checked
        self.used_binary: set[str] = set()

    def field(self, obj: dict[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise _fail(f"malformed graph: {where} has no field {key!r}")
        return obj[key]

    # -- tensors ----------------------------------------------------------------------
    def float_tensor(
        self, name: Any, shape: tuple[int, ...] | None, label: str, what: str
    ) -> np.ndarray:
        """The float32 tensor ``name`` of exactly ``shape`` (None: 1-D of any length)."""
        name = _name(name, f"{label}: the {what} tensor's name")
        if name in self.graph_binary:
            raise _fail(f"{label}: {what} tensor {name!r} is listed in binary_tensors")
        t = self.tensors.get(name)
        if t is None:
            raise _fail(f"{label}: {what} tensor {name!r} is missing from the file")
        if t.dtype != np.float32:
            raise _fail(f"{label}: {what} tensor {name!r} is {t.dtype}, not float32")
        if (shape is None and t.ndim != 1) or (shape is not None and t.shape != shape):
            want = f"({shape[0]},)" if shape and len(shape) == 1 else str(shape or "1-D")
            raise _fail(f"{what} of {label} has shape {t.shape}, not {want}")
        if name not in self.finite:
            if not np.isfinite(t).all():
                raise _fail(f"{label}: {what} tensor {name!r} holds NaN or infinite values")
            self.finite.add(name)
        return t

    def weight(self, n: dict[str, Any], label: str, shape: tuple[int, ...]) -> None:
        """The layer's weight: float32 of ``shape``, or packed signs declared as ``shape``."""
        binary = self.field(n, "binary_weight", label)
        name = self.field(n, "weight", label)
        if not binary:
            self.float_tensor(name, shape, label, "weight")
            return
        name = _name(name, f"{label}: the weight tensor's name")
        declared = self.graph_binary.get(name)
        if declared is None:
            raise _fail(f"{label}: binary weight {name!r} is not listed in binary_tensors")
        if declared != list(shape):
            raise _fail(
                f"{label}: binary weight {name!r} is declared {declared}, but the "
                f"layer needs {list(shape)}"
            )
        k = math.prod(shape[1:])
        rows = (shape[0], (k + 7) // 8)
        t = self.tensors.get(name)
        if t is None:
            raise _fail(f"{label}: binary weight {name!r} is missing from the file")
        if t.dtype != np.uint8 or t.shape != rows:
            raise _fail(
                f"{label}: binary weight {name!r} is stored as {t.dtype} {t.shape}; "
                f"{list(shape)} packs into uint8 {rows}"
            )
        if k % 8 and (t[:, -1] >> (k % 8)).any():
            raise _fail(f"{label}: binary weight {name!r} has bits set past its {k} elements")
        self.used_binary.add(name)

    def optional_vector(self, n: dict[str, Any], key: str, length: int, label: str) -> None:
        v = self.field(n, key, label)
        if v is not None:
            self.float_tensor(v, (length,), label, key)

    # -- the graph --------------------------------------------------------------------
    def check(self) -> Checked:
        g = self.graph
        binary = self.field(g, "binary_tensors", "the graph")
        if not isinstance(binary, dict):
            raise _fail("malformed graph: binary_tensors must be an object {name: shape}")
        for name, shape in binary.items():
            if not isinstance(shape, list) or len(shape) < 2:
                raise _fail(
                    f"binary_tensors: the shape of {name!r} must be a list of at "
                    f"least 2 integers, got {shape!r:.60}"
                )
            for d in shape:
                _int(d, f"binary_tensors: a dimension of {name!r}", 1)
        self.graph_binary: dict[str, list[int]] = binary

        inp = self.field(g, "input", "the graph")
        if not isinstance(inp, dict):
            raise _fail("malformed graph: input must be an object {name, shape}")
        input_name = _name(self.field(inp, "name", "the input"), "the input's name")
        shape = self.field(inp, "shape", "the input")
        if not isinstance(shape, list) or len(shape) != 3:
            raise _fail(f"the input shape must be [C, H, W], got {shape!r:.60}")
        c, h, w = (_int(d, "a dimension of the input shape", 1) for d in shape)
        self.preprocess(c)

        shapes: dict[str, tuple[int, ...]] = {input_name: (c, h, w)}
        temp, temp_label = 0, ""
        nodes = self.field(g, "nodes", "the graph")
        if not isinstance(nodes, list):
            raise _fail("malformed graph: nodes must be a list")
        for i, n in enumerate(nodes):
            if not isinstance(n, dict):
                raise _fail(f"malformed graph: node {i} is a {type(n).__name__}, not an object")
            op = n.get("op")
            name = n.get("name")
            if op not in fmt.OPS:
                raise _fail(f"node {name!r:.60} has op {op!r:.60}, which this runtime cannot run")
            label = f"layer {name!r} ({op})" if isinstance(name, str) else f"node {i} ({op})"
            _name(self.field(n, "name", label), f"{label}: its name")
            ins = self.field(n, "inputs", label)
            arity = 2 if op == "add" else 1
            if not isinstance(ins, list) or len(ins) != arity:
                raise _fail(
                    f"{label}: inputs must be a list of {arity} value names, got {ins!r:.60}"
                )
            for v in ins:
                _name(v, f"{label}: an input")
            missing = [v for v in ins if v not in shapes]
            if missing:
                raise _fail(f"node {name!r} reads {missing} before they are computed")
            out = _name(self.field(n, "output", label), f"{label}: its output")
            if out in shapes:
                raise _fail(
                    f"{label}: its output {out!r} is already computed (each value is written once)"
                )
            y, t = self.node(n, op, label, [shapes[v] for v in ins], ins)
            if t > temp:
                temp, temp_label = t, label
            shapes[out] = y

        output = _name(self.field(g, "output", "the graph"), "the graph's output")
        if output not in shapes:
            raise _fail("the graph's output is never computed")
        y = shapes[output]
        classes = self.field(g, "classes", "the graph")
        if not isinstance(classes, list) or not all(isinstance(s, str) for s in classes):
            raise _fail("classes must be a list of class names (strings)")
        if len(y) == 3 and y[1:] == (1, 1):
            y = y[:1]
        if len(y) != 1 or y[0] != len(classes):
            raise _fail(
                f"the graph's output {output!r} is N x {_shape_text(shapes[output])}, "
                f"not N x {len(classes)} for its {len(classes)} classes"
            )
        unused = sorted(set(binary) - self.used_binary)
        if unused:
            raise _fail(f"binary_tensors lists {unused[0]!r}, which no binary layer uses")

        values = sum(4 * math.prod(s) for s in shapes.values())
        need = values + temp
        if need > MAX_IMAGE_BYTES:
            largest = f"; the largest temporary: {temp_label}, {size_text(temp)}" if temp else ""
            raise _fail(
                f"running this graph needs {size_text(need)} of activations per image "
                f"({size_text(values)} of values{largest}), more than this runtime's "
                f"limit of {size_text(MAX_IMAGE_BYTES)}"
            )
        return Checked(shapes, need)

    def preprocess(self, c: int) -> None:
        pre = self.field(self.graph, "preprocess", "the graph")
        if not isinstance(pre, dict):
            raise _fail("malformed graph: preprocess must be an object {mean, std}")
        stats = {}
        for key in ("mean", "std"):
            v = self.field(pre, key, "preprocess")
            if not isinstance(v, list) or len(v) != c:
                raise _fail(
                    f"preprocess {key} must be a list of {c} numbers (one per input "
                    f"channel), got {v!r:.60}"
                )
            stats[key] = [_number(x, f"preprocess {key}") for x in v]
        mean = np.float32(stats["mean"])
        std = np.float32(stats["std"])
        if not (std > 0).all():
            raise _fail(f"preprocess std must be positive, got {stats['std']}")
        # Every pixel (0..1 after / 255) must normalise to a finite float32.
        with np.errstate(all="ignore"):
            ends = (np.float32([[0.0], [1.0]]) - mean) / std
        if not np.isfinite(ends).all():
            raise _fail("preprocess mean and std make pixels overflow float32")
        if "crop" in pre:
            crop = _number(pre["crop"], "preprocess crop")
            if not 0 < crop <= 1:
                raise _fail(f"preprocess crop must be in (0, 1], got {crop}")

    def node(
        self, n: dict[str, Any], op: str, label: str, xs: list[tuple[int, ...]], ins: list[str]
    ) -> tuple[tuple[int, ...], int]:
        """The output shape of node ``n`` and the temporary bytes it needs per image."""
        x = xs[0]
        if op in _SHAPED_OPS and len(x) != 3:
            raise _fail(f"{label} takes N x C x H x W input; {ins[0]!r} is N x {_shape_text(x)}")
        if op == "conv2d":
            return self.conv(n, label, x, ins[0])
        if op == "linear":
            if len(x) != 1:
                raise _fail(
                    f"{label} takes N x features input; {ins[0]!r} is N x "
                    f"{_shape_text(x)} (flatten it first)"
                )
            self.bools(n, label)
            f = _int(self.field(n, "in_features", label), f"{label}: in_features", 1)
            o = _int(self.field(n, "out_features", label), f"{label}: out_features", 1)
            if f != x[0]:
                raise _fail(
                    f"{label}: in_features is {f}, but its input {ins[0]!r} has {x[0]} features"
                )
            self.weight(n, label, (o, f))
            self.optional_vector(n, "scale", o, label)
            self.optional_vector(n, "shift", o, label)
            return (o,), 4 * f
        if op == "affine":
            for key in ("scale", "shift"):
                self.float_tensor(self.field(n, key, label), (x[0],), label, key)
            return x, 0
        if op == "relu":
            return x, 0
        if op == "hardtanh":
            lo = _number(self.field(n, "min", label), f"{label}: min")
            hi = _number(self.field(n, "max", label), f"{label}: max")
            if lo > hi:
                raise _fail(f"{label}: min {lo} is above max {hi}")
            return x, 0
        if op == "prelu":
            t = self.float_tensor(self.field(n, "weight", label), None, label, "weight")
            if t.shape[0] not in (1, x[0]):
                raise _fail(f"{label}: {t.shape[0]} slopes for {x[0]} channels (1 or {x[0]})")
            return x, 0
        if op == "add":
            if xs[0] != xs[1]:
                raise _fail(
                    f"{label} adds N x {_shape_text(xs[0])} ({ins[0]!r}) to N x "
                    f"{_shape_text(xs[1])} ({ins[1]!r}): the shapes must be equal"
                )
            return x, 0
        if op == "shortcut_a":
            s = _int(self.field(n, "stride", label), f"{label}: stride", 1)
            before = _int(self.field(n, "pad_before", label), f"{label}: pad_before", 0)
            after = _int(self.field(n, "pad_after", label), f"{label}: pad_after", 0)
            return (x[0] + before + after, -(-x[1] // s), -(-x[2] // s)), 0
        if op in ("maxpool2d", "avgpool2d"):
            (kh, kw), (sh, sw), (ph, pw) = self.window(n, label)
            if ph > kh // 2 or pw > kw // 2:
                raise _fail(
                    f"{label}: padding {[ph, pw]} is more than half the kernel "
                    f"{[kh, kw]} (PyTorch refuses it too)"
                )
            y = self.spatial(label, x, (kh, kw), (sh, sw), (ph, pw))
            return y, 4 * x[0] * (x[1] + 2 * ph) * (x[2] + 2 * pw)
        if op == "global_avgpool":
            return (x[0], 1, 1), 0
        if op == "flatten":
            return (math.prod(x),), 0
        raise AssertionError(op)  # fmt.OPS holds no other

    def bools(self, n: dict[str, Any], label: str) -> None:
        for key in ("binary_input", "binary_weight"):
            if type(self.field(n, key, label)) is not bool:
                raise _fail(f"{label}: {key} must be true or false, got {n[key]!r:.60}")

    def window(self, n: dict[str, Any], label: str) -> list[tuple[int, int]]:
        out = []
        for key, lo in (("kernel", 1), ("stride", 1), ("padding", 0)):
            v = self.field(n, key, label)
            if not isinstance(v, list) or len(v) != 2:
                raise _fail(f"{label}: {key} must be a list [h, w], got {v!r:.60}")
            out.append((_int(v[0], f"{label}: {key}", lo), _int(v[1], f"{label}: {key}", lo)))
        return out

    def spatial(
        self,
        label: str,
        x: tuple[int, ...],
        k: tuple[int, int],
        s: tuple[int, int],
        p: tuple[int, int],
    ) -> tuple[int, int, int]:
        hp, wp = x[1] + 2 * p[0], x[2] + 2 * p[1]
        if k[0] > hp or k[1] > wp:
            raise _fail(
                f"{label}: kernel {k[0]} x {k[1]} is larger than its padded input {hp} x {wp}"
            )
        return x[0], (hp - k[0]) // s[0] + 1, (wp - k[1]) // s[1] + 1

    def conv(
        self, n: dict[str, Any], label: str, x: tuple[int, ...], x_name: str
    ) -> tuple[tuple[int, ...], int]:
        self.bools(n, label)
        cin = _int(self.field(n, "in_channels", label), f"{label}: in_channels", 1)
        cout = _int(self.field(n, "out_channels", label), f"{label}: out_channels", 1)
        if cin != x[0]:
            raise _fail(
                f"{label}: in_channels is {cin}, but its input {x_name!r} has {x[0]} channels"
            )
        (kh, kw), s, (ph, pw) = self.window(n, label)
        _, ho, wo = self.spatial(label, x, (kh, kw), s, (ph, pw))
        self.weight(n, label, (cout, cin, kh, kw))
        self.optional_vector(n, "scale", cout, label)
        self.optional_vector(n, "shift", cout, label)
        # The numpy path's padded input and im2col patches (the compiled one needs less).
        padded = (x[1] + 2 * ph) * (x[2] + 2 * pw) * cin
        return (cout, ho, wo), 4 * (padded + ho * wo * kh * kw * cin)


def check(graph: Any, tensors: dict[str, np.ndarray]) -> Checked:
    """Check a packed model's graph and tensors as a whole (see the module docstring);
    raises :class:`SigngradError` naming the first thing wrong."""
    return _Checker(graph, tensors).check()
