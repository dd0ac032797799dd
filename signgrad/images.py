"""Image files to 8-bit pixel arrays: the one decoder of the image-folder loader and of
``signgrad predict``.

numpy and Pillow only, no torch: ``predict`` runs with the packed runtime alone.

Pixel depths (what a network trained on 8-bit images should see):

* 8-bit images (``L``, ``RGB``, palettes, ...) are used as Pillow decodes them;
* 16-bit grey images (Pillow modes ``I;16*``, and ``I``, which is how Pillow decodes
  16-bit PGM files and, before Pillow 10, 16-bit PNG files) are scaled to 0..255 by the
  bit depth, ``round(v / 257)``; an ``I`` image with values outside 0..65535 (a 32-bit
  integer TIFF, say) has no known range and is refused;
* 32-bit float grey images (mode ``F``, e.g. float TIFF) must hold values in [0, 1],
  which become ``round(255 v)``; any other float image (negative, above 1, NaN, inf) is
  refused, since its scale cannot be guessed;
* 16-bit colour PNG files are reduced to 8 bits by Pillow itself while decoding (the high
  byte, within one level of ``round(v / 257)``).

Grey images (``1``, ``L``, ``LA``, the 16-bit and float modes, 16-bit grey+alpha PNG)
count as one channel. Alpha is dropped. Files Pillow refuses as decompression bombs
(more than ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels) are errors naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from signgrad.errors import SigngradError

__all__ = ["GREY_MODES", "centre_box", "is_grey", "open_image", "read", "to_array"]

#: Pillow modes that hold one channel of grey (alpha aside).
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})

_MAX_16 = 65535


def open_image(path: str | os.PathLike[str], prefix: str = "") -> Image.Image:
    """``Image.open(path)`` (lazy: only the header is read) with every way a file can fail
    to be an image as a SigngradError naming it; ``prefix`` starts the message."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        # Pillow's guard against files that decode to gigabytes; not an OSError.
        raise SigngradError(f"{prefix}cannot read image {path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SigngradError(f"{prefix}cannot read image {path}: {e}") from None


def _raw_mode(im: Image.Image) -> str:
    """How the file stores its pixels, where Pillow says (PNG: e.g. ``LA;16B``)."""
    if not im.tile:
        return ""
    args = im.tile[0].args
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def is_grey(im: Image.Image) -> bool:
    """Whether ``im`` (opened, not necessarily decoded) holds one grey channel."""
    # Pillow decodes 16-bit grey+alpha PNG into RGBA; the file is still grey.
    return im.mode in GREY_MODES or _raw_mode(im).startswith("LA;16")


def _to_8bit(im: Image.Image, where: str) -> Image.Image:
    """An 8-bit ``L`` image for the deep grey modes (see the module docstring); other
    images unchanged."""
    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.asarray(im).astype(np.int64)
        if v.size and (v.min() < 0 or v.max() > _MAX_16):
            raise SigngradError(
                f"{where}: integer pixels range over {v.min()}..{v.max()}; only 0..65535 "
                "(16-bit) has a known scale, convert it to 8 or 16 bits"
            )
        # round(v / 257): 65535 / 257 = 255 exactly, and (v + 128) // 257 rounds.
        return Image.fromarray(((v + 128) // 257).astype(np.uint8), "L")
    if im.mode == "F":
        v = np.asarray(im, dtype=np.float64)
        if not np.isfinite(v).all():
            raise SigngradError(f"{where}: float pixels that are NaN or infinite")
        if v.size and (v.min() < 0 or v.max() > 1):
            raise SigngradError(
                f"{where}: float pixels range over {v.min():g}..{v.max():g}; only float "
                "images in [0, 1] are understood, convert it to 8 or 16 bits"
            )
        return Image.fromarray(np.rint(v * 255).astype(np.uint8), "L")
    return im


def to_array(
    im: Image.Image,
    channels: int,
    size: tuple[int, int] | None = None,
    where: str = "image",
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """Pixels of ``im`` as uint8 (channels, height, width), ``channels`` 1 (grey) or 3
    (RGB), resized (bilinear) to ``size`` = (width, height) when given and different;
    ``box`` (left, top, right, bottom) crops first, in the same resampling pass.
    ``where`` names the image in error messages."""
    if channels not in (1, 3):
        raise SigngradError(f"{where}: images have 1 or 3 channels, not {channels}")
    im = _to_8bit(im, where)
    im = im.convert("L" if channels == 1 else "RGB")
    if box is not None:
        size = size or (round(box[2] - box[0]), round(box[3] - box[1]))
        full = box == (0, 0, im.size[0], im.size[1])
        if not (full and im.size == tuple(size)):
            im = im.resize(tuple(size), Image.BILINEAR, box=box)
    elif size is not None and im.size != tuple(size):
        im = im.resize(tuple(size), Image.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def centre_box(w: float, h: float, share: float = 1.0) -> tuple[float, float, float, float]:
    """The centred square of side ``share`` times the shorter side of a w x h image, as a
    box (left, top, right, bottom)."""
    side = min(w, h) * share
    return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def read(
    path: str | os.PathLike[str],
    channels: int,
    size: tuple[int, int] | None = None,
    prefix: str = "",
    crop: float | None = None,
) -> np.ndarray:
    """Decode the image file ``path`` into uint8 (channels, height, width); see
    :func:`to_array`. ``crop``: first take the centred square of that share of the
    shorter side (a model evaluated on centre crops). Any file that is not a readable
    image is a SigngradError naming it."""
    with open_image(path, prefix) as im:
        box = None if crop is None else centre_box(*im.size, crop)
        try:
            return to_array(im, channels, size, where=f"{prefix}{Path(path)}", box=box)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            # Truncated or corrupt pixel data surfaces only when it is decoded.
            raise SigngradError(f"{prefix}cannot decode {path}: {e}") from None
