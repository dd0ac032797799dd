"""Image classification data: official file formats, verified downloads, on-device batches.

``load(name)`` reads a data set from its official on-disk layout under a data root
(downloading it when absent) into uint8 tensors; ``Loader`` serves normalised, optionally
augmented batches that never leave the training device, with all augmentation done for
the whole batch at once (no per-image Python loop).

Data root: ``root=`` argument, else ``$SIGNGRAD_DATA``, else ``~/.cache/signgrad/data``.
Expected layouts (exactly what the official downloads unpack to)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}
    <root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    <root>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]

A local copy may hold fewer images than the official release (a logged warning says how
many); anything that does not parse is a ``SigngradError`` naming the file.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import logging
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from signgrad.distributed import check_shard, shard_range
from signgrad.errors import SigngradError
from signgrad.registry import Registry

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # tqdm is a declared dependency; progress bars are only a nicety
    _tqdm = None

__all__ = [
    "DataSet",
    "Loader",
    "SOURCES",
    "Source",
    "crop_flip",
    "data_root",
    "load",
    "names",
    "random_crop_flip_params",
]

log = logging.getLogger("signgrad.data")

ENV_VAR = "SIGNGRAD_DATA"
DEFAULT_ROOT = Path("~/.cache/signgrad/data")
CROP_PAD = 4  # pixels of zero padding for the random crop (the standard CIFAR recipe)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One official download.

    ``filename`` is the name the file is stored under (an ``extract`` archive is a
    temporary file, deleted once the data set's files are taken out of it).
    """

    filename: str
    url: str
    md5: str
    extract: bool = False  # a .tar.gz holding the data set's folder


_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

# The one table of remote files and checksums (tests point entries at file:// URLs).
SOURCES: dict[str, tuple[Source, ...]] = {
    "cifar10": (
        Source(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
            extract=True,
        ),
    ),
    "cifar100": (
        Source(
            "cifar-100-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
            extract=True,
        ),
    ),
    "fashion-mnist": tuple(
        Source(f, _FMNIST_URL + f, md5)
        for f, md5 in (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        )
    ),
    "mnist": tuple(
        Source(f, _MNIST_URL + f, md5)
        for f, md5 in (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        )
    ),
}


@dataclass(frozen=True)
class _Spec:
    """What one built-in data set looks like on disk and how to normalise it."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    official: tuple[int, int]  # train, test image counts of the official release
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    num_classes: int
    meta_file: str = ""  # CIFAR only: pickle with the class names
    label_key: bytes = b""  # CIFAR only
    names_key: bytes = b""  # CIFAR only
    classes: tuple[str, ...] = ()  # idx sets: class names are not in the files
    summary: str = ""  # one line for listings


_IDX_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_IDX_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

_BUILT_IN: dict[str, _Spec] = {
    "cifar10": _Spec(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        official=(50000, 10000),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augment=True,
        num_classes=10,
        summary="CIFAR-10: 32x32 colour images of 10 classes",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
    ),
    "cifar100": _Spec(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        official=(50000, 10000),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment=True,
        num_classes=100,
        summary="CIFAR-100: 32x32 colour images of 100 classes",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
    "fashion-mnist": _Spec(
        folder="fashion-mnist",
        train_files=_IDX_TRAIN,
        test_files=_IDX_TEST,
        official=(60000, 10000),
        mean=(0.2860,),
        std=(0.3530,),
        augment=False,
        num_classes=10,
        summary="Fashion-MNIST: 28x28 greyscale images of 10 kinds of clothing",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "mnist": _Spec(
        folder="mnist",
        train_files=_IDX_TRAIN,
        test_files=_IDX_TEST,
        official=(60000, 10000),
        mean=(0.1307,),
        std=(0.3081,),
        augment=False,
        num_classes=10,
        summary="MNIST: 28x28 greyscale handwritten digits",
        classes=tuple(str(d) for d in range(10)),
    ),
}

#: The built-in data sets by name; ``imagefolder:PATH`` names any folder of images.
DATASETS: Registry[_Spec] = Registry("data set")
for _name, _spec in _BUILT_IN.items():
    DATASETS.register(_name, _spec, summary=_spec.summary)

_IMAGEFOLDER = "imagefolder:"


# --------------------------------------------------------------------------- public API


@dataclass(repr=False)
class DataSet:
    """A whole data set in memory: uint8 images (N x C x H x W) and int64 labels, on CPU.

    ``mean``/``std`` are per channel on the [0, 1] scale; ``augment`` says whether the
    standard random crop + horizontal flip suits these images (CIFAR yes, digits no).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    def __repr__(self) -> str:  # the default repr would print the tensors
        c, (h, w) = self.in_channels, self.image_size
        return (
            f"DataSet({self.name!r}, train={len(self.train_labels)}, "
            f"test={len(self.test_labels)}, {c}x{h}x{w}, classes={self.num_classes})"
        )


def names() -> list[str]:
    """Names ``load`` accepts; ``imagefolder:PATH`` stands for any folder of images."""
    return [*DATASETS, _IMAGEFOLDER + "PATH"]


def canonical(name: str) -> str:
    """The registered spelling of data set ``name`` (``imagefolder:PATH`` unchanged);
    SigngradError listing the valid names if ``load`` does not know it. Reads nothing."""
    if isinstance(name, str) and name.startswith(_IMAGEFOLDER):
        return name
    return DATASETS.canonical(name, also=[_IMAGEFOLDER + "PATH"])


def check_name(name: str) -> None:
    """Raise SigngradError unless ``load`` knows ``name`` (without reading anything)."""
    canonical(name)


def describe(name: str) -> tuple[int, tuple[int, int, int]]:
    """(number of classes, (C, H, W)) of a built-in data set, without reading it."""
    name = canonical(name)
    if name.startswith(_IMAGEFOLDER):
        raise SigngradError("the shape of an image folder is only known once it is read")
    spec = DATASETS.get(name)
    return spec.num_classes, ((3, 32, 32) if spec.meta_file else (1, 28, 28))


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where data sets live: ``root``, else ``$SIGNGRAD_DATA``, else ``~/.cache/signgrad/data``."""
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser()


def load(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    **folder: Any,
) -> Any:
    """Read data set ``name`` (see ``names()``) from the data root, downloading it if absent.

    ``imagefolder:PATH`` reads ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (or
    ``test/``) with PIL (``PATH`` relative to the current directory; ``root``/``download``
    do not apply); ``folder`` holds the keywords of :func:`signgrad.folders.open_folder`
    (``mode``, default ``"memory"`` here, ``image_size``, ``augment``, ``workers``,
    ``skip_bad``). In memory (a :class:`DataSet`), images are decoded by
    :mod:`signgrad.images` (16-bit and float pixels scaled to 8 bits), become greyscale
    when all of them are greyscale, RGB otherwise, and are resized (bilinear) to the size
    of the first training image when sizes differ; mean/std come from the training split;
    ``augment`` (the CIFAR crop and flip) is on unless ``augment=False``. Streamed: a
    :class:`signgrad.folders.StreamSet`.
    """
    if name.startswith(_IMAGEFOLDER):
        from signgrad import folders  # only image folders need PIL

        got = folders.open_folder(name[len(_IMAGEFOLDER) :], **{"mode": "memory", **folder})
        if isinstance(got, folders.StreamSet):
            return got
        mean, std = channel_stats(got.train_images)
        return DataSet(
            name=got.name,
            train_images=got.train_images,
            train_labels=got.train_labels,
            test_images=got.test_images,
            test_labels=got.test_labels,
            classes=got.classes,
            mean=mean,
            std=std,
            augment=got.augment,
        )
    if folder:
        raise SigngradError(f"{', '.join(folder)} only apply to imagefolder:PATH, not {name}")
    name = canonical(name)
    spec = DATASETS.get(name)
    base = data_root(root)
    folder = base / spec.folder
    _ensure_present(name, spec, base, download)
    if spec.meta_file:
        ds = _load_cifar(name, spec, folder)
    else:
        ds = _load_idx(name, spec, folder)
    _check_counts(name, spec, folder, ds)
    return ds


# --------------------------------------------------------------------------- batches


def random_crop_flip_params(
    n: int, generator: torch.Generator | None = None, pad: int = CROP_PAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the augmentation of ``n`` images on the CPU generator.

    Returns ``offsets`` (int64, n x 2: top and left corner of the crop in the padded image,
    each in ``[0, 2*pad]``) and ``flip`` (bool, n: mirror horizontally), offsets drawn first.
    """
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flip = torch.randint(0, 2, (n,), generator=generator).bool()
    return offsets, flip


def crop_flip(
    images: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor, pad: int = CROP_PAD
) -> torch.Tensor:
    """Random-crop (after ``pad`` pixels of zeros) and mirror a whole batch in one gather.

    ``out[b, :, i, j] = padded[b, :, oy + i, ox + (W-1-j if flip[b] else j)]`` where
    ``(oy, ox) = offsets[b]``: the batch is padded once and each image's rows/columns are
    picked with advanced indexing, so the cost is one kernel whatever the batch size.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))  # zeros: black, as torchvision's RandomCrop
    offsets = offsets.to(dev)
    flip = flip.to(dev)
    rows = offsets[:, 0:1] + torch.arange(h, device=dev)  # b x h
    j = torch.arange(w, device=dev)
    # Mirroring is just reading the columns backwards, so it folds into the same gather.
    cols = offsets[:, 1:2] + torch.where(flip[:, None], w - 1 - j, j)  # b x w
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class Loader:
    """Iterates (x, y) batches of one split already on ``device``.

    x: float32 N x C x H x W normalised with mean/std; y: int64.

    The uint8 images and labels are moved to ``device`` once, here. Each training epoch
    draws, on the CPU ``generator`` (default: torch's global one), a permutation
    (``torch.randperm``) and then, if ``augment``, ``random_crop_flip_params`` for every
    image; only these small index tensors travel to the device, so equal seeds give equal
    batches on any device. Augmentation (``crop_flip``, zero padding in pixel space, i.e.
    black borders) is applied to the uint8 batch before normalising. With ``train=False``
    the order is fixed, nothing is augmented and the last partial batch is kept;
    ``drop_last`` (drop an incomplete final batch) is for training only.

    ``shard=(rank, world)``: data-parallel training; ``batch_size`` is the global batch,
    every rank draws the same permutation and augmentation and yields only its part of
    each batch (:func:`signgrad.distributed.shard_range`), so the ranks' parts together
    are the batch a single process would train.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: bool,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise SigngradError(
                f"Loader needs uint8 images N x C x H x W, got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise SigngradError(
                f"Loader got {len(images)} images but labels of shape {tuple(labels.shape)}"
            )
        if len(images) == 0:
            raise SigngradError("Loader got no images")
        if batch_size < 1:
            raise SigngradError(f"batch size must be at least 1, got {batch_size}")
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise SigngradError(
                f"mean/std need one value per channel ({c}), got {len(mean)} and {len(std)}"
            )
        if min(std) <= 0:
            raise SigngradError(f"std must be positive, got {tuple(std)}")
        if generator is not None and generator.device.type != "cpu":
            # Drawing on the CPU is what makes a seeded run identical on every device.
            raise SigngradError(
                f"Loader needs a CPU torch.Generator, got one on {generator.device}"
            )
        if drop_last and not train:
            raise SigngradError("drop_last=True with train=False would skip evaluation images")
        check_shard(shard, batch_size, train)
        self.shard = shard
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.train = train
        self.augment = augment
        self.generator = generator
        self.drop_last = drop_last
        shape = (1, c, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = len(self.labels), self.batch_size
        order = offsets = flip = None
        if self.train:
            order = torch.randperm(n, generator=self.generator).to(self.device)
            if self.augment:
                offsets, flip = random_crop_flip_params(n, self.generator)
                offsets, flip = offsets.to(self.device), flip.to(self.device)
        for i in range(len(self)):
            lo, hi = shard_range(i * bs, min((i + 1) * bs, n), *self.shard)
            if order is None:
                x, y = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            if offsets is not None and flip is not None:
                x = crop_flip(x, offsets[lo:hi], flip[lo:hi])
            x = x.float().div_(255.0).sub_(self.mean).div_(self.std)
            yield x, y


# --------------------------------------------------------------------------- files


def _file_candidates(spec: _Spec, fname: str) -> list[str]:
    # idx files may be kept gzipped (as downloaded) or already decompressed.
    return [fname] if spec.meta_file else [fname, fname + ".gz"]


def _find(spec: _Spec, folder: Path, fname: str) -> Path | None:
    for cand in _file_candidates(spec, fname):
        if (folder / cand).is_file():
            return folder / cand
    return None


def _required(spec: _Spec) -> list[str]:
    return [*spec.train_files, *spec.test_files, *([spec.meta_file] if spec.meta_file else [])]


def _ensure_present(name: str, spec: _Spec, base: Path, download: bool) -> None:
    folder = base / spec.folder
    missing = [f for f in _required(spec) if _find(spec, folder, f) is None]
    if not missing:
        return
    if not download:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SigngradError(
            f"{name}: {folder / missing[0]} not found{more} under data root {base}; "
            f"point {ENV_VAR} (or root=) at the folder holding {spec.folder}/, "
            "or allow download"
        )
    for src in SOURCES[name]:
        if src.extract:
            tmp = _download(src, base)
            try:
                _extract(src, tmp, spec.folder, missing, folder)
            finally:
                tmp.unlink(missing_ok=True)
        elif src.filename.removesuffix(".gz") in missing:
            tmp = _download(src, folder)
            os.replace(tmp, folder / src.filename)  # atomic: never a half-written file
    still = [f for f in missing if _find(spec, folder, f) is None]
    if still:  # a download table that does not cover the layout is a bug, not user error
        raise RuntimeError(f"{name}: download did not produce {[str(folder / f) for f in still]}")


def _download(src: Source, folder: Path) -> Path:
    """Fetch ``src`` into a temporary file in ``folder``, check its md5, return its path.

    The caller renames or extracts it; on any failure the partial file is removed.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{src.filename}.", suffix=".part")
    except OSError as e:
        raise SigngradError(f"cannot write to {folder} to download {src.filename}: {e}") from e
    tmp = Path(name)
    log.info("downloading %s to %s", src.url, folder)
    try:
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(src.url, timeout=60) as resp:
                total = resp.headers.get("Content-Length")
                bar = None
                if _tqdm is not None:
                    bar = _tqdm(
                        total=int(total) if total else None,
                        unit="B",
                        unit_scale=True,
                        desc=src.filename,
                        disable=None,  # no bar when stderr is not a terminal
                    )
                try:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        md5.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise SigngradError(
                f"download of {src.url} failed ({e}); fetch it by hand into {folder}"
            ) from e
        actual = md5.hexdigest()
        if actual != src.md5:
            raise SigngradError(
                f"checksum mismatch for {src.url}: expected md5 {src.md5}, got {actual}; "
                "the download was discarded"
            )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_atomic(stream: BinaryIO, dest: Path) -> None:
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
        os.replace(name, dest)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _extract(src: Source, archive: Path, top: str, wanted: list[str], folder: Path) -> None:
    """Take ``top/<f>`` for each ``f`` in ``wanted`` out of a verified .tar.gz into ``folder``.

    Members are read by exact name and written through a temporary file, so nothing
    outside ``folder`` can be written and no half-written file is left in place.
    """
    targets = {f"{top}/{f}": folder / f for f in wanted}
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:  # one pass in stream order: no re-decompression
                dest = targets.get(member.name)
                if dest is None or not member.isfile():
                    continue
                stream = tar.extractfile(member)
                assert stream is not None  # isfile() members always have a stream
                _write_atomic(stream, dest)
                del targets[member.name]
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise SigngradError(f"cannot extract {src.url}: {e}") from e
    if targets:
        raise SigngradError(f"{src.url} lacks {', '.join(sorted(targets))}")


# --------------------------------------------------------------------------- CIFAR


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays: a data file must not run arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
        ("numpy.core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy._core.multiarray", "scalar"): np.float64(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _read_pickle(path: Path) -> dict[bytes, object]:
    try:
        with path.open("rb") as f:
            obj = _NumpyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # pickle raises many types on bad input; all mean "corrupt"
        raise SigngradError(
            f"cannot read {path}: corrupt, truncated or not a data-set pickle "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise SigngradError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _read_cifar_batch(path: Path, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    for key in (b"data", spec.label_key):
        if key not in batch:
            raise SigngradError(f"{path}: no {key!r} entry (found {sorted(batch)})")
    data = batch[b"data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2) or (
        data.shape[1] != 3 * 32 * 32
    ):
        shape = getattr(data, "shape", None)
        raise SigngradError(
            f"{path}: b'data' should be uint8 N x 3072, found {type(data).__name__} "
            f"{getattr(data, 'dtype', '')} of shape {shape}"
        )
    try:
        labels = np.asarray(batch[spec.label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise SigngradError(f"{path}: {spec.label_key!r} is not a list of integers ({e})") from e
    if labels.ndim != 1 or len(labels) != len(data):
        raise SigngradError(
            f"{path}: {len(data)} images but {spec.label_key!r} of shape {labels.shape}"
        )
    _check_label_range(path, labels, spec.num_classes)
    return data, labels


def _check_label_range(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise SigngradError(
            f"{path}: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}"
        )


def _load_cifar(name: str, spec: _Spec, folder: Path) -> DataSet:
    meta_path = folder / spec.meta_file
    meta = _read_pickle(meta_path)
    raw = meta.get(spec.names_key)
    if not isinstance(raw, list) or len(raw) != spec.num_classes:
        raise SigngradError(
            f"{meta_path}: {spec.names_key!r} should list {spec.num_classes} class names"
        )
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in raw]

    def split(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_batch(folder / f, spec) for f in files]
        # Rows are R(1024) G(1024) B(1024): a plain reshape gives C x H x W.
        data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([lab for _, lab in parts])
        return torch.from_numpy(data), torch.from_numpy(labels)

    train_x, train_y = split(spec.train_files)
    test_x, test_y = split(spec.test_files)
    return DataSet(
        name=name,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        classes=classes,
        mean=spec.mean,
        std=spec.std,
        augment=spec.augment,
    )


# --------------------------------------------------------------------------- idx (MNIST)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes (magic 0x0000 08 <ndim>, big-endian dims)."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise SigngradError(f"cannot decompress {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SigngradError(f"{path}: {len(raw)} bytes, too short for an idx header")
    if raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise SigngradError(
            f"{path}: bad idx magic number {raw[:4].hex()}, expected {bytes([0, 0, 8, ndim]).hex()}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise SigngradError(
            f"{path}: {len(raw)} bytes but its header (dims {dims}) needs {expected}; "
            "truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx(name: str, spec: _Spec, folder: Path) -> DataSet:
    def split(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        img_path, lab_path = (_find(spec, folder, f) for f in files)
        assert img_path is not None and lab_path is not None  # _ensure_present checked
        images = _read_idx(img_path, 3)
        labels = _read_idx(lab_path, 1)
        if images.shape[1:] != (28, 28):
            raise SigngradError(f"{img_path}: images of {images.shape[1:]}, expected 28 x 28")
        if len(images) != len(labels):
            raise SigngradError(
                f"{img_path} holds {len(images)} images but {lab_path} {len(labels)} labels"
            )
        _check_label_range(lab_path, labels, spec.num_classes)
        # frombuffer arrays are read-only; the copy gives torch memory it may own.
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28).copy())
        return x, torch.from_numpy(labels.astype(np.int64))

    train_x, train_y = split(spec.train_files)
    test_x, test_y = split(spec.test_files)
    return DataSet(
        name=name,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        classes=list(spec.classes),
        mean=spec.mean,
        std=spec.std,
        augment=spec.augment,
    )


def _check_counts(name: str, spec: _Spec, folder: Path, ds: DataSet) -> None:
    found = (len(ds.train_labels), len(ds.test_labels))
    for split, n, official in zip(("train", "test"), found, spec.official, strict=True):
        if n > official:
            raise SigngradError(
                f"{name} in {folder}: {split} split has {n} images, "
                f"more than the official {official}"
            )
    if found != spec.official:
        log.warning(
            "%s in %s holds fewer images than the official release "
            "(train %d of %d, test %d of %d); using the local copy",
            name, folder, found[0], spec.official[0], found[1], spec.official[1],
        )  # fmt: skip


# --------------------------------------------------------------------------- statistics


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std on the [0, 1] scale, in float64 chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in images.split(4096):  # bounds the float64 copy for large folders
        x = chunk.to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.numel() // c
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())
