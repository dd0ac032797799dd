"""What a network costs deployed: per layer the precision of inputs and weights,
parameters per bit width, memory and multiply-accumulates (binary vs float), and in
total the size of the exported packed file against the float-32 equivalent.

It reads the deployable graph (:mod:`signgrad.graph`), so what it counts is what
``signgrad export`` writes: batch norm folded into the layer before it where it can be,
weight scales and full-precision layers as floats. A binary MAC is one of a 1W1A layer
(XNOR + popcount); a 1W32A layer's MACs are float MACs with +-1 weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from signgrad import export, graph


@dataclass
class Row:
    name: str
    op: str
    input_bits: int
    weight_bits: int
    output_shape: list[int]
    params_1bit: int = 0
    params_32bit: int = 0
    macs_binary: int = 0
    macs_float: int = 0

    @property
    def memory(self) -> int:
        """Bytes of this layer's parameters as exported (bits rounded up per layer)."""
        return (self.params_1bit + 7) // 8 + 4 * self.params_32bit


@dataclass
class Summary:
    rows: list[Row] = field(default_factory=list)
    exported_bytes: int = 0
    float_state_dict_bytes: int = 0

    def total(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.rows)

    @property
    def float32_bytes(self) -> int:
        """Every deployed parameter as a 32-bit float."""
        return 4 * (self.total("params_1bit") + self.total("params_32bit"))

    def table(self) -> str:
        head = (
            "layer",
            "op",
            "in bits",
            "w bits",
            "output",
            "1-bit params",
            "32-bit params",
            "memory",
            "binary MACs",
            "float MACs",
        )
        body = [
            (
                r.name,
                r.op,
                str(r.input_bits),
                str(r.weight_bits) if r.weight_bits else "-",
                "x".join(map(str, r.output_shape)),
                f"{r.params_1bit:,}",
                f"{r.params_32bit:,}",
                _size(r.memory),
                f"{r.macs_binary:,}",
                f"{r.macs_float:,}",
            )
            for r in self.rows
        ]
        total = (
            "total",
            "",
            "",
            "",
            "",
            f"{self.total('params_1bit'):,}",
            f"{self.total('params_32bit'):,}",
            _size(self.total("memory")),
            f"{self.total('macs_binary'):,}",
            f"{self.total('macs_float'):,}",
        )
        widths = [max(len(x[i]) for x in [head, *body, total]) for i in range(len(head))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i < 5 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [line(head), line(tuple("-" * w for w in widths)), *map(line, body), line(total)]
        ratio = self.float32_bytes / self.exported_bytes
        out += [
            "",
            f"exported (packed) size: {_size(self.exported_bytes)} ({self.exported_bytes:,} bytes)",
            f"float-32 equivalent:    {_size(self.float32_bytes)} ({self.float32_bytes:,} "
            f"bytes), {ratio:.1f}x the exported size",
            f"float state_dict:       {_size(self.float_state_dict_bytes)} "
            f"({self.float_state_dict_bytes:,} bytes, the training form)",
        ]
        return "\n".join(out) + "\n"


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _count(name: str | None, tensors: dict[str, np.ndarray]) -> int:
    return 0 if name is None else int(tensors[name].size)


def summarize(src: export.Source, strict: bool = False) -> Summary:
    """The summary of ``src``'s model. ``strict=False`` also takes a model whose soft
    quantizers have not reached the exact sign (read as the sign they end in)."""
    g = graph.build(src.model, src.input_shape, strict=strict)
    s = Summary(
        exported_bytes=len(export.packed(src, g)),
        float_state_dict_bytes=export.float_size(src.model),
    )
    t = g.tensors
    for n in g.nodes:
        out_shape = g.shapes[n["output"]]
        op = n["op"]
        if op in ("conv2d", "linear"):
            w = t[n["weight"]]
            in_bits = 1 if n["binary_input"] else 32
            w_bits = 1 if n["binary_weight"] else 32
            macs = int(w.size) * int(np.prod(out_shape[1:], dtype=np.int64))
            floats = _count(n["scale"], t) + _count(n["shift"], t)
            row = Row(
                n["name"] + (f" (+{n['folded']})" if n.get("folded") else ""),
                op,
                in_bits,
                w_bits,
                out_shape,
            )
            if w_bits == 1:
                row.params_1bit, row.params_32bit = int(w.size), floats
            else:
                row.params_32bit = int(w.size) + floats
            if in_bits == 1 and w_bits == 1:
                row.macs_binary = macs
            else:
                row.macs_float = macs
        elif op in ("affine", "prelu"):
            floats = sum(_count(n.get(k), t) for k in ("scale", "shift", "weight"))
            row = Row(n["name"], op, 32, 0, out_shape, params_32bit=floats)
        else:
            continue
        s.rows.append(row)
    return s
