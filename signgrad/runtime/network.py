"""The compiled backend's plan: a checked graph turned into one table of operations that
the C extension runs whole (``_net.h``), with no Python between the layers.

Every value of the forward pass gets a place in one float32 arena (NHWC), reused once
the value's last reader has run; every value that a binary layer reads gets its packed
signs in one uint64 pool; parameters are
laid out once, float ones (float convolution weights as KH x KW x C x O, scales, shifts,
slopes, bounds) in one float32 pool, binary weights in one uint64 pool. The places grow
linearly with the batch, so a batch size's table is the per-image one scaled; the
arena is kept from one call to the next while the batch size stays the same.

As in the step-by-step numpy backend, a convolution or linear layer absorbs a following
residual ``add`` and activation when it is their only reader, and a binary layer's
output signs are packed by the layer that computes it. A binary convolution whose output
only binary layers read is flagged ``BITS_ONLY``: its kernel may then write the signs
alone (decided from the integer counts, with the same result) and leave its float
output unwritten.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from signgrad.runtime import kernels as K

# Operation codes and row fields of _net.h (the C side checks every row it is given).
INPUT, CONV, BCONV, PACK, AFFINE, ACT, ADD, SHORTCUT, MAXPOOL, AVGPOOL, GAP, FLATTEN = range(1, 13)
FIELDS = (
    "op n h w c o kh kw sh sw ph pw ho wo x y res wt scale shift act actp slopen bits flags"
).split()
_COL = {name: i for i, name in enumerate(FIELDS)}
SIGN_INPUT, BITS_ONLY = 1, 2  # flags of CONV and BCONV rows
#: the fields that are places in the arena or the bits pool: per image, times the batch
_SCALED = [_COL[k] for k in ("x", "y", "res", "bits")]
_ACTS = {"relu": 1, "hardtanh": 2, "prelu": 3}
#: arena places and the parameters' places in their pools are multiples of this many
#: floats (64 bytes), and the arena, the pools and the bits start on a 64-byte boundary: a
#: pixel's 16 channels, or 8 weight words, are then one cache line, which the AVX-512
#: kernels load whole instead of across two lines (a pool's padding is zeros)
ALIGN = 16
_POOLS = {"maxpool2d": MAXPOOL, "avgpool2d": AVGPOOL}
#: below this many multiply-accumulates (binary ones count 1/32) a call runs on one
#: thread: starting and joining threads (tens of microseconds) costs more than it saves
PARALLEL_WORK = 2_000_000


def pair(v: list[int]) -> tuple[int, int]:
    """A graph's [h, w] attribute as a pair of ints."""
    return int(v[0]), int(v[1])


def window(
    n: dict[str, Any], w: np.ndarray
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """A conv2d or linear node's weights as O x C x KH x KW (a linear layer's as 1 x 1)
    with its kernel, stride and padding."""
    if n["op"] == "linear":
        return w.reshape(*w.shape, 1, 1), (1, 1), (1, 1), (0, 0)
    return w, pair(n["kernel"]), pair(n["stride"]), pair(n["padding"])


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A value's shape as (C, H, W); features are C x 1 x 1."""
    return (shape[0], 1, 1) if len(shape) == 1 else (shape[0], shape[1], shape[2])


class Network:
    """A packed graph planned for the compiled kernels; :meth:`run` is the forward pass."""

    def __init__(
        self,
        graph: dict[str, Any],
        shapes: dict[str, tuple[int, ...]],
        weight: Any,
        tensor: Any,
        threads: int,
        align: bool = True,
    ) -> None:
        """``shapes``: each value's shape (from :func:`signgrad.runtime.validate.check`);
        ``weight(node)``: a layer's weights as float32 (binary ones +-1); ``tensor(name)``:
        a float32 tensor or None for None; ``align``: places in multiples of
        :data:`ALIGN` floats (else packed tight)."""
        self.graph = graph
        self.align = ALIGN if align else 1
        self.shapes = shapes
        self.threads = threads
        self._weight, self._tensor = weight, tensor
        self.rows: list[list[int]] = []
        self.names: list[str] = []  # the layer each row computes, for profiles
        self._fp: list[np.ndarray] = []
        self._fp_n = 0
        self._wp: list[np.ndarray] = []
        self._wp_n = 0
        self.arena_per_image = 0
        self.bits_per_image = 0
        self.place: dict[str, int] = {}  # each value's place in the arena, per image
        self._token: dict[str, int] = {}
        self._names: list[str] = []
        self.bits: dict[str, int] = {}
        self.work_per_image = 0.0
        self._plan()
        self._allocate()
        self.fp = _aligned_copy(np.concatenate(self._fp) if self._fp else np.zeros(1, np.float32))
        self.wp = _aligned_copy(np.concatenate(self._wp) if self._wp else np.zeros(1, np.uint64))
        self._cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- pools ----------------------------------------------------------------------
    def _param(self, a: np.ndarray) -> int:
        offset, self._fp_n = _append(self._fp, self._fp_n, a, np.float32, self.align)
        return offset

    def _words(self, a: np.ndarray) -> int:
        # 64-bit words: half as many to the same bytes
        offset, self._wp_n = _append(self._wp, self._wp_n, a, np.uint64, max(1, self.align // 2))
        return offset

    def _value(self, name: str) -> int:
        """A value's token in the rows, until :meth:`_allocate` gives it its place."""
        if name not in self._token:
            self._token[name] = len(self._names)
            self._names.append(name)
        return self._token[name]

    def _allocate(self) -> None:
        """Places in the arena (per image), first fit: a value's place is free again after
        the last operation that reads it (never during it: no operation writes where it
        reads). The graph's output lives to the end, where run() reads it."""
        arena_x = [r[0] not in (BCONV, INPUT) for r in self.rows]  # x is in the bits
        arena_y = [r[0] != PACK for r in self.rows]  # y is in the bits
        last: dict[int, int] = {}
        for i, r in enumerate(self.rows):
            for col, here in ((_COL["x"], arena_x[i]), (_COL["res"], True)):
                if here and r[col] >= 0:
                    last[r[col]] = i
        last[self._token[self.graph["output"]]] = len(self.rows)
        live: list[tuple[int, int, int]] = []  # (offset, size, token), by offset
        place: dict[int, int] = {}
        for i, r in enumerate(self.rows):
            live = [v for v in live if last.get(v[2], -1) >= i]
            if not arena_y[i]:
                continue
            size = -(-math.prod(self.shapes[self._names[r[_COL["y"]]]]) // self.align) * self.align
            offset = 0
            for start, length, _ in live:  # the first gap that holds it
                if start - offset >= size:
                    break
                offset = max(offset, start + length)
            live.append((offset, size, r[_COL["y"]]))
            live.sort()
            place[r[_COL["y"]]] = offset
            self.arena_per_image = max(self.arena_per_image, offset + size)
        for i, r in enumerate(self.rows):
            for col, here in (
                (_COL["x"], arena_x[i]),
                (_COL["y"], arena_y[i]),
                (_COL["res"], True),
            ):
                if here and r[col] >= 0:
                    r[col] = place[r[col]]
        self.place = {self._names[t]: p for t, p in place.items()}

    def _bits(self, name: str) -> int:
        if name not in self.bits:
            c, h, w = _chw(self.shapes[name])
            self.bits[name] = self.bits_per_image
            self.bits_per_image += h * w * K.words(c)
        return self.bits[name]

    def _row(self, name: str, **f: int) -> None:
        row = [-1] * len(FIELDS)
        row[_COL["flags"]] = row[_COL["act"]] = row[_COL["slopen"]] = 0
        for k, v in f.items():
            row[_COL[k]] = int(v)
        self.rows.append(row)
        self.names.append(name)

    def _dims(self, value: str) -> dict[str, int]:
        c, h, w = _chw(self.shapes[value])
        return {"h": h, "w": w, "c": c}

    # -- planning -------------------------------------------------------------------
    def _plan(self) -> None:
        g = self.graph
        nodes: list[dict[str, Any]] = g["nodes"]
        self.users: dict[str, list[dict[str, Any]]] = {}
        self.producer: dict[str, dict[str, Any]] = {n["output"]: n for n in nodes}
        for n in nodes:
            for v in n["inputs"]:
                self.users.setdefault(v, []).append(n)
        self.done: set[str] = {g["input"]["name"]}
        fused: set[int] = set()
        self._row("input", op=INPUT, **self._dims(g["input"]["name"]), o=g["input"]["shape"][0],
                  ho=g["input"]["shape"][1], wo=g["input"]["shape"][2],
                  y=self._value(g["input"]["name"]))  # fmt: skip
        for n in nodes:
            if id(n) not in fused:
                if n["op"] in ("conv2d", "linear"):
                    fused |= self._layer(n)
                else:
                    self._simple(n)
            self.done.add(n["output"])

    def _only_user(self, value: str) -> dict[str, Any] | None:
        users = self.users.get(value, [])
        return users[0] if len(users) == 1 and value != self.graph["output"] else None

    @staticmethod
    def _reads_bits(u: dict[str, Any]) -> bool:
        """Whether node ``u`` reads only the packed signs of its input."""
        return u["op"] in ("conv2d", "linear") and u["binary_input"] and u["binary_weight"]

    def _binary_reader(self, value: str) -> bool:
        return any(self._reads_bits(u) for u in self.users.get(value, []))

    def _only_binary_readers(self, value: str) -> bool:
        """Whether nothing reads ``value``'s floats: its signs are all its readers want."""
        users = self.users.get(value, [])
        return value != self.graph["output"] and bool(users) and all(map(self._reads_bits, users))

    def _layer(self, n: dict[str, Any]) -> set[int]:
        """Rows of a convolution or linear layer with its epilogue; the ids of the nodes
        it absorbed."""
        fused: set[int] = set()
        w, kernel, stride, padding = window(n, self._weight(n))
        o, c = w.shape[:2]
        x_name, out = n["inputs"][0], n["output"]
        binary = bool(n["binary_input"] and n["binary_weight"])
        scale, shift = self._tensor(n["scale"]), self._tensor(n["shift"])
        f: dict[str, int] = {
            "o": o, "kh": kernel[0], "kw": kernel[1], "sh": stride[0], "sw": stride[1],
            "ph": padding[0], "pw": padding[1],
            "scale": self._param(np.ones(o, np.float32) if scale is None else scale),
            "shift": self._param(np.zeros(o, np.float32) if shift is None else shift),
        }  # fmt: skip
        # Absorb "-> [add residual] -> [activation]" when each link has one reader.
        nxt = self._only_user(out)
        if nxt is not None and nxt["op"] == "add":
            other = [v for v in nxt["inputs"] if v != out]
            if len(other) == 1 and other[0] not in self.done:
                # A shortcut computed after the convolution from earlier values (an
                # option-A shortcut of the block's input): compute it first, to fuse.
                p = self.producer.get(other[0])
                if p is not None and p["op"] not in ("conv2d", "linear", "add"):
                    if all(v in self.done for v in p["inputs"]):
                        self._simple(p)
                        self.done.add(p["output"])
                        fused.add(id(p))
            if len(other) == 1 and other[0] in self.done:
                f["res"] = self._value(other[0])
                out = nxt["output"]
                fused.add(id(nxt))
                nxt = self._only_user(out)
        if nxt is not None and nxt["op"] in _ACTS:
            f.update(self._act(nxt))
            out = nxt["output"]
            fused.add(id(nxt))
        if self._binary_reader(out):
            f["bits"] = self._bits(out)
        ch, hh, ww = _chw(self.shapes[out])
        dims = {**self._dims(x_name), "c": c}  # (a linear layer's input: c features)
        if binary:
            if x_name not in self.bits:  # the graph's input: no operation packed it
                self._pack(n["name"], x_name)
            wt = self._words(K.pack_weight_words(w))
            # Signs only: the kernels may decide them from the counts, leaving y unwritten.
            flags = BITS_ONLY if self._only_binary_readers(out) else 0
            self._row(n["name"], op=BCONV, **dims, **f, ho=hh, wo=ww, x=self.bits[x_name],
                      wt=wt, y=self._value(out), flags=flags)  # fmt: skip
            self.work_per_image += hh * ww * o * c * kernel[0] * kernel[1] / 32
        else:
            wt = self._param(np.transpose(w, (2, 3, 1, 0)))  # KH, KW, C, O
            flags = SIGN_INPUT if n["binary_input"] else 0
            self._row(n["name"], op=CONV, **dims, **f, ho=hh, wo=ww, x=self._value(x_name),
                      wt=wt, y=self._value(out), flags=flags)  # fmt: skip
            self.work_per_image += hh * ww * o * c * kernel[0] * kernel[1]
        return fused

    def _act(self, n: dict[str, Any]) -> dict[str, int]:
        op = n["op"]
        if op == "relu":
            return {"act": _ACTS[op]}
        if op == "hardtanh":
            return {"act": _ACTS[op], "actp": self._param(np.array([n["min"], n["max"]]))}
        slopes = self._tensor(n["weight"]).ravel()
        return {"act": _ACTS[op], "actp": self._param(slopes), "slopen": slopes.size}

    def _simple(self, n: dict[str, Any]) -> None:
        op, ins, out = n["op"], n["inputs"], n["output"]
        d = self._dims(ins[0])
        x = self._value(ins[0])
        same = {**d, "o": d["c"], "ho": d["h"], "wo": d["w"], "x": x}
        if op == "affine":
            self._row(n["name"], op=AFFINE, **same, scale=self._param(self._tensor(n["scale"])),
                      shift=self._param(self._tensor(n["shift"])), y=self._value(out))  # fmt: skip
        elif op in _ACTS:
            self._row(n["name"], op=ACT, **same, **self._act(n), y=self._value(out))
        elif op == "add":
            self._row(n["name"], op=ADD, **same, res=self._value(ins[1]), y=self._value(out))
        else:
            o, ho, wo = _chw(self.shapes[out])
            f = {**d, "o": o, "ho": ho, "wo": wo, "x": x}
            if op == "shortcut_a":
                f.update(sh=n["stride"], ph=n["pad_before"], pw=n["pad_after"])
                self._row(n["name"], op=SHORTCUT, **f, y=self._value(out))
            elif op in _POOLS:
                (kh, kw), (sh, sw), (ph, pw) = (pair(n[k]) for k in ("kernel", "stride", "padding"))
                self._row(n["name"], op=_POOLS[op], **f, kh=kh, kw=kw, sh=sh, sw=sw, ph=ph,
                          pw=pw, y=self._value(out))  # fmt: skip
            elif op == "global_avgpool":
                self._row(n["name"], op=GAP, **f, y=self._value(out))
            elif op == "flatten":
                self._row(n["name"], op=FLATTEN, **f, y=self._value(out))
            else:
                raise AssertionError(op)  # validate.check admits only known ops
        if self._binary_reader(out) and out not in self.bits:
            self._pack(n["name"], out)

    def _pack(self, label: str, value: str) -> None:
        """A row packing the signs of ``value`` for the binary layers that read it."""
        d = self._dims(value)
        self._row(label + ":pack", op=PACK, **d, o=d["c"], ho=d["h"], wo=d["w"],
                  x=self._value(value), y=self._bits(value))  # fmt: skip

    # -- running --------------------------------------------------------------------
    def table(self, n: int) -> np.ndarray:
        """The operations' rows (int64, ``len(FIELDS)`` per row) for a batch of ``n``."""
        ops = np.array(self.rows, dtype=np.int64)
        ops[:, _COL["n"]] = n
        for col in _SCALED:
            given = ops[:, col] >= 0
            ops[given, col] *= n
        return ops

    def scratch_per_thread(self) -> int:
        """The int64 scratch one thread needs (as ``net_scratch`` in ``_net.h``)."""
        need = [0]
        for r in self.rows:
            f = dict(zip(FIELDS, r, strict=True))
            taps = f["kh"] * f["kw"]
            if f["op"] == BCONV:
                need.append(4 * taps + f["o"])
            elif f["op"] == CONV:
                need.append(2 * taps * f["c"])
        return max(need)

    def _for_batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != n:
            ops = self.table(n)
            # New arrays only when the batch size changes: fresh large arrays cost page
            # faults that can take longer than the whole forward pass.
            arena = _aligned(n * self.arena_per_image, np.float32)
            bits = _aligned(max(1, n * self.bits_per_image), np.uint64)
            self._cache = (n, ops, arena, bits)
        return self._cache[1:]

    def threads_for(self, n: int) -> int:
        """Threads for a batch of ``n``: one for small work (see :data:`PARALLEL_WORK`)."""
        return 1 if n * self.work_per_image < PARALLEL_WORK else self.threads

    def run(self, x: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        """Logits of a C-contiguous float32 N x C x H x W batch (a new array); with
        ``times`` (float64, one per row), add each operation's seconds to it."""
        n = x.shape[0]
        ops, arena, bits = self._for_batch(n)
        K.run_net(ops, self.fp, self.wp, arena, bits, x, self.threads_for(n), times)
        out = self.graph["output"]
        size = math.prod(self.shapes[out])
        start = n * self.place[out]
        return arena[start : start + n * size].reshape(n, size).copy()


def _append(
    pool: list[np.ndarray], n: int, a: np.ndarray, dtype: type, unit: int
) -> tuple[int, int]:
    """Appends ``a`` to a pool of ``n`` items at the next multiple of ``unit`` (zeros
    between); returns its offset and the pool's new size."""
    a = np.ascontiguousarray(a, dtype=dtype).ravel()
    if n % unit:
        pool.append(np.zeros(unit - n % unit, dtype))
        n += pool[-1].size
    pool.append(a)
    return n, n + a.size


def _aligned(size: int, dtype: type) -> np.ndarray:
    """An uninitialized array of ``size`` items that starts on a 64-byte boundary."""
    item = np.dtype(dtype).itemsize
    raw = np.empty(size + 64 // item, dtype)
    skip = (-raw.ctypes.data % 64) // item
    return raw[skip : skip + size]


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    out = _aligned(a.size, a.dtype.type)
    out[:] = a
    return out
