"""Array kernels of the runtime on NHWC float32 activations: the compiled ones where the C
extension was built (the bit-packed convolution and whole networks, :func:`run_net`),
and numpy for the fallback backend.

The compiled kernels (``_kernels.c``) pick AVX-512 VPOPCNTDQ, AVX2+POPCNT, NEON or plain C
at import time; :data:`COMPILED` names the one in use, or is None with
:data:`UNAVAILABLE` saying why.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from signgrad.errors import SigngradError

try:
    from signgrad.runtime import _kernels
except ImportError as e:  # not built (no compiler at install time) or not loadable
    _kernels = None
    COMPILED: str | None = None
    UNAVAILABLE: str | None = f"{e}"
else:
    COMPILED = _kernels.kernel_name()
    UNAVAILABLE = None

ACT_CODES = {None: 0, "relu": 1, "hardtanh": 2, "prelu": 3}


def words(c: int) -> int:
    """64-bit words per pixel for ``c`` binary channels."""
    return (c + 63) // 64


def sign(x: np.ndarray) -> np.ndarray:
    """+1 where x >= 0, else -1 (NaN -> -1), as signgrad's quantizers."""
    return np.where(x >= 0, np.float32(1), np.float32(-1))


def pack_words(x: np.ndarray, threads: int) -> np.ndarray:
    """Signs of the last axis of ``x`` (float32) packed into uint64 words, 1 = negative."""
    c = x.shape[-1]
    x = np.ascontiguousarray(x, dtype=np.float32)
    shape = (*x.shape[:-1], words(c))
    out = np.empty(shape, np.uint64)
    _kernels.pack_signs(x, x.size // c, out, c, threads)
    return out


def pack_weight_words(signs: np.ndarray) -> np.ndarray:
    """+-1 weights [O, C, KH, KW] -> uint64 [KH, KW, Cw, O], the bconv2d layout."""
    o, c = signs.shape[:2]
    hwc = np.transpose(signs < 0, (2, 3, 0, 1))  # KH, KW, O, C
    padded = np.zeros((*hwc.shape[:3], words(c) * 64), dtype=bool)
    padded[..., :c] = hwc
    packed = np.packbits(padded, axis=-1, bitorder="little").view("<u8")  # KH, KW, O, Cw
    return np.ascontiguousarray(np.transpose(packed, (0, 1, 3, 2)).astype(np.uint64))


def bconv2d(
    x_bits: np.ndarray,
    w_words: np.ndarray,
    c: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    scale: np.ndarray,
    shift: np.ndarray,
    residual: np.ndarray | None,
    act: str | None,
    act_args: tuple[float, float, np.ndarray | None],
    want_bits: bool,
    threads: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """XNOR-popcount convolution of packed inputs [N, H, W, Cw] with packed weights,
    then * scale + shift (+ residual), then the activation; also the output's packed
    signs when ``want_bits``. Compiled kernels only (the runtime itself runs whole
    networks through :func:`run_net`; this one layer is for tests and tools)."""
    n, h, w, _ = x_bits.shape
    o = w_words.shape[-1]
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.empty((n, ho, wo, o), np.float32)
    if residual is not None and residual.shape != out.shape:
        raise SigngradError(
            f"residual of shape {residual.shape} added to an output of shape "
            f"{out.shape}: the runtime does not broadcast"
        )
    bits = np.empty((n, ho, wo, words(o)), np.uint64) if want_bits else None
    lo, hi, slope = act_args
    _kernels.bconv2d(
        x_bits,
        w_words,
        (n, h, w, c, o),
        (kh, kw, sh, sw),
        (ph, pw),
        scale,
        shift,
        residual,
        ACT_CODES[act],
        lo,
        hi,
        slope,
        out,
        bits,
        threads,
    )
    return out, bits


def run_net(
    ops: np.ndarray,
    fp: np.ndarray,
    wp: np.ndarray,
    arena: np.ndarray,
    bits: np.ndarray,
    x: np.ndarray,
    threads: int,
    times: np.ndarray | None = None,
) -> None:
    """Run a table of operations (``signgrad.runtime.network``) on ``x``, writing the
    arena and the bits; the C side checks every row against the buffers first."""
    _kernels.run_net(ops, fp, wp, arena, bits, x, threads, times)


#: bit operations (binary multiply-accumulates) one round of :func:`popcount_peak` does
PEAK_BITS_PER_ROUND = 8192


def popcount_peak(rounds: int) -> int:
    """XOR, popcount and add on :data:`PEAK_BITS_PER_ROUND` bits held in registers,
    ``rounds`` times, with the kernels' instruction set: time it for the popcount
    roofline of one core. Returns a checksum of the work."""
    return _kernels.popcount_peak(rounds)


def im2col(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> np.ndarray:
    """NHWC -> [N, Ho, Wo, KH*KW*C] patches in (ky, kx, c) order, zero padding."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # N Ho Wo C KH KW
    n, ho, wo = win.shape[:3]
    return np.ascontiguousarray(np.transpose(win, (0, 1, 2, 4, 5, 3))).reshape(n, ho, wo, -1)


def conv_matrix(weight: np.ndarray) -> np.ndarray:
    """[O, C, KH, KW] -> [KH*KW*C, O], to multiply :func:`im2col` patches."""
    return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)).reshape(-1, weight.shape[0]))


def pool(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    op: str,
) -> np.ndarray:
    """Max or average (padded zeros counted) pooling of NHWC ``x``."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, h, w, c = x.shape
    if (kh, kw) == (sh, sw) and not (ph or pw) and h % kh == 0 and w % kw == 0:
        blocks = x.reshape(n, h // kh, kh, w // kw, kw, c)
        return blocks.max(axis=(2, 4)) if op == "max" else blocks.mean(axis=(2, 4))
    fill = -np.inf if op == "max" else 0.0
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=fill)
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    return win.max(axis=(-2, -1)) if op == "max" else win.mean(axis=(-2, -1))
