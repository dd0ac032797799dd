"""The deployable graph of a (binary) network: what export, the runtime, ONNX and the
summary all read.

:func:`build` traces a model in eval mode (``torch.fx``, binary and hyper layers kept
whole) into a flat list of nodes over named values, with batch norm folded into the
layer before it where that is exact, and checks on the way that every binary layer
really computes with +-1 (an exact-sign forward); anything the graph cannot express is a
:class:`SigngradError` naming the layer, never a silently different network.

A node is a JSON-ready dict: ``op``, ``name`` (the module path), ``inputs`` (value
names), ``output`` (a value name) and the op's attributes; tensors are referred to by
name and held in :attr:`Graph.tensors` (float32 numpy arrays; binary weights as their
signs, +1/-1, in PyTorch's layout). Ops and their meaning (NCHW, batch first):

=================  ========================================================================
``conv2d``         y = conv(Q(x), W) * scale + shift, per output channel; ``binary_input``:
                   Q = sign (sign(0) = +1, zero padding stays 0), else Q = identity;
                   ``binary_weight``: W holds +-1 and ``scale`` the weight scaling alpha
                   times any folded batch-norm factor. ``kernel``, ``stride``,
                   ``padding`` are [h, w] pairs; ``scale``/``shift`` may be null.
``linear``         y = Q(x) W^T * scale + shift, the same attributes.
``affine``         y = x * scale + shift per channel (a batch norm that could not be folded).
``relu``           max(x, 0).
``hardtanh``       clamp(x, ``min``, ``max``).
``prelu``          x if x >= 0 else ``weight`` * x, one slope per channel (or one in all).
``add``            x0 + x1.
``shortcut_a``     x[:, :, ::stride, ::stride], channels zero-padded by ``pad_before`` /
                   ``pad_after`` (option-A shortcut).
``maxpool2d``      ``kernel``, ``stride``, ``padding`` pairs (floor mode).
``avgpool2d``      the same; padded zeros count in the mean.
``global_avgpool`` mean over H and W, keeping N x C x 1 x 1.
``flatten``        N x (C*H*W), in NCHW order.
=================  ========================================================================
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Tracer
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.utils import _pair

from signgrad import layers, models, quantizers
from signgrad.errors import SigngradError
from signgrad.runtime import format as fmt

OPS = fmt.OPS


@dataclass
class Graph:
    """Nodes in execution order, the tensors they name, and the shapes seen in tracing."""

    input_shape: list[int]  # C, H, W
    input: str  # the name of the input value
    nodes: list[dict[str, Any]]
    output: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    #: value name -> shape without the batch dimension (from tracing a dummy batch)
    shapes: dict[str, list[int]] = field(default_factory=dict)


class _Tracer(Tracer):
    """Keeps binary/hyper layers, quantizers and option-A shortcuts as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, layers.BinaryLayer | quantizers.Quantizer | models.ShortcutA):
            return True
        return super().is_leaf_module(m, qualname)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy().copy()


def _check_exact_sign(q: quantizers.Quantizer, what: str) -> None:
    """Raise unless ``q``'s forward, as the model stands, is sign() with sign(0) = +1."""
    if q.precision != 1:
        raise SigngradError(
            f"{what}: quantizer '{q.name}' has {q.precision}-bit outputs; "
            "only 1-bit layers can be exported"
        )
    probe = torch.linspace(-3, 3, 601)
    with torch.no_grad():
        ok = torch.equal(q.forward_value(probe, q.sharpness), quantizers.sign(probe))
    if not ok:
        raise SigngradError(
            f"{what}: quantizer '{q.name}' is not yet the exact sign (a soft forward before "
            "its exact-sign epochs); export the run's final checkpoint"
        )


class _Builder:
    def __init__(self, strict: bool) -> None:
        self.strict = strict  # False (summary): soft quantizers are read as their sign
        self.nodes: list[dict[str, Any]] = []
        self.tensors: dict[str, np.ndarray] = {}

    def tensor(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        arr = value if isinstance(value, np.ndarray) else _f32(value)
        self.tensors[name] = np.ascontiguousarray(arr, dtype=np.float32)
        return name

    def add(self, op: str, name: str, inputs: list[str], output: str, **attrs: Any) -> None:
        self.nodes.append({"op": op, "name": name, "inputs": inputs, "output": output, **attrs})

    # -- layers with weights ----------------------------------------------------------
    def weight_layer(self, name: str, m: nn.Module, x: str, out: str) -> None:
        binary = isinstance(m, layers.BinaryLayer)
        # A binary layer says its kernel's shape (a hyper layer is no nn.Conv2d).
        conv = isinstance(m, nn.Conv2d) or binary and len(m.kernel_shape) == 4
        attrs: dict[str, Any] = {"binary_input": False, "binary_weight": False}
        scale = None
        with torch.no_grad():
            if binary:
                iq = m.input_quantizer
                if iq is not None:
                    if self.strict:
                        _check_exact_sign(iq, f"layer '{name}' (inputs)")
                    elif iq.precision != 1:
                        raise SigngradError(f"layer '{name}': {iq.precision}-bit inputs")
                    attrs["binary_input"] = True
                wq = m.weight_quantizer
                latent = m.latent_weight()
                if wq.precision == 32:
                    w = latent
                else:
                    if wq.precision != 1:
                        raise SigngradError(
                            f"layer '{name}': quantizer '{wq.name}' has "
                            f"{wq.precision}-bit weights; only 1-bit layers "
                            "can be exported"
                        )
                    w = wq.forward_value(latent, wq.sharpness) if self.strict else latent
                    if self.strict and not bool((w.abs() == 1).all()):
                        raise SigngradError(
                            f"layer '{name}': weight quantizer '{wq.name}' does not give +-1 "
                            "yet (a soft forward before its exact-sign epochs); export the "
                            "run's final checkpoint"
                        )
                    w = quantizers.sign(w)
                    attrs["binary_weight"] = True
                    alpha = m.scale(latent)
                    if alpha is not None:
                        scale = alpha.reshape(-1).expand(w.shape[0])
            else:
                w = m.weight
        if conv:
            stride, padding = _pair(m.stride), _pair(m.padding)
            if isinstance(m.padding, str) or getattr(m, "padding_mode", "zeros") != "zeros":
                raise SigngradError(f"layer '{name}': only numeric zero padding can be exported")
            if m.groups != 1 or _pair(m.dilation) != (1, 1):
                raise SigngradError(
                    f"layer '{name}': grouped or dilated convolutions cannot be exported"
                )
            attrs.update(
                in_channels=int(w.shape[1]),
                out_channels=int(w.shape[0]),
                kernel=[int(w.shape[2]), int(w.shape[3])],
                stride=list(stride),
                padding=list(padding),
            )
            op = "conv2d"
        else:
            attrs.update(in_features=int(w.shape[1]), out_features=int(w.shape[0]))
            op = "linear"
        attrs["weight"] = self.tensor(f"{name}.weight", w)
        attrs["scale"] = self.tensor(f"{name}.scale", scale) if scale is not None else None
        bias = getattr(m, "bias", None)
        attrs["shift"] = self.tensor(f"{name}.shift", bias) if bias is not None else None
        self.add(op, name, [x], out, **attrs)

    def batchnorm(self, name: str, m: nn.modules.batchnorm._BatchNorm, x: str, out: str) -> None:
        if not m.track_running_stats or m.running_mean is None:
            raise SigngradError(f"layer '{name}': batch norm without running statistics")
        # As ATen's eval-mode batch norm computes it, so the folded form rounds alike.
        invstd = 1 / torch.sqrt(m.running_var.float() + m.eps)
        a = invstd * m.weight.float() if m.affine else invstd
        mean = m.running_mean.float()
        b = m.bias.float() - mean * a if m.affine else -mean * a
        self.add(
            "affine",
            name,
            [x],
            out,
            scale=self.tensor(f"{name}.scale", a),
            shift=self.tensor(f"{name}.shift", b),
        )

    def module(self, name: str, m: nn.Module, args: list[str], out: str) -> None:
        x = args[0]
        if isinstance(m, layers.BinaryLayer | nn.Conv2d | nn.Linear):
            self.weight_layer(name, m, x, out)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            self.batchnorm(name, m, x, out)
        elif isinstance(m, nn.ReLU):
            self.add("relu", name, [x], out)
        elif isinstance(m, nn.Hardtanh):
            self.add("hardtanh", name, [x], out, min=float(m.min_val), max=float(m.max_val))
        elif isinstance(m, nn.PReLU):
            self.add("prelu", name, [x], out, weight=self.tensor(f"{name}.weight", m.weight))
        elif isinstance(m, nn.Identity | nn.Dropout):
            self.alias[out] = x
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            self.add("flatten", name, [x], out)
        elif isinstance(m, models.ShortcutA):
            extra = m.out_planes - m.in_planes
            self.add(
                "shortcut_a",
                name,
                [x],
                out,
                stride=m.stride,
                pad_before=extra // 2,
                pad_after=extra - extra // 2,
            )
        elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d) and not m.ceil_mode:
            if isinstance(m, nn.MaxPool2d) and (_pair(m.dilation) != (1, 1) or m.return_indices):
                raise SigngradError(f"layer '{name}': dilated max-pool cannot be exported")
            if isinstance(m, nn.AvgPool2d) and (
                not m.count_include_pad or m.divisor_override is not None
            ):
                raise SigngradError(f"layer '{name}': this avg-pool variant cannot be exported")
            op = "maxpool2d" if isinstance(m, nn.MaxPool2d) else "avgpool2d"
            stride = m.stride if m.stride is not None else m.kernel_size
            self.add(
                op,
                name,
                [x],
                out,
                kernel=list(_pair(m.kernel_size)),
                stride=list(_pair(stride)),
                padding=list(_pair(m.padding)),
            )
        elif isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
            self.add("global_avgpool", name, [x], out)
        else:
            raise SigngradError(
                f"layer '{name}' ({type(m).__name__}) cannot be exported: the runtime has no "
                "such operation"
            )

    # -- the trace --------------------------------------------------------------------
    def run(self, gm: GraphModule, input_shape: list[int]) -> Graph:
        self.alias: dict[str, str] = {}
        input_name = "x"
        shapes: dict[str, list[int]] = {}
        output = None
        for n in gm.graph.nodes:
            if "tensor_meta" in n.meta:
                shapes[n.name] = list(n.meta["tensor_meta"].shape[1:])
            args = [self.alias.get(a.name, a.name) for a in n.args if isinstance(a, torch.fx.Node)]
            what = f"'{n.target}'" if n.op != "call_module" else f"layer '{n.target}'"
            if n.op == "placeholder":
                input_name = n.name
                continue
            if n.op == "output":
                output = args[0]
            elif n.op == "call_module":
                self.module(str(n.target), gm.get_submodule(str(n.target)), args, n.name)
            elif (
                n.op == "call_function"
                and n.target in (operator.add, torch.add)
                and (len(args) == 2 and not n.kwargs)
            ):
                self.add("add", n.name, args, n.name)
            elif (
                n.op in ("call_function", "call_method")
                and n.target in (torch.flatten, "flatten")
                and list(n.args[1:]) + list(n.kwargs.values()) in ([1], ["1"], [1, -1])
            ):
                self.add("flatten", n.name, args[:1], n.name)
            elif n.op == "call_function" and n.target in (torch.relu, nn.functional.relu):
                self.add("relu", n.name, args[:1], n.name)
            else:
                raise SigngradError(
                    f"{what} ({n.op}) in the model's forward cannot be "
                    "exported: the runtime has no such operation"
                )
        assert output is not None
        _fold_affine(self.nodes, self.tensors)
        return Graph(input_shape, input_name, self.nodes, output, self.tensors, shapes)


def _fold_affine(nodes: list[dict[str, Any]], tensors: dict[str, np.ndarray]) -> None:
    """Fold an ``affine`` into the conv/linear right before it when that is its only user:
    (y * s + t) * a + b = y * (s a) + (t a + b)."""
    users: dict[str, int] = {}
    for n in nodes:
        for v in n["inputs"]:
            users[v] = users.get(v, 0) + 1
    producer = {n["output"]: n for n in nodes}
    for n in list(nodes):
        if n["op"] != "affine":
            continue
        prev = producer.get(n["inputs"][0])
        if prev is None or prev["op"] not in ("conv2d", "linear") or users[prev["output"]] != 1:
            continue
        a, b = tensors.pop(n["scale"]), tensors.pop(n["shift"])
        s = tensors.pop(prev["scale"]) if prev["scale"] else np.ones_like(a)
        t = tensors.pop(prev["shift"]) if prev["shift"] else np.zeros_like(a)
        prev["scale"], prev["shift"] = f"{prev['name']}.scale", f"{prev['name']}.shift"
        tensors[prev["scale"]] = s * a
        tensors[prev["shift"]] = t * a + b
        prev["output"] = n["output"]
        prev["folded"] = n["name"]
        nodes.remove(n)


def build(model: nn.Module, input_shape: tuple[int, int, int], strict: bool = True) -> Graph:
    """The deployable graph of ``model`` (in eval mode; its mode is left as it was) for
    inputs of ``input_shape`` (C, H, W).

    ``strict`` (export): every binary layer must already compute with exactly +-1
    weights and sign() inputs. ``strict=False`` (the summary of a model at any stage of
    training) reads soft quantizers as the sign they end in.
    """
    was_training = model.training
    model.eval()  # batch norm's running statistics, as deployed
    try:
        try:
            gm = GraphModule(model, _Tracer().trace(model))
        except Exception as e:  # fx reports untraceable Python control flow in many types
            raise SigngradError(f"the model cannot be traced for export: {e}") from None
        device = next(model.parameters()).device
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, *input_shape, device=device))
        return _Builder(strict).run(gm, list(input_shape))
    finally:
        model.train(was_training)
