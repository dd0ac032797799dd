"""Hostile packed models: files edited and signed again with the library's own writer (the
checksum is unkeyed, so it proves nothing about intent), run through ``signgrad predict``
in child processes, inside worker threads beside a stack that must stay intact, and in a
structured fuzz campaign where every file is either refused with a SigngradError or runs
to the same logits on the compiled and the numpy backend.

The fuzz campaign runs in a child process (this file run as a script), so a crash shows
as a failed test and not as a dead test runner::

    python tests/test_hostile_models.py fuzz --seed 1 --trials 300 BASE.safetensors...
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import shutil
import subprocess
import sys
import threading
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from signgrad.errors import SigngradError
from signgrad.runtime import format as fmt
from signgrad.runtime import kernels as K
from signgrad.runtime import model as runtime
from signgrad.runtime import network, validate

needs_compiled = pytest.mark.skipif(K.COMPILED is None, reason=f"no kernels: {K.UNAVAILABLE}")
Doc = dict[str, Any]
Tensors = dict[str, np.ndarray]

# ------------------------------------------------------------------------ base models


def _packed(model: Any, shape: tuple[int, int, int], classes: int = 10) -> bytes:
    from signgrad import export

    c = shape[0]
    src = export.Source(
        model.eval(), shape, [f"class{i}" for i in range(classes)], [0.5] * c, [0.25] * c, {}
    )
    return export.packed(src)


def convnet_bytes() -> bytes:
    """A 1W1A ConvNet on 1 x 8 x 8 (float stem and classifier), untrained."""
    import torch

    from signgrad import convert, models

    torch.manual_seed(0)
    m = models.get("convnet", num_classes=10, in_channels=1, image_size=8, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    return _packed(m, (1, 8, 8))


def resnet20_bytes() -> bytes:
    """A binary ResNet-20 (option-A shortcuts, residual adds) on 3 x 8 x 8, untrained."""
    import torch

    from signgrad import convert, models

    torch.manual_seed(1)
    m = models.get("resnet20", num_classes=10, in_channels=3, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    return _packed(m, (3, 8, 8))


def mixed_bytes() -> bytes:
    """The ops the two above lack: an unfolded batch norm (affine), PReLU, ReLU, average
    pooling with padding, a binary linear layer and a batch norm after it."""
    import torch
    from torch import nn

    from signgrad import layers

    torch.manual_seed(2)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(16),  # after a pool: stays an affine
        nn.PReLU(16),
        layers.BinaryConv2d(16, 24, 3, padding=1, weight_quantizer="bnn", input_quantizer="bnn"),
        nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.Flatten(),
        layers.BinaryLinear(24 * 2 * 2, 16, weight_quantizer="bnn", input_quantizer="bnn"),
        nn.BatchNorm1d(16),
        nn.Hardtanh(),
        nn.Linear(16, 10),
    )
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return _packed(m, (3, 8, 8))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The base files the crafted and fuzzed files start from."""
    d = tmp_path_factory.mktemp("bases")
    out = {}
    for name, make in (
        ("convnet", convnet_bytes),
        ("resnet20", resnet20_bytes),
        ("mixed", mixed_bytes),
    ):
        out[name] = d / f"{name}.safetensors"
        out[name].write_bytes(make())
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def decoded(path: Path) -> tuple[Doc, Tensors]:
    return fmt.read_bytes(path.read_bytes())


def signs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.where(rng.random(shape) < 0.5, 1.0, -1.0).astype(np.float32)


def set_binary(doc: Doc, tensors: Tensors, name: str, shape: tuple[int, ...]) -> None:
    """Replace binary weight ``name`` by random packed signs of ``shape``: declared and
    stored agree, as a careful forger would make them (straight as bytes: some are huge)."""
    k = math.prod(shape[1:])
    packed = np.random.default_rng(k).integers(0, 256, (shape[0], (k + 7) // 8), np.uint8)
    if k % 8:
        packed[:, -1] &= (1 << (k % 8)) - 1  # the unused bits stay 0
    tensors[name] = packed
    doc["binary_tensors"][name] = list(shape)


def node(doc: Doc, name: str) -> Doc:
    return next(n for n in doc["nodes"] if n["name"] == name)


def single_conv_doc(c: int, o: int, k: int, pad: int, size: int = 8) -> tuple[Doc, Tensors]:
    """A graph of one binary conv (c -> o, k x k, padding pad) on c x size x size, then a
    global average pool and a float linear classifier of 10 classes."""
    doc = {
        "input": {"name": "x", "shape": [c, size, size]},
        "output": "fc",
        "nodes": [
            {
                "op": "conv2d",
                "name": "conv",
                "inputs": ["x"],
                "output": "conv",
                "binary_input": True,
                "binary_weight": True,
                "in_channels": c,
                "out_channels": o,
                "kernel": [k, k],
                "stride": [1, 1],
                "padding": [pad, pad],
                "weight": "conv.w",
                "scale": "conv.s",
                "shift": None,
            },
            {"op": "global_avgpool", "name": "gap", "inputs": ["conv"], "output": "gap"},
            {"op": "flatten", "name": "flat", "inputs": ["gap"], "output": "flat"},
            {
                "op": "linear",
                "name": "fc",
                "inputs": ["flat"],
                "output": "fc",
                "binary_input": False,
                "binary_weight": False,
                "in_features": o,
                "out_features": 10,
                "weight": "fc.w",
                "scale": None,
                "shift": None,
            },
        ],
        "binary_tensors": {},
        "preprocess": {"mean": [0.5] * c, "std": [0.25] * c},
        "classes": [str(i) for i in range(10)],
        "source": {},
    }
    rng = np.random.default_rng(k)
    tensors = {
        "conv.s": np.full(o, 1.0 / (k * k * c), np.float32),
        "fc.w": rng.standard_normal((10, o)).astype(np.float32),
    }
    set_binary(doc, tensors, "conv.w", (o, c, k, k))
    return doc, tensors


def signed(tensors_with_graph: dict[str, np.ndarray]) -> bytes:
    """A file with a valid checksum over tensors that include a hand-made ``__graph__``
    (what :func:`fmt.to_bytes` writes, without compressing a graph of ours)."""
    from safetensors.numpy import save

    meta = {
        "format": fmt.FORMAT,
        "version": str(fmt.VERSION),
        "sha256": fmt._digest(tensors_with_graph),
    }
    return save(tensors_with_graph, metadata=meta)


def zip_bomb(tensors: Tensors, inflated: int) -> bytes:
    """A signed file whose graph is ``inflated`` bytes of JSON (mostly one long string),
    compressed to a small fraction of that."""
    z = zlib.compressobj(9)
    parts = [z.compress(b'{"source": "')]
    chunk = b" " * (1 << 24)
    for _ in range(inflated >> 24):
        parts.append(z.compress(chunk))
    parts += [z.compress(b'"}'), z.flush()]
    blob = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return signed({**tensors, fmt.GRAPH_TENSOR: blob})


def raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


# ------------------------------------------------------------------ crafted hostile files

# name -> (base, edit(doc, tensors) -> None, a fragment of the one-line error)
Edit = Callable[[Doc, Tensors], None]


def _kernel_600(doc: Doc, t: Tensors) -> None:
    # The audit's 600 x 600 kernel, declared and stored consistently (23 MB of signs).
    conv = node(doc, "conv2")
    conv["kernel"] = [600, 600]
    set_binary(doc, t, "conv2.weight", (32, 16, 600, 600))


def _outputs_1500001(doc: Doc, t: Tensors) -> None:
    # 1,500,001 outputs of a binary classifier: its accumulators used to be a stack array.
    fc = node(doc, "fc")
    fc.update(binary_input=True, binary_weight=True, out_features=1_500_001, shift=None)
    set_binary(doc, t, "fc.weight", (1_500_001, 64))


def _channels_same_words(doc: Doc, t: Tensors) -> None:
    # 40 input channels where the value has 32: both fit one 64-bit word, so the compiled
    # kernel would have run it and answered confidently.
    conv = node(doc, "conv3")
    conv["in_channels"] = 40
    set_binary(doc, t, "conv3.weight", (64, 40, 3, 3))


def _insert_affine(doc: Doc, t: Tensors) -> None:
    i = doc["nodes"].index(node(doc, "conv2"))
    doc["nodes"].insert(
        i,
        {
            "op": "affine",
            "name": "bn_extra",
            "inputs": ["act1"],
            "output": "bn_extra",
            "scale": "bn_extra.s",
            "shift": "bn_extra.t",
        },
    )
    node(doc, "conv2")["inputs"] = ["bn_extra"]
    t["bn_extra.s"] = np.ones(15, np.float32)  # 16 channels
    t["bn_extra.t"] = np.zeros(15, np.float32)


def _prelu_5(doc: Doc, t: Tensors) -> None:
    act = node(doc, "act1")
    for key in ("min", "max"):
        del act[key]
    act.update(op="prelu", weight="act1.weight")
    t["act1.weight"] = np.full(5, 0.25, np.float32)


def _set(name: str, key: str, value: Any) -> Edit:
    def edit(doc: Doc, t: Tensors) -> None:
        node(doc, name)[key] = value

    return edit


def _doc_set(path: tuple[str, ...], value: Any) -> Edit:
    def edit(doc: Doc, t: Tensors) -> None:
        obj = doc
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return edit


def _tensor_edit(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Edit:
    def edit(doc: Doc, t: Tensors) -> None:
        t[name] = fn(t[name])

    return edit


def _nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[0] = np.nan
    return a


def _deep_json(doc: Doc, t: Tensors) -> None:
    doc["source"] = "__DEEP__"  # replaced by crafted_bytes: json.dumps would not nest so deep


def _pad_mismatch(doc: Doc, t: Tensors) -> None:
    short = next(n for n in doc["nodes"] if n["op"] == "shortcut_a")
    short["pad_after"] += 1


def _redefined(doc: Doc, t: Tensors) -> None:
    node(doc, "act2")["output"] = "act1"


CRAFTED: dict[str, tuple[str, Edit, str]] = {
    "kernel-600x600": ("convnet", _kernel_600, "kernel 600 x 600 is larger than its padded"),
    "1500001-outputs": ("convnet", _outputs_1500001, "not N x 10 for its 10 classes"),
    "channels-fit-same-words": ("convnet", _channels_same_words,
                                "in_channels is 40, but its input 'pool2' has 32"),
    "stride-0": ("convnet", _set("conv2", "stride", [0, 1]), "stride must be an integer"),
    "stride-negative": ("convnet", _set("pool2", "stride", [-2, -2]), "stride must be"),
    "shortcut-stride-0": ("resnet20", lambda d, t: next(
        n for n in d["nodes"] if n["op"] == "shortcut_a").update(stride=0), "stride must be"),
    "padding-negative": ("convnet", _set("conv2", "padding", [-1, -1]), "padding must be"),
    "pool-kernel-0": ("convnet", _set("pool2", "kernel", [0, 0]), "kernel must be"),
    "pool-padding-over-half": ("convnet", _set("pool2", "padding", [2, 2]),
                               "more than half the kernel"),
    "affine-wrong-length": ("convnet", _insert_affine, "has shape (15,), not (16,)"),
    "prelu-wrong-length": ("convnet", _prelu_5, "5 slopes for 16 channels"),
    "scale-wrong-length": ("convnet", _tensor_edit("conv2.scale", lambda a: a[:31]),
                           "scale of layer 'conv2' (conv2d) has shape (31,), not (32,)"),
    "short-class-list": ("convnet", _doc_set(("classes",), [str(i) for i in range(9)]),
                         "not N x 9 for its 9 classes"),
    "class-not-a-string": ("convnet", _doc_set(("classes",), [3] + [str(i) for i in range(9)]),
                           "classes must be a list of class names"),
    "std-0": ("convnet", _doc_set(("preprocess", "std"), [0.0]), "std must be positive"),
    "mean-nan": ("convnet", _doc_set(("preprocess", "mean"), [float("nan")]),
                 "must be a finite number"),
    "crop-above-1": ("convnet", _doc_set(("preprocess", "crop"), 1.5), "crop must be in (0, 1]"),
    "crop-string": ("convnet", _doc_set(("preprocess", "crop"), "0.875"), "must be a"),
    "huge-declared-binary-shape": ("convnet", _doc_set(("binary_tensors", "conv2.weight"),
                                   [32, 16, 3000, 3000]), "is declared [32, 16, 3000, 3000]"),
    "input-shape-string": ("convnet", _doc_set(("input", "shape"), ["1", 8, 8]),
                           "must be an integer"),
    "stride-bool": ("convnet", _set("conv2", "stride", [True, True]), "must be an integer"),
    "stride-float": ("convnet", _set("conv2", "stride", [1.0, 1.0]), "must be an integer"),
    "nan-shift": ("convnet", _tensor_edit("conv1.shift", _nan), "holds NaN or infinite"),
    "float64-weight": ("convnet", _tensor_edit("fc.weight", lambda a: a.astype(np.float64)),
                       "is float64, not float32"),
    "hardtanh-min-over-max": ("convnet", _set("act1", "min", 2.0), "min 2.0 is above max"),
    "add-shapes-differ": ("resnet20", _pad_mismatch, "the shapes must be equal"),
    "value-written-twice": ("convnet", _redefined, "is already computed"),
    "linear-on-a-map": ("convnet", lambda d, t: node(d, "fc").update(inputs=["gap"]),
                        "takes N x features input"),
    "json-nested-too-deep": ("convnet", _deep_json, "no readable graph: RecursionError"),
}  # fmt: skip


def crafted_bytes(bases: dict[str, Path], case: str) -> bytes:
    base, edit, _ = CRAFTED[case]
    doc, tensors = decoded(bases[base])
    edit(doc, tensors)
    blob = fmt.to_bytes(doc, tensors)
    if doc.get("source") == "__DEEP__":  # JSON nested deeper than Python's parser goes
        text = json.dumps(doc).replace('"__DEEP__"', "[" * 100_000 + "]" * 100_000)
        tensors = {
            **tensors,
            fmt.GRAPH_TENSOR: np.frombuffer(zlib.compress(text.encode()), dtype=np.uint8),
        }
        blob = signed(tensors)
    return blob


def assert_refused_by_predict(run_child, one_line_error, path: Path, image: Path, fragment: str):
    proc = run_child("predict", path, image, "--backend", "compiled", timeout=120)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}"
    one_line_error(proc, fragment)


@needs_compiled
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_file_is_refused_by_predict(
    case, bases, image, tmp_path, run_child, one_line_error
):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(crafted_bytes(bases, case))
    # In this process too: a SigngradError at load, on both backends, nothing else.
    for backend in ("numpy", "compiled"):
        with pytest.raises(
            SigngradError,
            match=CRAFTED[case][2].replace("(", r"\(").replace(")", r"\)").replace("[", r"\["),
        ):
            runtime.load(path, backend=backend)
    assert_refused_by_predict(run_child, one_line_error, path, image, CRAFTED[case][2])


@needs_compiled
def test_zip_bomb_graph_is_refused_before_inflating(
    bases, image, tmp_path, run_child, one_line_error
):
    _, tensors = decoded(bases["convnet"])
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(zip_bomb(tensors, 256 << 20))
    assert path.stat().st_size < (1 << 20)  # a small file...
    with pytest.raises(SigngradError, match="inflates to more than 16 MiB"):
        runtime.load(path)  # ...that would inflate to 256 MiB
    assert_refused_by_predict(run_child, one_line_error, path, image, "inflates to more than")


@needs_compiled
def test_foreign_dtypes_and_bogus_headers_are_refused(tmp_path, image, run_child, one_line_error):
    cases = {
        "bf16": (
            raw_safetensors(
                {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)
            ),
            "tensor dtype 'BF16' is not supported",
        ),
        "huge-shape": (
            raw_safetensors(
                {"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, bytes(4)
            ),
            "not a readable packed model",
        ),
        "deep-header": (
            (50_000).to_bytes(8, "little") + b"[" * 50_000,
            "not a readable packed model",
        ),
    }
    for name, (blob, fragment) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        with pytest.raises(SigngradError, match="readable packed model|not supported"):
            runtime.load(path)
        assert_refused_by_predict(run_child, one_line_error, path, image, fragment)


def test_graphs_needing_too_much_activation_memory_are_refused():
    # A legitimate-looking 600 x 600 kernel padded by 300 on 16 channels: its im2col
    # patches alone would be 1.9 GB per image.
    doc, tensors = single_conv_doc(16, 8, 600, 300)
    with pytest.raises(SigngradError, match=r"needs 1\.\d GiB of activations per image"):
        runtime.build(doc, tensors, backend="numpy")
    # A huge input is refused the same way, with the size it would need.
    doc, tensors = decoded_convnet()
    doc["input"]["shape"] = [1, 20000, 20000]
    with pytest.raises(SigngradError, match="GiB of activations per image"):
        runtime.build(doc, tensors, backend="numpy")


def decoded_convnet() -> tuple[Doc, Tensors]:
    return fmt.read_bytes(convnet_bytes())


# ------------------------------------------------------------- the kernels in threads


STACK_GUARD_C = r"""
#include <unistd.h>
/* Fills 1 MiB of this thread's stack with a pattern, says so, waits for *go, and returns
 * how many bytes of the pattern changed meanwhile (another thread's overflow). */
long hold_pattern(volatile int *ready, volatile int *go)
{
    volatile unsigned char buf[1 << 20];
    for (long i = 0; i < (long)sizeof buf; i++) buf[i] = (unsigned char)(i * 131 + 7);
    *ready = 1;
    while (!*go) usleep(1000);
    long bad = 0;
    for (long i = 0; i < (long)sizeof buf; i++) bad += buf[i] != (unsigned char)(i * 131 + 7);
    return bad;
}
"""


@pytest.fixture(scope="module")
def stack_guard(tmp_path_factory) -> Path:
    """The helper library of :data:`STACK_GUARD_C`, compiled for this test."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stack guard helper")
    d = tmp_path_factory.mktemp("guard")
    (d / "guard.c").write_text(STACK_GUARD_C)
    subprocess.run(
        [cc, "-O1", "-shared", "-fPIC", "-o", d / "guard.so", d / "guard.c"],
        check=True,
        capture_output=True,
    )
    return d / "guard.so"


def reference_bconv(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """conv(sign(x), w) with zero padding, stride 1, by direct sums (x NHWC, w OCKK)."""
    n, h, wd, c = x.shape
    o, _, k, _ = w.shape
    ho, wo = h + 2 * pad - k + 1, wd + 2 * pad - k + 1
    s = K.sign(x)
    out = np.zeros((n, ho, wo, o), np.float64)
    for oy in range(ho):
        for ox in range(wo):
            for iy in range(h):
                for ix in range(wd):
                    ky, kx = iy + pad - oy, ix + pad - ox
                    if 0 <= ky < k and 0 <= kx < k:
                        out[:, oy, ox] += s[:, iy, ix] @ w[:, :, ky, kx].T
    return out.astype(np.float32)


def huge_kernel_and_outputs() -> list[str]:
    """What the worker thread runs: the kernels on shapes whose scratch used to live on
    the stack. Returns what went wrong (nothing, when the kernels are right)."""
    problems = []
    # 600 x 600 taps (2 x 2.9 MB of offsets per thread), 8 outputs: the AVX-512 path.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 4, 1)).astype(np.float32)
    w = signs((8, 1, 600, 600), seed=6)
    ones, zeros, act_args = np.ones(8, np.float32), np.zeros(8, np.float32), (0.0, 0.0, None)
    xb, wb = K.pack_words(x, 2), K.pack_weight_words(w)
    y, _ = K.bconv2d(
        xb, wb, 1, (600, 600), (1, 1), (300, 300), ones, zeros, None, None, act_args, False, 2
    )
    if not np.array_equal(y, reference_bconv(x, w, 300)):
        problems.append("600 x 600 kernel: wrong output")
    # 1,500,001 outputs (12 MB of accumulators per thread): the portable path.
    o = 1_500_001
    w = signs((o, 1, 1, 1), seed=7)
    x = np.full((1, 1, 1, 1), -0.5, np.float32)
    xb, wb = K.pack_words(x, 2), K.pack_weight_words(w)
    ones, zeros = np.ones(o, np.float32), np.zeros(o, np.float32)
    y, bits = K.bconv2d(
        xb, wb, 1, (1, 1), (1, 1), (0, 0), ones, zeros, None, "relu", act_args, True, 2
    )
    if not np.array_equal(y.ravel(), np.maximum(-w.ravel(), 0)):
        problems.append("1,500,001 outputs: wrong output")
    if bits.shape != (1, 1, 1, (o + 63) // 64):
        problems.append("1,500,001 outputs: wrong bits shape")
    return problems


def threads_campaign(path: Path, guard: Path) -> dict[str, Any]:
    """In a worker thread: load the crafted 600 x 600 file, run a valid 600 x 600 model on
    both backends and the kernels on huge scratch shapes, while a neighbour thread holds a
    pattern on its stack. Returns what the worker saw and how many bytes of the pattern
    changed."""
    lib = ctypes.CDLL(str(guard))  # CDLL calls release the GIL
    lib.hold_pattern.restype = ctypes.c_long
    valid_doc, valid_tensors = single_conv_doc(1, 8, 600, 300)  # 116 MB of im2col: allowed
    ready, go = ctypes.c_int(0), ctypes.c_int(0)
    bad: list[int] = []
    neighbour = threading.Thread(
        target=lambda: bad.append(lib.hold_pattern(ctypes.byref(ready), ctypes.byref(go)))
    )
    neighbour.start()
    seen: list[str] = []

    def work() -> None:
        try:
            try:
                runtime.load(path, backend="compiled", threads=2)
                seen.append("the crafted file loaded")
            except SigngradError as e:
                seen.append(f"refused: {e}")
            x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
            got = runtime.build(valid_doc, valid_tensors, backend="compiled", threads=2).run(x)
            want = runtime.build(valid_doc, valid_tensors, backend="numpy").run(x)
            if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
                seen.append("valid 600 x 600 model: compiled differs from numpy")
            seen.extend(huge_kernel_and_outputs())
        except BaseException:  # reported, not lost in the thread
            seen.append(traceback.format_exc())

    while not ready.value:
        threading.Event().wait(0.001)
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    go.value = 1
    neighbour.join()
    return {"seen": seen, "bad": bad}


@needs_compiled
def test_hostile_file_and_huge_kernels_in_a_worker_thread_leave_the_neighbour_intact(
    bases, tmp_path, stack_guard
):
    path = tmp_path / "k600.safetensors"
    path.write_bytes(crafted_bytes(bases, "kernel-600x600"))
    # In a child process: the stack overflow this guards against killed the process.
    proc = subprocess.run(
        [sys.executable, __file__, "threads", str(path), str(stack_guard)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode >= 0, f"the child died of signal {-proc.returncode}"
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = result["seen"]
    assert seen and seen[0].startswith("refused: packed model: layer 'conv2' (conv2d): kernel")
    assert seen[1:] == []
    assert result["bad"] == [0]  # not one byte of the neighbour's stack changed


@needs_compiled
def test_the_kernel_glue_checks_sizes_and_threads_itself():
    """Defence in depth: the C entry points refuse what Python-side checks would have
    caught, with a ValueError rather than a wild read or write."""
    x = np.zeros((1, 1, 1, 1), np.uint64)
    w = np.zeros((1, 1, 1, 8), np.uint64)
    v = np.zeros(8, np.float32)
    out = np.zeros((1, 1, 1, 8), np.float32)

    def call(dims=(1, 1, 1, 1, 8), kernel=(1, 1, 1, 1), pad=(0, 0), threads=1, **bufs):
        b = {"x": x, "w": w, "out": out, **bufs}
        act = (0, 0.0, 0.0, None)  # no activation: its code, lo, hi, slope
        K._kernels.bconv2d(
            b["x"], b["w"], dims, kernel, pad, v, v, None, *act, b["out"], None, threads
        )

    call()  # the well-formed call
    for bad in (
        {"threads": 100_000},
        {"threads": 0},
        {"dims": (1, 2**30, 2**30, 2**30, 8)},  # sizes overflow
        {"dims": (1, 1, 1, 2**31 - 1, 8)},  # channel words overflow an int
        {"kernel": (2**16, 2**16, 1, 1), "pad": (2**15, 2**15)},  # taps overflow
        {"pad": (2**30, 2**30)},  # the padded input overflows an int
        {"kernel": (3, 3, 1, 1)},  # larger than the input
        {"w": np.zeros((1, 1, 1, 7), np.uint64)},  # wrong buffer sizes
        {"out": np.zeros((1, 1, 1, 7), np.float32)},
    ):
        with pytest.raises(ValueError):
            call(**bad)
    with pytest.raises(ValueError):
        K._kernels.pack_signs(np.zeros(4, np.float32), 2**62, np.zeros(1, np.uint64), 2, 1)
    with pytest.raises(ValueError):
        K._kernels.pack_signs(np.zeros(4, np.float32), 1, np.zeros(1, np.uint64), 4, 5000)


@needs_compiled
def test_the_network_glue_checks_every_row_against_its_buffers(bases):
    """run_net trusts no row of its table: an edit that would reach outside the buffers it
    was handed, or make the shapes disagree, is a ValueError before anything runs; an edit
    it accepts (a field the row does not use, a place still inside) writes nowhere else:
    guard zones around the arena and the bits stay untouched."""
    net = runtime.load(bases["mixed"], backend="compiled", threads=1).network
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ops, arena, bits = net._for_batch(2)
    guard = 4096
    arena_all = np.full(arena.size + 2 * guard, 7.0, np.float32)
    bits_all = np.full(bits.size + 2 * guard, 7, np.uint64)
    arena, bits = arena_all[guard:-guard], bits_all[guard:-guard]
    col = {name: i for i, name in enumerate(network.FIELDS)}
    args = (net.fp, net.wp, arena, bits, x, 1, None)
    K.run_net(ops, *args)
    kinds = {int(r[0]) for r in ops}
    assert {network.CONV, network.BCONV, network.PACK} <= kinds and len(kinds) >= 6
    edits = [
        ("x", 10**9), ("y", arena.size), ("y", -2), ("res", arena.size - 1), ("wt", net.wp.size),
        ("scale", net.fp.size), ("shift", -5), ("bits", bits.size), ("n", 3), ("n", 0),
        ("c", 4096), ("o", 1 << 31), ("ho", 1), ("kh", 0), ("sh", -1), ("ph", 1 << 40),
        ("act", 7), ("actp", net.fp.size - 1), ("op", 99), ("flags", 2), ("h", 1 << 20),
    ]  # fmt: skip
    refused = 0
    for i in range(len(ops)):
        for field, value in edits:
            bad = ops.copy()
            bad[i, col[field]] = value
            try:
                K.run_net(bad, *args)
            except ValueError as e:
                assert str(e).startswith("run_net: "), e
                refused += 1
            else:
                assert (field, value) not in (("op", 99), ("y", -2), ("n", 0)), (i, field)
            for zone in (arena_all[:guard], arena_all[-guard:]):
                assert np.all(zone == 7.0), (i, field, value)
            for zone in (bits_all[:guard], bits_all[-guard:]):
                assert np.all(zone == 7), (i, field, value)
    assert refused > len(ops) * len(edits) // 2, refused
    for bad_args in (
        (net.fp, net.wp, arena, bits, x, 1, np.zeros(1)),  # times: one per row
        (net.fp, net.wp, arena, bits, x[:1], 1, None),  # the input of another batch
        (net.fp, net.wp, arena[:-1], bits, x, 1, None),  # an arena too small
        (net.fp, net.wp, arena, bits, x, 5000, None),  # threads
    ):
        with pytest.raises(ValueError, match="run_net"):
            K.run_net(ops, *bad_args)


@needs_compiled
def test_threads_give_the_same_bits_and_none_outlive_the_call(bases):
    """A forward pass on 1 or 2 threads computes every output in the same order, and the
    threads of a call are gone when it returns: nothing idles or spins between calls."""
    x = np.random.default_rng(5).standard_normal((64, 3, 8, 8)).astype(np.float32)
    tasks = Path("/proc/self/task")
    before = len(list(tasks.iterdir())) if tasks.is_dir() else None
    one = runtime.load(bases["resnet20"], backend="compiled", threads=1)
    two = runtime.load(bases["resnet20"], backend="compiled", threads=2)
    two.network.threads_for = lambda n: 2  # whatever the work: two threads
    assert np.array_equal(one.run(x), two.run(x))
    if before is not None:
        assert len(list(tasks.iterdir())) == before


# --------------------------------------------------------------------------- threads


@needs_compiled
def test_absurd_thread_counts_are_one_line_errors(bases, image, run_child, one_line_error):
    proc = run_child("predict", bases["convnet"], image, "--threads", "100000")
    assert proc.returncode >= 0
    one_line_error(proc, "threads must be an integer from 1 to", "got 100000")
    for bad in (0, -3, 100_000, runtime.max_threads() + 1, True, 2.0, "2"):
        with pytest.raises(SigngradError, match="threads must be an integer"):
            runtime.load(bases["convnet"], threads=bad)
    assert runtime.load(bases["convnet"], threads=runtime.max_threads()).threads > 0
    assert runtime.max_threads() <= runtime.MAX_THREADS


# ------------------------------------------------------------------- input checks


def test_run_and_predict_check_their_input(bases):
    pm = runtime.load(bases["convnet"], backend="numpy")
    ok = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    assert pm.run(ok).shape == (3, 10)
    assert pm.run(ok.astype(np.float64)).shape == (3, 10)  # any real dtype runs as float32
    assert pm.run(np.zeros((0, 1, 8, 8), np.float32)).shape == (0, 10)
    assert pm.predict(np.zeros((0, 1, 8, 8), np.uint8)).shape == (0, 10)
    for bad, fragment in (
        ([[0.0]], "takes a numpy array"),
        (ok.astype(np.complex64), "takes real numbers"),
        (ok > 0, "takes real numbers"),
        (ok.astype(object), "takes real numbers"),
        (ok[0], "this model takes N x 1 x 8 x 8"),
        (np.where(ok > 1, np.nan, ok), "NaN or infinite"),
        (np.where(ok > 1, np.inf, ok), "NaN or infinite"),
        (np.full((1, 1, 8, 8), 1e300), "beyond float32"),
    ):
        with pytest.raises(SigngradError, match=fragment):
            pm.run(bad)
    images = np.random.default_rng(1).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    probs = pm.predict(images, batch_size=3)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    for bad in (
        images / 255.0,
        images.astype(np.int16),
        images > 0,
        images.astype(np.complex64),
        images.tolist(),
    ):
        with pytest.raises(SigngradError, match=r"takes uint8 images .* 0\.\.255.*run\(\)"):
            pm.predict(bad)
    with pytest.raises(SigngradError, match="this model takes N x 1 x 8 x 8"):
        pm.predict(images[:, :, :4])
    with pytest.raises(SigngradError, match="batch_size must be a positive integer"):
        pm.predict(images, batch_size=0)


def test_an_unedited_file_still_checks_and_runs_on_both_backends(bases):
    for name, path in bases.items():
        doc, tensors = decoded(path)
        checked = validate.check(doc, tensors)
        assert checked.shapes[doc["output"]] == (10,), name
        assert 0 < checked.image_bytes < (1 << 20), name
        x = np.random.default_rng(2).standard_normal((2, 3 if name != "convnet" else 1, 8, 8))
        outs = [runtime.load(path, backend=b).run(x.astype(np.float32)) for b in K_BACKENDS]
        assert all(np.allclose(o, outs[0], rtol=1e-5, atol=1e-4) for o in outs), name


K_BACKENDS = ["numpy"] + (["compiled"] if K.COMPILED else [])

# --------------------------------------------------------------------------- fuzzing

_INTS = [0, -1, -7, 1, 2, 3, 5, 64, 2**31 - 1, 2**31, 2**63, 10**12]
_NOT_INTS = [1.5, 2.0, float("nan"), float("inf"), "3", True, False, None, [], {}, [1], [1, 1, 1]]
INT_LIKE = _INTS + _NOT_INTS


def _mutate_value(rng: np.random.Generator, v: Any) -> Any:
    if isinstance(v, list) and v and rng.random() < 0.6:
        v = list(v)
        i = int(rng.integers(len(v)))
        v[i] = _mutate_value(rng, v[i])
        return v
    if _is_plain_int(v) and rng.random() < 0.5:
        return [v + 1, v - 1, v * 2, -v, v // 2, v + 64][int(rng.integers(6))]
    if isinstance(v, float) and rng.random() < 0.5:
        return [v * 2, -v, v + 0.5, 0.0, 1e38, 1e-40][int(rng.integers(6))]
    if isinstance(v, str) and rng.random() < 0.5:
        return [v + "_", "", "\0", "x"][int(rng.integers(4))]
    return copy.deepcopy(INT_LIKE[int(rng.integers(len(INT_LIKE)))])


def _is_plain_int(v: Any) -> bool:
    return type(v) is int


def _pick(rng: np.random.Generator, seq: list[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def mutate(rng: np.random.Generator, doc: Doc, t: Tensors) -> str:
    """One random edit of the graph or its tensors; returns what it did."""
    nodes = doc["nodes"]
    kinds = ["field", "field", "field", "drop", "nodes", "op", "rewire", "input", "binary"]
    kinds += ["tensor", "tensor", "classes", "preprocess", "channels", "benign", "benign"]
    kind = _pick(rng, kinds)
    if kind == "field" and nodes:
        n = _pick(rng, nodes)
        key = _pick(rng, sorted(n))
        n[key] = _mutate_value(rng, n[key])
        return f"field {n.get('name')}.{key} = {n[key]!r:.40}"
    if kind == "drop":
        obj = _pick(rng, [doc, doc["input"], doc["preprocess"], *nodes])
        if isinstance(obj, dict) and obj:
            key = _pick(rng, sorted(obj))
            del obj[key]
            return f"drop {key}"
    if kind == "nodes" and len(nodes) > 1:
        i, j = (int(v) for v in rng.integers(len(nodes), size=2))
        how = _pick(rng, ["swap", "delete", "duplicate"])
        if how == "swap":
            nodes[i], nodes[j] = nodes[j], nodes[i]
        elif how == "delete":
            del nodes[i]
        else:
            nodes.insert(j, copy.deepcopy(nodes[i]))
        return f"nodes {how} {i} {j}"
    if kind == "op" and nodes:
        n = _pick(rng, nodes)
        n["op"] = _pick(rng, list(fmt.OPS))
        return f"op {n['name']} -> {n['op']}"
    if kind == "rewire" and nodes:
        n = _pick(rng, nodes)
        values = [doc["input"]["name"], *(m["output"] for m in nodes), "nowhere"]
        if isinstance(n.get("inputs"), list) and n["inputs"]:
            n["inputs"][int(rng.integers(len(n["inputs"])))] = _pick(rng, values)
        if rng.random() < 0.3:
            n["output"] = _pick(rng, values)
        return f"rewire {n.get('name')}"
    if kind == "input":
        doc["input"]["shape"] = _mutate_value(rng, doc["input"]["shape"])
        return f"input shape {doc['input']['shape']!r:.40}"
    if kind == "binary" and doc["binary_tensors"]:
        name = _pick(rng, sorted(doc["binary_tensors"]))
        doc["binary_tensors"][name] = _mutate_value(rng, doc["binary_tensors"][name])
        return f"binary shape {name} {doc['binary_tensors'][name]!r:.40}"
    if kind == "tensor" and t:
        name = _pick(rng, sorted(t))
        a = t[name]
        how = _pick(rng, ["shrink", "grow", "flatten", "dtype", "nan", "inf", "drop", "rows"])
        if how == "shrink" and a.ndim and a.shape[-1] > 1:
            t[name] = np.ascontiguousarray(a[..., :-1])
        elif how == "grow" and a.ndim:
            t[name] = np.concatenate([a, a[..., :1]], axis=-1)
        elif how == "rows" and a.ndim and a.shape[0] > 1:
            t[name] = np.ascontiguousarray(a[:-1])
        elif how == "flatten":
            t[name] = a.reshape(-1)
        elif how == "dtype":
            t[name] = a.astype(
                _pick(rng, [np.float64, np.float16, np.int32, np.uint8, np.float32, np.int8])
            )
        elif how in ("nan", "inf") and a.dtype == np.float32 and a.size:
            a = a.copy()
            a.flat[int(rng.integers(a.size))] = np.nan if how == "nan" else -np.inf
            t[name] = a
        elif how == "drop":
            del t[name]
        return f"tensor {name} {how}"
    if kind == "classes":
        c = doc["classes"]
        doc["classes"] = _pick(rng, [c[:-1], [*c, "extra"], [1, *c[1:]], "abc", None, c])
        return "classes"
    if kind == "preprocess":
        key = _pick(rng, ["mean", "std"])
        doc["preprocess"][key] = _mutate_value(rng, doc["preprocess"][key])
        return f"preprocess {key} {doc['preprocess'][key]!r:.40}"
    if kind == "channels":
        # A forger's consistent edit: another channel count, declared and stored alike.
        convs = [n for n in nodes if n.get("binary_weight") is True and n.get("weight") in t]
        if convs:
            n = _pick(rng, convs)
            key = "in_channels" if n["op"] == "conv2d" else "in_features"
            shape = list(doc["binary_tensors"].get(n["weight"], []))
            if small_binary(shape) and _is_plain_int(n.get(key)):
                n[key] = shape[1] = max(1, shape[1] + _pick(rng, [-1, 1, 8, -8]))
                set_binary(doc, t, n["weight"], tuple(shape))
                return f"channels {n['name']} -> {shape[1]}"
    if kind == "benign":
        return benign(rng, doc, t)
    return "none"


def small_binary(shape: Any) -> bool:
    """A shape whose packed signs the mutator may write (an earlier edit may have made it
    huge or not a shape at all)."""
    return (
        isinstance(shape, list)
        and len(shape) >= 2
        and all(_is_plain_int(d) and d > 0 for d in shape)
        and math.prod(shape) <= 1 << 26
    )


def safe_mutate(rng: np.random.Generator, doc: Doc, t: Tensors) -> str:
    """:func:`mutate`, where an earlier edit may have removed what it edits."""
    try:
        return mutate(rng, doc, t)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError):
        return "skipped"


def benign(rng: np.random.Generator, doc: Doc, t: Tensors) -> str:
    """Edits that keep a graph valid, or nearly: the backends must then agree."""
    nodes = doc["nodes"]
    how = _pick(rng, ["scale", "bits", "hardtanh", "padding", "pool", "shortcut"])
    # sorted: safetensors returns its tensors in an order that varies between processes
    floats = [k for k, a in sorted(t.items()) if a.dtype == np.float32]
    if how == "scale" and floats:
        name = _pick(rng, floats)
        t[name] = (t[name] * rng.uniform(-3, 3, t[name].shape)).astype(np.float32)
    elif how == "bits" and doc["binary_tensors"]:
        name = _pick(rng, sorted(doc["binary_tensors"]))
        shape = doc["binary_tensors"][name]
        if name in t and small_binary(shape):
            set_binary(doc, t, name, tuple(shape))
    elif how == "hardtanh":
        for n in nodes:
            if n.get("op") == "hardtanh":
                lo = float(rng.uniform(-2, 0.5))
                n["min"], n["max"] = lo, lo + float(rng.uniform(0, 2))
    elif how == "padding":
        convs = [n for n in nodes if n.get("op") == "conv2d"]
        if convs:
            n = _pick(rng, convs)
            n["padding"] = [int(v) for v in rng.integers(0, 3, size=2)]
    elif how == "pool":
        pools = [n for n in nodes if n.get("op") in ("maxpool2d", "avgpool2d")]
        if pools:
            n = _pick(rng, pools)
            k = [int(v) for v in rng.integers(1, 4, size=2)]
            n.update(
                kernel=k,
                stride=[int(v) for v in rng.integers(1, 3, size=2)],
                padding=[int(rng.integers(0, k[0] // 2 + 1)), 0],
            )
    elif how == "shortcut":
        for n in nodes:
            if n.get("op") == "shortcut_a":
                n["stride"] = int(rng.integers(1, 4))
    return f"benign {how}"


def fuzz(bases: list[Path], seed: int, trials: int) -> dict[str, Any]:
    """The campaign: each trial edits one base file 1-3 times, signs it again, and loads
    and runs it on both backends. A failure is anything but (a SigngradError on both
    backends) or (equal logits on both)."""
    rng = np.random.default_rng(seed)
    decoded_bases = [decoded(p) for p in bases]
    backends = K_BACKENDS
    stats = {"trials": trials, "refused": 0, "ran": 0, "big": 0, "failures": []}
    for trial in range(trials):
        doc, tensors = copy.deepcopy(_pick(rng, decoded_bases))
        what = [safe_mutate(rng, doc, tensors) for _ in range(int(rng.integers(0, 4)))]
        try:
            blob = fmt.to_bytes(doc, tensors)
        except (TypeError, ValueError):  # the writer itself refuses (a JSON-less value)
            continue
        outcome: dict[str, Any] = {}
        try:
            for b in backends:
                try:
                    pm = runtime.build(*fmt.read_bytes(blob), backend=b, threads=2)
                except SigngradError as e:
                    outcome[b] = ("refused", str(e))
                    continue
                if pm.image_bytes > 64 << 20:  # valid but slow to run in a loop
                    outcome[b] = ("big", pm.image_bytes)
                    continue
                x = np.random.default_rng(trial).standard_normal((2, *pm.input_shape))
                images = np.random.default_rng(trial).integers(0, 256, (2, *pm.input_shape))
                with np.errstate(all="ignore"):  # extreme edited scales may overflow
                    z = pm.run(x.astype(np.float32))
                    p = pm.predict(images.astype(np.uint8))
                if z.shape != (2, len(pm.classes)) or p.shape != z.shape:
                    raise AssertionError(f"{b}: output shape {z.shape}, {p.shape}")
                outcome[b] = ("ran", z, p)
        except Exception:
            stats["failures"].append(
                {"trial": trial, "edits": what, "error": traceback.format_exc()[-1500:]}
            )
            continue
        kinds = {o[0] for o in outcome.values()}
        if len(kinds) > 1:
            seen = [o[:2] for o in outcome.values()]
            stats["failures"].append(
                {"trial": trial, "edits": what, "error": f"backends disagree: {seen}"}
            )
            continue
        kind = kinds.pop()
        stats[kind] += 1
        if kind == "ran" and len(outcome) > 1:
            (_, z0, p0), (_, z1, p1) = outcome.values()
            tol = 1e-4 * (1 + float(np.abs(z0[np.isfinite(z0)]).max(initial=0.0)))
            same = np.allclose(z0, z1, rtol=1e-5, atol=tol, equal_nan=True) and np.allclose(
                p0, p1, rtol=1e-4, atol=1e-5, equal_nan=True
            )
            if not same:
                stats["failures"].append(
                    {"trial": trial, "edits": what, "error": "compiled and numpy logits differ"}
                )
    return stats


def run_fuzz_child(bases: list[Path], seed: int, trials: int, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, __file__, "fuzz", "--seed", str(seed), "--trials", str(trials)]
    proc = subprocess.run(
        [*argv, *map(str, bases)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode >= 0, (
        f"the fuzz child died of signal {-proc.returncode}: " + (proc.stderr[-3000:])
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["failures"] == [], json.dumps(stats["failures"][:5], indent=1)
    # The campaign exercised both outcomes, not just one.
    assert stats["refused"] > trials // 4 and stats["ran"] > trials // 20, stats
    return stats


@pytest.fixture(scope="module")
def fuzz_bases(bases, request) -> list[Path]:
    """The three synthetic bases, and the real one-epoch run's export where data is."""
    out = [bases["convnet"], bases["resnet20"], bases["mixed"]]
    try:
        run = request.getfixturevalue("tiny_run")
        root = request.getfixturevalue("cifar_root")
    except pytest.skip.Exception:
        return out
    from signgrad import export

    path = bases["convnet"].parent / "tiny-run.safetensors"
    path.write_bytes(export.packed(export.from_checkpoint(run, data_root=str(root))))
    return [*out, path]


def test_fuzzed_files_are_refused_or_agree_across_backends(fuzz_bases):
    run_fuzz_child(fuzz_bases, seed=20240601, trials=300, timeout=300)


@pytest.mark.slow
def test_long_fuzz_campaign(fuzz_bases):
    for seed in (1, 2, 3):
        run_fuzz_child(fuzz_bases, seed=seed, trials=1000, timeout=1800)


def main() -> None:
    p = argparse.ArgumentParser(description="the child processes of tests/test_hostile_models.py")
    p.add_argument("mode", choices=["fuzz", "threads"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("paths", nargs="+", type=Path, help="fuzz: base files; threads: file, guard")
    args = p.parse_args()
    if args.mode == "fuzz":
        print(json.dumps(fuzz(args.paths, args.seed, args.trials)))
    else:
        print(json.dumps(threads_campaign(*args.paths)))


if __name__ == "__main__":
    main()
