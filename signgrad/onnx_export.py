"""ONNX export of the deployable graph (:mod:`signgrad.graph`).

:func:`to_onnx` writes a :class:`signgrad.graph.Graph` as an ONNX model made of standard
operators only, so any ONNX runtime can run it without custom kernels:

* the input is ``input``, float32 N x C x H x W with a symbolic batch ``N``; the output
  is ``logits``;
* binary weights are stored as float +-1 initializers (in PyTorch's layout), so a
  ``Conv`` / ``Gemm`` computes with them directly; the weight scaling and any folded
  batch norm are a ``Mul`` and an ``Add`` per output channel after it;
* a binary input is ``Where(x >= 0, 1, -1)``: sign(0) = +1 as in training (ONNX's own
  ``Sign`` gives 0 there), and the convolution's zero padding is added after it, so it
  stays 0;
* where a binary layer's output (after its activation) is read only by binary layers,
  its sign is decided on the integer the convolution computes, d = sum of +-1 products
  (exact in float32 whatever the engine's order): ``Where(d * dir >= t * dir, 1, -1)``
  with per-channel integer thresholds :func:`thresholds` computed from the float32
  formula the packed runtime evaluates (d * scale + shift, then the activation). An
  engine that folds ``Mul`` and ``Add`` into the convolution's weights (onnxruntime
  does) would round that formula differently and flip signs next to zero; with the
  thresholds, these decisions are the packed runtime's and the C export's, bit for bit.

:func:`check_onnx` runs an exported model with onnxruntime next to the PyTorch model
and reports how far the logits are apart.

``onnx`` and ``onnxruntime`` are optional dependencies, imported only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import signgrad
from signgrad import agreement, graph
from signgrad.errors import SigngradError

if TYPE_CHECKING:  # only for annotations: onnx is an optional dependency
    import onnx

#: the oldest opset every operator used here exists in (GreaterOrEqual came with 12)
MIN_OPSET = 12
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_INT64_MAX = np.iinfo(np.int64).max


def _require(module: str) -> Any:
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SigngradError(
            f"ONNX export/check needs {module}, which is not installed; it needs the onnx "
            "extra: pip install 'signgrad[onnx]'"
        ) from None


_ACTIVATIONS = ("relu", "hardtanh", "prelu")


def thresholds(
    k: int,
    scale: np.ndarray | None,
    shift: np.ndarray | None,
    acts: list[tuple[str, dict[str, Any], np.ndarray | None]],
    channels: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per channel, (direction, threshold) such that the sign the packed runtime gives
    the output, sign(act(float32(d) * scale + shift)), is +1 exactly when
    ``direction * d >= direction * threshold``, for every integer d in [-k, k] (a binary
    layer's dot products of k terms); None if some channel's sign is not monotone in d.
    ``acts``: the activations in order, (op, node, slopes)."""
    d = np.arange(-k, k + 1, dtype=np.float32)[None, :]
    s = np.ones((channels, 1), np.float32) if scale is None else scale.reshape(-1, 1)
    t = np.zeros((channels, 1), np.float32) if shift is None else shift.reshape(-1, 1)
    y = d * s.astype(np.float32) + t.astype(np.float32)  # float32: as the runtime rounds
    for op, node, slope in acts:
        if op == "relu":
            y = np.maximum(y, np.float32(0))
        elif op == "hardtanh":
            y = np.clip(y, np.float32(node["min"]), np.float32(node["max"]))
        else:
            a = slope.reshape(-1, 1).astype(np.float32)
            y = np.where(y >= 0, y, y * a)
    pos = y >= 0  # NaN: negative, as sign() gives it
    direction = np.ones(channels, np.float32)
    threshold = np.empty(channels, np.float32)
    for c in range(channels):
        p = pos[c]
        if p.all() or not p.any():
            threshold[c] = -k if p.all() else k + 1  # always, or never, positive
        elif np.all(p[1:] >= p[:-1]):  # negative, then positive
            threshold[c] = np.argmax(p) - k
        elif np.all(p[1:] <= p[:-1]):  # positive, then negative
            direction[c], threshold[c] = -1, len(p) - 1 - np.argmax(p[::-1]) - k
        else:
            return None
    return direction, threshold


class _Emitter:
    """Collects ONNX nodes and initializers with unique names while the graph is walked."""

    def __init__(self, g: graph.Graph, onnx_mod: Any) -> None:
        self.g = g
        self.helper = onnx_mod.helper
        self.numpy_helper = onnx_mod.numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        # Value and initializer names share one namespace in ONNX; the model's own input
        # and output names are reserved so no intermediate value can take them.
        self.used = {INPUT_NAME, OUTPUT_NAME}
        self.node_names: set[str] = set()
        self.values = {g.input: INPUT_NAME}  # graph value name -> ONNX value name
        self.constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self.users: dict[str, list[dict[str, Any]]] = {}
        for n in g.nodes:
            for v in n["inputs"]:
                self.users.setdefault(v, []).append(n)
        #: ids of activation nodes absorbed into a layer's thresholds
        self.absorbed: set[int] = set()
        #: how many layers decide their output's sign by integer thresholds
        self.thresholded = 0

    def fresh(self, base: str, taken: set[str] | None = None) -> str:
        taken = self.used if taken is None else taken
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        """An initializer holding ``value``; equal small constants are shared."""
        key = (str(value.dtype), value.tobytes(), value.shape)
        if value.size <= 8 and key in self.constants:
            return self.constants[key]
        name = self.fresh(base)
        self.initializers.append(self.numpy_helper.from_array(value, name))
        if value.size <= 8:
            self.constants[key] = name
        return name

    def tensor(self, node: dict[str, Any], key: str) -> np.ndarray:
        name = node[key]
        if name not in self.g.tensors:
            raise SigngradError(
                f"node '{node['name']}': tensor '{name}' ({key}) is missing from the graph"
            )
        return np.asarray(self.g.tensors[name], dtype=np.float32)

    def rank(self, node: dict[str, Any], value: str) -> int:
        """The rank of a graph value with its batch dimension (from the traced shapes)."""
        if value == self.g.input:
            return len(self.g.input_shape) + 1
        if value not in self.g.shapes:
            raise SigngradError(f"node '{node['name']}': the shape of '{value}' is unknown")
        return len(self.g.shapes[value]) + 1

    def op(
        self, op_type: str, inputs: list[str], name: str, out: str | None = None, **attrs: Any
    ) -> str:
        """Append one ONNX node; return its output name (``out``, or a fresh one)."""
        out = self.fresh(f"{name}/{op_type}") if out is None else out
        node_name = self.fresh(f"{name}/{op_type}", self.node_names)
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], node_name, **attrs))
        return out

    # -- the graph's operations: each returns the ONNX name of the node's output ---------
    def sign(self, x: str, name: str) -> str:
        # Where(x >= 0, 1, -1), not Sign: the network was trained with sign(0) = +1.
        zero = self.const("zero", np.zeros((), np.float32))
        one = self.const("one", np.ones((), np.float32))
        minus_one = self.const("minus_one", -np.ones((), np.float32))
        ge = self.op("GreaterOrEqual", [x, zero], name)
        return self.op("Where", [ge, one, minus_one], name)

    def scale_shift(self, node: dict[str, Any], y: str, shape: list[int], out: str) -> str:
        """y * scale + shift with both reshaped to broadcast per channel (either may be
        null); the last op writes ``out``."""
        steps = [(k, op) for k, op in (("scale", "Mul"), ("shift", "Add")) if node.get(k)]
        if not steps:
            return self.op("Identity", [y], node["name"], out)
        for i, (key, op_type) in enumerate(steps):
            t = self.const(node[key], self.tensor(node, key).reshape(shape))
            y = self.op(op_type, [y, t], node["name"], out if i == len(steps) - 1 else None)
        return y

    def _sign_chain(self, node: dict[str, Any]) -> tuple[list[dict[str, Any]], str] | None:
        """The activations after a binary layer and the value they end in, if every
        reader of that value is a binary layer (so only its sign matters)."""
        if not (node.get("binary_input") and node.get("binary_weight")):
            return None
        chain, v = [], node["output"]
        while v != self.g.output:
            users = self.users.get(v, [])
            if len(users) == 1 and users[0]["op"] in _ACTIVATIONS:
                chain.append(users[0])
                v = users[0]["output"]
                continue
            readers_binary = all(
                u["op"] in ("conv2d", "linear") and u.get("binary_input") for u in users
            )
            return (chain, v) if users and readers_binary else None
        return None

    def thresholded_sign(
        self, node: dict[str, Any], d: str, k: int, shape: list[int], out: str
    ) -> str | None:
        """``Where(d * dir >= t * dir, 1, -1)`` for a binary layer whose output only binary
        layers read (see :func:`thresholds`), writing the chain's last value; None where it
        does not apply."""
        found = self._sign_chain(node)
        if found is None:
            return None
        chain, last = found
        channels = shape[1]
        acts = [
            (a["op"], a, self.tensor(a, "weight") if a["op"] == "prelu" else None) for a in chain
        ]
        scale = self.tensor(node, "scale") if node.get("scale") else None
        shift = self.tensor(node, "shift") if node.get("shift") else None
        found_t = thresholds(k, scale, shift, acts, channels)
        if found_t is None:
            return None
        direction, threshold = found_t
        name = node["name"]
        dir_c = self.const(f"{name}.sign_direction", direction.reshape(shape))
        thr_c = self.const(f"{name}.sign_threshold", (direction * threshold).reshape(shape))
        one = self.const("one", np.ones((), np.float32))
        minus_one = self.const("minus_one", -np.ones((), np.float32))
        ge = self.op("GreaterOrEqual", [self.op("Mul", [d, dir_c], name), thr_c], name)
        out = OUTPUT_NAME if last == self.g.output else self.fresh(last)
        y = self.op("Where", [ge, one, minus_one], name, out)
        for a in chain:
            self.absorbed.add(id(a))
        self.values[last] = y
        self.thresholded += 1
        return y

    def conv2d(self, node: dict[str, Any], x: str, out: str) -> str:
        name = node["name"]
        if node.get("binary_input"):
            x = self.sign(x, name)
        w = self.tensor(node, "weight")
        ph, pw = node["padding"]
        y = self.op(
            "Conv",
            [x, self.const(node["weight"], w)],
            name,
            kernel_shape=list(w.shape[2:]),
            strides=list(node["stride"]),
            pads=[ph, pw, ph, pw],
        )
        k = int(np.prod(w.shape[1:]))
        shape = [1, w.shape[0], 1, 1]
        return self.thresholded_sign(node, y, k, shape, out) or self.scale_shift(
            node, y, shape, out
        )

    def linear(self, node: dict[str, Any], x: str, out: str) -> str:
        name = node["name"]
        if node.get("binary_input"):
            x = self.sign(x, name)
        w = self.tensor(node, "weight")
        rank = self.rank(node, node["inputs"][0])
        if rank == 2:
            y = self.op("Gemm", [x, self.const(node["weight"], w)], name, transB=1)
            shape = [1, w.shape[0]]
            signed = self.thresholded_sign(node, y, w.shape[1], shape, out)
            if signed is not None:
                return signed
        else:  # Gemm takes 2-D inputs only; MatMul broadcasts over leading dimensions
            wt = np.ascontiguousarray(w.T)
            y = self.op("MatMul", [x, self.const(node["weight"], wt)], name)
            shape = [w.shape[0]]
        return self.scale_shift(node, y, shape, out)

    def affine(self, node: dict[str, Any], x: str, out: str) -> str:
        rank = self.rank(node, node["inputs"][0])
        c = self.tensor(node, "scale").size
        return self.scale_shift(node, x, [1, c] + [1] * (rank - 2), out)

    def relu(self, node: dict[str, Any], x: str, out: str) -> str:
        return self.op("Relu", [x], node["name"], out)

    def hardtanh(self, node: dict[str, Any], x: str, out: str) -> str:
        # Clip takes min and max as inputs (not attributes) since opset 11.
        lo = self.const("clip_min", np.array(node["min"], np.float32))
        hi = self.const("clip_max", np.array(node["max"], np.float32))
        return self.op("Clip", [x, lo, hi], node["name"], out)

    def prelu(self, node: dict[str, Any], x: str, out: str) -> str:
        slope = self.tensor(node, "weight")
        if slope.size > 1:
            # One slope per channel (axis 1): PRelu broadcasts from the right, so [C, 1, 1].
            slope = slope.reshape([slope.size] + [1] * (self.rank(node, node["inputs"][0]) - 2))
        return self.op("PRelu", [x, self.const(node["weight"], slope)], node["name"], out)

    def add(self, node: dict[str, Any], x: str, out: str) -> str:
        return self.op("Add", [x, self.values[node["inputs"][1]]], node["name"], out)

    def shortcut_a(self, node: dict[str, Any], x: str, out: str) -> str:
        name, s = node["name"], int(node["stride"])
        before, after = int(node["pad_before"]), int(node["pad_after"])
        if s != 1:
            x = self.op(
                "Slice",
                [
                    x,
                    self.const("slice_starts", np.zeros(2, np.int64)),
                    self.const("slice_ends", np.full(2, _INT64_MAX, np.int64)),
                    self.const("slice_axes", np.array([2, 3], np.int64)),
                    self.const(f"{name}.steps", np.array([s, s], np.int64)),
                ],
                name,
                out if before == after == 0 else None,
            )
        if before or after:
            pads = np.array([0, before, 0, 0, 0, after, 0, 0], np.int64)  # NCHW begins, ends
            x = self.op("Pad", [x, self.const(f"{name}.pads", pads)], name, out, mode="constant")
        elif s == 1:
            x = self.op("Identity", [x], name, out)
        return x

    def _pool(self, op_type: str, node: dict[str, Any], x: str, out: str, **attrs: Any) -> str:
        ph, pw = node["padding"]
        return self.op(
            op_type,
            [x],
            node["name"],
            out,
            kernel_shape=list(node["kernel"]),
            strides=list(node["stride"]),
            pads=[ph, pw, ph, pw],
            ceil_mode=0,
            **attrs,
        )

    def maxpool2d(self, node: dict[str, Any], x: str, out: str) -> str:
        return self._pool("MaxPool", node, x, out)

    def avgpool2d(self, node: dict[str, Any], x: str, out: str) -> str:
        return self._pool("AveragePool", node, x, out, count_include_pad=1)

    def global_avgpool(self, node: dict[str, Any], x: str, out: str) -> str:
        return self.op("GlobalAveragePool", [x], node["name"], out)

    def flatten(self, node: dict[str, Any], x: str, out: str) -> str:
        return self.op("Flatten", [x], node["name"], out, axis=1)

    def emit(self, node: dict[str, Any]) -> None:
        emit: Callable[[dict[str, Any], str, str], str] | None = {
            "conv2d": self.conv2d,
            "linear": self.linear,
            "affine": self.affine,
            "relu": self.relu,
            "hardtanh": self.hardtanh,
            "prelu": self.prelu,
            "add": self.add,
            "shortcut_a": self.shortcut_a,
            "maxpool2d": self.maxpool2d,
            "avgpool2d": self.avgpool2d,
            "global_avgpool": self.global_avgpool,
            "flatten": self.flatten,
        }.get(node["op"])
        if emit is None:
            raise SigngradError(
                f"node '{node.get('name')}': op '{node['op']}' has no ONNX "
                f"mapping; known ops: {', '.join(graph.OPS)}"
            )
        if id(node) in self.absorbed:  # computed by a layer's thresholds
            return
        for v in node["inputs"]:
            if v not in self.values:
                raise SigngradError(f"node '{node['name']}': input '{v}' is not computed before it")
        v = node["output"]
        # The graph's output value becomes the model output directly (no extra Identity).
        out = OUTPUT_NAME if v == self.g.output else self.fresh(v)
        y = emit(node, self.values[node["inputs"][0]], out)
        self.values.setdefault(v, y)  # (a thresholded layer has named its chain's value)


def to_onnx(
    g: graph.Graph,
    *,
    opset: int = 17,
    metadata: dict[str, str] | None = None,
    expose: list[str] | None = None,
) -> onnx.ModelProto:
    """The ONNX model (standard operators, opset ``opset`` >= 12) computing graph ``g``:
    input ``input`` (float32, N x C x H x W, N symbolic), output ``logits``.

    ``metadata`` (string keys and values) goes into the model's ``metadata_props``;
    ``expose`` names graph values to add as outputs after ``logits`` (to inspect them).
    The model passes ``onnx.checker.check_model`` (with shape inference).
    """
    onnx_mod = _require("onnx")
    helper = onnx_mod.helper
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise SigngradError(f"ONNX opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    if opset > onnx_mod.defs.onnx_opset_version():
        raise SigngradError(
            f"ONNX opset {opset} is newer than the installed onnx supports "
            f"({onnx_mod.defs.onnx_opset_version()})"
        )
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise SigngradError(f"ONNX metadata keys and values must be strings: {bad!r}")

    em = _Emitter(g, onnx_mod)
    for node in g.nodes:
        em.emit(node)
    if g.output not in em.values:
        raise SigngradError(f"the graph's output '{g.output}' is not computed by any node")
    if em.values[g.output] != OUTPUT_NAME:  # output is the input itself, or an alias
        em.op("Identity", [em.values[g.output]], "output", OUTPUT_NAME)

    float32 = onnx_mod.TensorProto.FLOAT
    out_shape = g.shapes.get(g.output, list(g.input_shape) if g.output == g.input else None)
    inp = helper.make_tensor_value_info(INPUT_NAME, float32, ["N", *g.input_shape])
    outp = helper.make_tensor_value_info(
        OUTPUT_NAME, float32, None if out_shape is None else ["N", *out_shape]
    )
    extra = []
    for v in expose or []:
        if v not in em.values:
            raise SigngradError(f"cannot expose '{v}': the ONNX model does not compute it")
        shape = g.shapes.get(v)
        dims = None if shape is None else ["N", *shape]
        extra.append(helper.make_tensor_value_info(em.values[v], float32, dims))
    onnx_graph = helper.make_graph(em.nodes, "signgrad", [inp], [outp, *extra], em.initializers)
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        onnx_graph,
        opset_imports=opset_ids,
        producer_name="signgrad",
        producer_version=signgrad.__version__,
        # The oldest IR version that can hold this opset, so older runtimes load the file.
        ir_version=helper.find_min_ir_version_for(opset_ids),
    )
    if metadata:
        helper.set_model_props(model, metadata)
    onnx_mod.checker.check_model(model, full_check=True)
    return model


def check_onnx(
    model: onnx.ModelProto, torch_model: nn.Module, x: torch.Tensor
) -> tuple[float, float]:
    """Run ``model`` with onnxruntime (CPU) and ``torch_model`` (eval mode, no grad) on
    ``x``; return (max |logit difference|, fraction of rows whose argmax agrees)."""
    _require("onnx")
    ort = _require("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed_name = session.get_inputs()[0].name
    out_name = session.get_outputs()[0].name
    x = x.detach().to("cpu", torch.float32)
    got = agreement.in_chunks(lambda c: session.run([out_name], {feed_name: c.numpy()})[0], x)
    ref = agreement.torch_logits(torch_model, x)
    if got.shape != ref.shape:
        raise SigngradError(
            f"ONNX output shape {list(got.shape)} differs from the "
            f"PyTorch model's {list(ref.shape)}"
        )
    return agreement.compare(got, ref)
