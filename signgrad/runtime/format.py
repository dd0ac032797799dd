"""The packed model file: one safetensors file, no pickle, read without PyTorch.

Layout, version 1 (``docs/export.md`` has the same with an example):

* safetensors metadata (all strings): ``format`` = ``"signgrad-packed"``, ``version`` =
  ``"1"``, ``sha256`` = hex digest of every tensor's name and bytes, in name order (so a
  damaged file is refused, not misread).
* tensor ``__graph__`` (uint8): the network as zlib-compressed UTF-8 JSON (below);
  compressed because it is a good part of a small binary network's file.
* the other tensors: float32 for everything full precision (first/last layers, scales, folded
  batch norm, PReLU slopes); uint8 for binary weights, which the graph lists in
  ``binary_tensors`` with their shape. A binary weight of shape [O, ...] is stored as
  O rows of ceil(K / 8) bytes, K = the product of the other dimensions in PyTorch's
  order (in, kh, kw): bit i (least significant first) of byte j of row o is element
  8 j + i of that row, 1 for -1 and 0 for +1; the last byte's unused bits are 0.
* graph JSON: ``input`` {``name``, ``shape`` [C, H, W]}, ``output`` (a value name),
  ``nodes`` (ops of :mod:`signgrad.graph`, in execution order), ``binary_tensors``
  {name: shape}, ``preprocess`` {``mean``, ``std``} (per channel, on the [0, 1] scale),
  ``classes`` (names), and ``source`` (what it was exported from, informative).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from signgrad.errors import SigngradError

GRAPH_TENSOR = "__graph__"
FORMAT = "signgrad-packed"
VERSION = 1
#: the operations of version 1 (their meaning: :mod:`signgrad.graph`)
OPS = (
    "conv2d", "linear", "affine", "relu", "hardtanh", "prelu", "add", "shortcut_a",
    "maxpool2d", "avgpool2d", "global_avgpool", "flatten",
)  # fmt: skip


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """+-1 array [O, ...] -> uint8 [O, ceil(K / 8)] with 1 bits for -1 (LSB first)."""
    rows = np.asarray(signs).reshape(signs.shape[0], -1)
    if not np.all(np.abs(rows) == 1):
        raise SigngradError("binary weights must be exactly +-1 to be packed")
    return np.packbits(rows < 0, axis=1, bitorder="little")


def unpack_signs(packed: np.ndarray, shape: list[int]) -> np.ndarray:
    """The inverse of :func:`pack_signs`: float32 +-1 of ``shape``."""
    k = int(np.prod(shape[1:]))
    bits = np.unpackbits(packed, axis=1, count=k, bitorder="little")
    return (1.0 - 2.0 * bits.astype(np.float32)).reshape(shape)


def _digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def to_bytes(graph: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """The file's bytes for ``graph`` and its tensors."""
    from safetensors.numpy import save

    text = json.dumps(graph, separators=(",", ":")).encode()
    tensors = {**tensors, GRAPH_TENSOR: np.frombuffer(zlib.compress(text, 9), dtype=np.uint8)}
    meta = {"format": FORMAT, "version": str(VERSION), "sha256": _digest(tensors)}
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(graph, tensors) of a packed file, after checking its format, version and digest."""
    path = Path(path)
    if not path.is_file():
        raise SigngradError(f"no packed model at {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigngradError(f"cannot read {path}: {e.strerror}") from None
    return read_bytes(data, str(path))


def read_bytes(
    data: bytes, where: str = "packed model"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """:func:`read` for the file's bytes; ``where`` names them in errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError, AttributeError) as e:
        raise SigngradError(f"{where} is not a readable packed model (truncated or "
                            f"damaged?): {e}") from None  # fmt: skip
    if meta.get("format") != FORMAT:
        raise SigngradError(f"{where} is not a signgrad packed model (format "
                            f"{meta.get('format')!r})")  # fmt: skip
    if meta.get("version") != str(VERSION):
        raise SigngradError(f"{where} has packed format version {meta.get('version')}; this "
                            f"signgrad reads version {VERSION}")  # fmt: skip
    if meta.get("sha256") != _digest(tensors):
        raise SigngradError(f"{where} is damaged: its tensors do not match their checksum")
    try:
        graph = json.loads(zlib.decompress(tensors.pop(GRAPH_TENSOR).tobytes()))
    except (KeyError, zlib.error, ValueError) as e:
        raise SigngradError(f"{where} has no readable graph: {e}") from None
    return graph, tensors
