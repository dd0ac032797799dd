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
  {name: shape}, ``preprocess`` {``mean``, ``std``} (per channel, on the [0, 1] scale;
  optional ``crop``, the evaluation's centre crop as a share of the shorter side),
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
#: the most bytes the graph's JSON may inflate to (a ResNet-18's is about 20 KB)
MAX_GRAPH_BYTES = 16 << 20
FORMAT = "signgrad-packed"
VERSION = 1
#: the operations of version 1 (their meaning: :mod:`signgrad.graph`)
OPS = (
    "conv2d",
    "linear",
    "affine",
    "relu",
    "hardtanh",
    "prelu",
    "add",
    "shortcut_a",
    "maxpool2d",
    "avgpool2d",
    "global_avgpool",
    "flatten",
)


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
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)
    return _sorted_metadata(blob)


def _sorted_metadata(blob: bytes) -> bytes:
    """``blob`` with its header's metadata in sorted order: safetensors writes it in the
    order of a hash map, which changes from one process to the next, and the same model
    should give the same bytes. The header keeps its length (and so every offset)."""
    n = int.from_bytes(blob[:8], "little")
    raw = blob[8 : 8 + n]
    header = json.loads(raw)
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) != len(raw.rstrip(b" ")):  # not the encoding expected: leave it as it is
        return blob
    return blob[:8] + text.ljust(n) + blob[8 + n :]


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


def _inflate(blob: bytes, where: str) -> bytes:
    """The graph's JSON, refusing more than :data:`MAX_GRAPH_BYTES` before inflating it (a
    small file must not inflate to gigabytes)."""
    d = zlib.decompressobj()
    try:
        text = d.decompress(blob, MAX_GRAPH_BYTES)
        more = d.unconsumed_tail or not d.eof
    except zlib.error as e:
        raise SigngradError(f"{where} has no readable graph: {e}") from None
    if more:
        if d.unconsumed_tail or d.decompress(b"", 1):
            raise SigngradError(
                f"{where}: its graph inflates to more than {MAX_GRAPH_BYTES >> 20} MiB; refused"
            )
        raise SigngradError(f"{where} has no readable graph: the compressed graph is truncated")
    return text


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
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not an object")
    except KeyError as e:  # a dtype safetensors knows and numpy does not (BF16, F8...)
        raise SigngradError(
            f"{where} is not a readable packed model: tensor dtype {e} is not supported"
        ) from None
    except (SafetensorError, ValueError, AttributeError, TypeError, RecursionError) as e:
        # RecursionError: JSON nested deeper than the parser goes.
        raise SigngradError(
            f"{where} is not a readable packed model (truncated or "
            f"damaged?): {type(e).__name__}: {e}"[:300]
        ) from None
    if meta.get("format") != FORMAT:
        raise SigngradError(
            f"{where} is not a signgrad packed model (format {meta.get('format')!r:.60})"
        )
    if meta.get("version") != str(VERSION):
        raise SigngradError(
            f"{where} has packed format version {str(meta.get('version'))[:20]}; "
            f"this signgrad reads version {VERSION}"
        )
    if meta.get("sha256") != _digest(tensors):
        raise SigngradError(f"{where} is damaged: its tensors do not match their checksum")
    blob = tensors.pop(GRAPH_TENSOR, None)
    if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
        raise SigngradError(f"{where} has no readable graph: no 1-D uint8 tensor {GRAPH_TENSOR}")
    try:
        graph = json.loads(_inflate(blob.tobytes(), where))
    except (ValueError, RecursionError) as e:
        raise SigngradError(
            f"{where} has no readable graph: {type(e).__name__}: {e}"[:300]
        ) from None
    if not isinstance(graph, dict):
        raise SigngradError(
            f"{where} has no readable graph: a {type(graph).__name__}, not a JSON object"
        )
    return graph, tensors
