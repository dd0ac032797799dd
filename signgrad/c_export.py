"""The C export: a packed network as one dependency-free C99 source and its header, for
firmware and programs without Python.

The source holds the runtime's own kernels (``signgrad/runtime/_kernels_core.h``,
``_kernels_impl.h``, ``_net.h``, pasted in), the network's operation table as the
compiled runtime plans it for one image, its parameters as ``const`` arrays (binary
weights as packed 64-bit words, floats as exact hexadecimal literals), and static
buffers sized here: no heap, no threads, no file or clock. Besides ``memset`` and
``memcpy``, the one library function it calls is ``fmaf`` (libm), in its portable
variant; the compiler makes it one instruction where the target has fused multiply-add
(aarch64; x86-64 with ``-mfma``), and the x86 SIMD variants use the instruction itself.

Because it runs the same code on the same table, its logits are the packed runtime's bit
for bit, on any machine, provided the compiler does not fuse a multiplication and an
addition the code keeps apart: ISO modes (``-std=c99``, ``-std=c11``) never do, and the
source switches fusing off for GCC's GNU modes and for compilers that honour
``#pragma STDC FP_CONTRACT``.
"""

from __future__ import annotations

import keyword
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from signgrad.errors import SigngradError
from signgrad.runtime import network

_INCLUDE = re.compile(r'^#include "(_[a-z_]+\.h)"\s*$', re.M)
_C_KEYWORDS = set(
    "auto break case char const continue default do double else enum extern float for goto "
    "if inline int long register restrict return short signed sizeof static struct switch "
    "typedef union unsigned void volatile while main".split()
)


@dataclass(frozen=True)
class CExport:
    """The two files and what they cost: ``flash`` bytes of tables and weights (the code
    comes on top), ``ram`` bytes of static buffers."""

    name: str
    source: str
    header: str
    flash: int
    ram: int


def check_name(name: str) -> str:
    """``name`` if it can prefix the export's C symbols and name its files."""
    if (
        not isinstance(name, str)
        or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", name)
        or name in _C_KEYWORDS
        or keyword.iskeyword(name)
        or name.startswith("__")
    ):
        raise SigngradError(
            f"C export name {name!r}: it prefixes the C symbols, so it must be a C identifier "
            "(letters, digits, _; not starting with a digit; at most 41 characters)"
        )
    return name


def _kernels_source() -> str:
    """_net.h with the headers it includes pasted in, each inclusion at its place."""
    here = resources.files("signgrad.runtime")

    def expand(text: str) -> str:
        return _INCLUDE.sub(lambda m: expand(here.joinpath(m.group(1)).read_text()), text)

    return expand(here.joinpath("_net.h").read_text())


def _array(ctype: str, name: str, values: np.ndarray, per_line: int, fmt: Any) -> str:
    items = [fmt(v) for v in values.ravel().tolist()]
    lines = [", ".join(items[i : i + per_line]) for i in range(0, len(items), per_line)]
    body = ",\n    ".join(lines) if lines else "0"
    return f"static const {ctype} {name}[{max(1, len(items))}] = {{\n    {body}\n}};\n"


def _float(v: float) -> str:
    return float(np.float32(v)).hex() + "f"


def _floats(values: list[float]) -> str:
    return ", ".join(_float(v) for v in values)


def _c_string(s: str) -> str:
    out = []
    for b in s.encode():
        ch = chr(b)
        out.append(ch if 32 <= b < 127 and ch not in '"\\?' else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def generate(graph: dict[str, Any], tensors: dict[str, np.ndarray], name: str) -> CExport:
    """The C export of a packed model's graph and tensors (checked as a whole first)."""
    from signgrad.runtime.model import plan

    name = check_name(name)
    kernels = _kernels_source()
    up = name.upper()
    ours = [f"{name}_{k}" for k in ("run", "normalise", "class_names", "mean", "std")]
    ours += [f"{up}_{k}" for k in ("IN_C", "IN_H", "IN_W", "CLASSES")] + [f"SIGNGRAD_{up}_H"]
    taken = set(re.findall(r"[A-Za-z_]\w*", kernels)) & set(ours)
    if taken:
        raise SigngradError(
            f"C export name {name!r}: {sorted(taken)[0]} is already a name in the kernels' "
            "source; choose another name"
        )
    # packed tight: a C array's alignment is the compiler's, so padding would only cost
    # flash and RAM
    net = plan(graph, tensors, threads=1, align=False)
    ops = net.table(1)
    c, h, w = (int(d) for d in graph["input"]["shape"])
    classes = [str(k) for k in graph["classes"]]
    pre = graph["preprocess"]
    out_place = net.place[graph["output"]]
    arena, bits = max(1, net.arena_per_image), max(1, net.bits_per_image)
    scratch = max(1, net.scratch_per_thread())
    source = "\n".join(
        [
            f"/* {name}.c: a binary network exported by signgrad ({len(ops)} operations).",
            " * Generated: edit the network, not this file. Its header tells how to call it.",
            " * The kernels below are signgrad's runtime kernels (signgrad/runtime/_net.h and",
            " * the headers it includes). C99; SIMD variants with GCC (NEON also Clang); compile",
            " * with -O2 or -O3. Do not let the compiler fuse multiplications and additions",
            " * (-ffp-contract=fast): the pragmas below switch it off where they are honoured,",
            " * and the ISO modes (-std=c99, -std=c11) never fuse. */",
            "#if defined(__GNUC__) && !defined(__clang__)",
            '#pragma GCC optimize("fp-contract=off")',
            "#else",
            "#pragma STDC FP_CONTRACT OFF",
            "#endif",
            f'#include "{name}.h"',
            "",
            kernels,
            "/* ---------------------------------------------------------------- the network */",
            "",
            f"#define SG_N_OPS {len(ops)}",
            _array("int64_t", "sg_ops", ops, len(network.FIELDS), lambda v: f"{v}LL"),
            _array("float", "sg_fp", net.fp, 6, _float),
            _array("uint64_t", "sg_wp", net.wp, 4, lambda v: f"0x{v:016x}ULL"),
            f"static float sg_arena[{arena}];",
            f"static uint64_t sg_bits[{bits}];",
            f"static int64_t sg_scratch[{scratch}];",
            "",
            f"const char *const {name}_class_names[{up}_CLASSES] = {{",
            "    " + ", ".join(_c_string(k) for k in classes),
            "};",
            f"const float {name}_mean[{up}_IN_C] = {{{_floats(pre['mean'])}}};",
            f"const float {name}_std[{up}_IN_C] = {{{_floats(pre['std'])}}};",
            "",
            f"void {name}_normalise(const unsigned char *pixels, float *input)",
            "{",
            f"    for (int ch = 0; ch < {up}_IN_C; ch++)",
            f"        for (int i = 0; i < {up}_IN_H * {up}_IN_W; i++, pixels++, input++)",
            f"            *input = ((float)*pixels / 255.0f - {name}_mean[ch]) / {name}_std[ch];",
            "}",
            "",
            f"int {name}_run(const float *input, float *logits)",
            "{",
            "    static int checked; /* 1: the table passed net_check, -1: it did not */",
            "    net_t net;",
            "    memset(&net, 0, sizeof net);",
            "    net.ops = sg_ops, net.n_ops = SG_N_OPS;",
            "    net.fp = sg_fp, net.fp_n = (int64_t)(sizeof sg_fp / sizeof sg_fp[0]);",
            "    net.wp = sg_wp, net.wp_n = (int64_t)(sizeof sg_wp / sizeof sg_wp[0]);",
            "    net.arena = sg_arena, net.arena_n = (int64_t)(sizeof sg_arena / sizeof(float));",
            "    net.bits = sg_bits, net.bits_n = (int64_t)(sizeof sg_bits / sizeof sg_bits[0]);",
            f"    net.input = input, net.input_n = {c * h * w};",
            "    net.scratch = sg_scratch;",
            "    net.scratch_stride = (int64_t)(sizeof sg_scratch / sizeof sg_scratch[0]);",
            "    if (!checked) { /* the rows first, then the scratch they need */",
            "        select_impl();",
            "        checked = net_check(&net) == NULL ? 1 : -1;",
            "        const int64_t need = checked > 0 ? net_scratch(&net) : -1;",
            "        if (need < 0 || need > net.scratch_stride) checked = -1;",
            "    }",
            "    if (checked < 0) return -1;",
            "    net.k = impl;",
            "    net_run(&net, 0, 1, NULL, NULL);",
            f"    memcpy(logits, sg_arena + {out_place}, sizeof(float) * {up}_CLASSES);",
            "    return 0;",
            "}",
            "",
        ]
    )
    header = "\n".join(
        [
            f"/* {name}.h: the interface of {name}.c, a binary network exported by signgrad. */",
            f"#ifndef SIGNGRAD_{up}_H",
            f"#define SIGNGRAD_{up}_H",
            "",
            f"#define {up}_IN_C {c} /* input channels */",
            f"#define {up}_IN_H {h} /* input height */",
            f"#define {up}_IN_W {w} /* input width */",
            f"#define {up}_CLASSES {len(classes)}",
            "",
            f"extern const char *const {name}_class_names[{up}_CLASSES];",
            "/* the normalisation of the training data, per channel, on the [0, 1] scale */",
            f"extern const float {name}_mean[{up}_IN_C];",
            f"extern const float {name}_std[{up}_IN_C];",
            "",
            f"/* pixels (C x H x W bytes, channel by channel, 0..255) to the input {name}_run",
            " * takes: (p / 255 - mean) / std, as the training data was normalised */",
            f"void {name}_normalise(const unsigned char *pixels, float *input);",
            "",
            f"/* The logits ({up}_CLASSES floats) of one normalised image: {up}_IN_C x {up}_IN_H x",
            f" * {up}_IN_W floats, channel by channel (PyTorch's layout). Returns 0, or -1 (and",
            " * writes nothing) if the tables were damaged. It works in static buffers: call",
            " * it from one thread at a time. */",
            f"int {name}_run(const float *input, float *logits);",
            "",
            "#endif",
            "",
        ]
    )
    flash = ops.nbytes + net.fp.nbytes + net.wp.nbytes
    ram = 4 * arena + 8 * bits + 8 * scratch
    return CExport(name, source, header, flash, ram)


def driver(name: str) -> str:
    """A program around the export: normalised images (float32, one after another) on
    standard input, their logits (float32) on standard output; exit status 1 if
    ``run`` refuses."""
    up = name.upper()
    return "\n".join(
        [
            "#include <stdio.h>",
            f'#include "{name}.h"',
            "int main(void)",
            "{",
            f"    static float x[{up}_IN_C * {up}_IN_H * {up}_IN_W], y[{up}_CLASSES];",
            "    while (fread(x, sizeof x, 1, stdin) == 1) {",
            f"        if ({name}_run(x, y) != 0) return 1;",
            "        fwrite(y, sizeof y, 1, stdout);",
            "    }",
            "    return 0;",
            "}",
            "",
        ]
    )


def compiler() -> str | None:
    """The host's C compiler (``$CC``, cc, gcc or clang), or None."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def compile_and_run(
    cx: CExport, x: np.ndarray, cc: list[str], run: list[str] | None = None, timeout: float = 600
) -> np.ndarray:
    """Logits of the export on ``x`` (N x C x H x W float32), compiled with the command
    ``cc`` (e.g. ``["cc", "-std=c99", "-O2"]``) with :func:`driver` and run (under
    ``run``, e.g. ``["qemu-aarch64"]``, if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / f"{cx.name}.c").write_text(cx.source)
        (d / f"{cx.name}.h").write_text(cx.header)
        (d / "main.c").write_text(driver(cx.name))
        exe = d / "net"
        cmd = [*cc, str(d / "main.c"), str(d / f"{cx.name}.c"), "-o", str(exe), "-lm"]
        data = np.ascontiguousarray(x, dtype=np.float32).tobytes()
        try:
            built = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if built.returncode != 0:
                tail = " ".join(built.stderr.split())[-300:]
                raise SigngradError(f"the C export did not compile with {' '.join(cc)}: {tail}")
            proc = subprocess.run(
                [*(run or []), str(exe)], input=data, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            raise SigngradError(
                f"building or running the C export took over {e.timeout:g} s"
            ) from None
        if proc.returncode != 0:
            raise SigngradError(f"the compiled C export failed (exit status {proc.returncode})")
        return np.frombuffer(proc.stdout, np.float32).reshape(len(x), -1)
