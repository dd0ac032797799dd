"""Write a folder of real images as JPEG files in ImageNet's layout (``train/<class>/``,
``val/<class>/``) from a built-in data set, for trying the image-folder loader.

    SIGNGRAD_DATA=/path/to/data python benchmarks/jpeg_folder.py cifar10 /tmp/cifar-jpeg
    python benchmarks/jpeg_folder.py cifar10 /tmp/big --size 500x375 --per-class 50 10
    python benchmarks/jpeg_folder.py fashion-mnist /tmp/fmnist-jpeg --per-class 500 100

Images keep their size unless ``--size WxH`` upscales them (bicubic), so that decoding
costs what a photo of that size costs; training images come from the training split,
``val/`` from the test split, the first ``--per-class`` of each class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from signgrad import data


def write(
    name: str,
    out: Path,
    per_class: tuple[int, int],
    size: tuple[int, int] | None = None,
    quality: int = 90,
) -> Path:
    """Write the folder; return ``out``. Refuses an ``out`` that exists and is not empty."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty")
    ds = data.load(name, download=False)
    for split, x, y, n in (("train", ds.train_images, ds.train_labels, per_class[0]),
                           ("val", ds.test_images, ds.test_labels, per_class[1])):  # fmt: skip
        for c, cls in enumerate(ds.classes):
            folder = out / split / cls.replace("/", "-")
            folder.mkdir(parents=True)
            for i in (y == c).nonzero().flatten()[:n].tolist():
                pixels = x[i].permute(1, 2, 0).numpy()
                im = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
                if size is not None:
                    im = im.resize(size, Image.BICUBIC)
                im.save(folder / f"{i}.jpg", quality=quality)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="built-in data set: cifar10, cifar100, fashion-mnist, mnist")
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, nargs=2, default=[10**9, 10**9],
                    metavar=("TRAIN", "VAL"), help="images per class (default: all)")  # fmt: skip
    ap.add_argument("--size", help="WxH to resize to (default: unchanged)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    out = write(args.data, args.out, tuple(args.per_class), size)
    n = sum(1 for _ in out.rglob("*.jpg"))
    print(f"wrote {n:,} JPEG files under {out}")


if __name__ == "__main__":
    main()
