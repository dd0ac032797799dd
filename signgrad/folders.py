"""Image folders (``--data imagefolder:PATH``): held in memory, or streamed from disk.

Layout: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (ImageNet's name) or
``PATH/test/<class>/*``. Classes are the sorted sub-folder names of ``train``; files whose
name starts with ``.`` are skipped. Two ways to serve them:

* **memory**: every image is decoded once into one uint8 tensor (:func:`read_memory`,
  which :func:`signgrad.data.load` makes a :class:`signgrad.data.DataSet`); batches are
  then cut and augmented on the training device by :class:`signgrad.data.Loader`. Fast,
  but the memory grows with the folder.
* **stream**: only the file list is held (as numpy byte strings, so that worker processes
  share it without copying); worker processes decode each batch from disk
  (:class:`StreamLoader`), so memory stays constant as the folder grows.

``mode="auto"`` holds a folder in memory when its images are small (below
:data:`SMALL` pixels, where both ways apply the same augmentation) and all of them fit in
:data:`MEMORY_BUDGET` bytes at the first image's size; it streams otherwise. The log
says which was taken and why.

Augmentation, by the image size S (``image_size``, default: the shorter side of the first
training image, at most :data:`DEFAULT_MAX_SIZE`):

* S < :data:`SMALL` (CIFAR-sized): each image resized to S x S; training adds the
  CIFAR recipe, 4 pixels of zero padding, a random S x S crop and a random horizontal
  flip (the same in memory, on the device, and streamed, in the workers);
* S >= :data:`SMALL` (ImageNet-sized), streamed: torchvision's ImageNet recipe without
  torchvision: training takes a random-resized crop (area 8-100% of the image, aspect
  ratio 3/4-4/3, 10 tries, else the whole centre) resized to S x S and a random flip;
  evaluation resizes the shorter side to S / 0.875 and takes the centre S x S. In
  memory (only when forced), large images get the small-image recipe.

Randomness is drawn in the main process on the training generator (the permutation,
then one 63-bit seed per image from which its worker draws the crop), so a seeded run
gives the same batches with any number of workers, and ``--resume`` continues exactly.
JPEG files are decoded at a reduced scale where the crop allows it (Pillow's draft
mode), and batches travel as uint8 and are normalised on the training device.

An unreadable image is a :class:`SigngradError` naming the file; with ``skip_bad`` it is
left out of its batch, logged and counted in :attr:`StreamLoader.skipped`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from signgrad import images
from signgrad.distributed import check_shard, shard_range
from signgrad.errors import SigngradError

__all__ = [
    "DEFAULT_MAX_SIZE",
    "MEMORY_BUDGET",
    "MODES",
    "SMALL",
    "Decoded",
    "FileList",
    "Folder",
    "StreamLoader",
    "StreamSet",
    "decode",
    "default_workers",
    "open_folder",
    "read_memory",
    "scan",
]

log = logging.getLogger("signgrad.folders")

PREFIX = "imagefolder: "
MODES = ("auto", "memory", "stream")
SMALL = 64  # pixels: below, the CIFAR recipe; from here on, the ImageNet recipe
DEFAULT_MAX_SIZE = 224  # the default image size is the data's, but no larger than this
MEMORY_BUDGET = 2 * 2**30  # bytes of decoded images that "auto" holds in memory
EVAL_CROP = 0.875  # evaluation: the centre 224 of a 256 resize
PAD = 4  # the CIFAR recipe's zero padding before the random crop
_SAMPLE = 512  # images probed for the channels and decoded for mean/std when streaming
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)
_RRC_TRIES = 10


# --------------------------------------------------------------------------- listing


@dataclass(repr=False)
class FileList:
    """Files of one split: paths relative to ``base`` as numpy bytes (one buffer to hand
    to each worker, not a Python object per file) and int64 labels."""

    base: Path
    paths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.base / os.fsdecode(self.paths[i])

    def __repr__(self) -> str:
        return f"FileList({self.base}, {len(self)} files)"


@dataclass
class Folder:
    """The listing of an image folder: its classes and the files of both splits."""

    base: Path
    classes: list[str]
    train: FileList
    test: FileList
    test_split: str  # "val" or "test"


def _visible(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if not p.name.startswith("."))


def scan(path_text: str) -> Folder:
    """List ``PATH/train`` and ``PATH/val`` (or ``PATH/test``); every way the layout can be
    wrong is a SigngradError. Reads directory entries only, no image."""
    if not path_text:
        raise SigngradError("imagefolder needs a path: imagefolder:PATH")
    base = Path(path_text).expanduser()
    if not (base / "train").is_dir():
        raise SigngradError(f"imagefolder: {base / 'train'} is not a folder (need train/, val/)")
    test_split = next((s for s in ("val", "test") if (base / s).is_dir()), None)
    if test_split is None:
        raise SigngradError(
            f"imagefolder: {base} has neither val/ nor test/ beside train/ (need train/, val/)"
        )
    classes = [p.name for p in _visible(base / "train") if p.is_dir()]
    if not classes:
        raise SigngradError(f"imagefolder: {base / 'train'} has no class sub-folders")
    test_dir = base / test_split
    extra = [p.name for p in _visible(test_dir) if p.is_dir() and p.name not in classes]
    if extra:
        raise SigngradError(
            f"imagefolder: {test_dir} has classes missing from train/: {', '.join(extra)}"
        )

    def files(split: str) -> FileList:
        names: list[bytes] = []
        labels: list[int] = []
        empty = []
        for label, cls in enumerate(classes):
            d = base / split / cls
            found = [p for p in _visible(d) if p.is_file()] if d.is_dir() else []
            if not found:
                empty.append(d)
            names.extend(os.fsencode(f"{cls}/{p.name}") for p in found)
            labels.extend([label] * len(found))
        if empty and split == "train":
            # A class with no training image can never be learned, yet would get an output.
            raise SigngradError(
                f"imagefolder: class folder {empty[0]} holds no images"
                + (f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else "")
            )
        if empty:
            log.warning(
                "imagefolder: no %s images of class %s (%s); its accuracy is not measured",
                split, ", ".join(d.name for d in empty), base / split,
            )  # fmt: skip
        if not names:
            raise SigngradError(f"imagefolder: no images under {base / split}")
        return FileList(base / split, np.array(names), np.array(labels, dtype=np.int64))

    return Folder(base, classes, files("train"), files(test_split), test_split)


# --------------------------------------------------------------------------- one image


def _rrc_box(w: int, h: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """A random-resized crop of a w x h image as a box (left, top, right, bottom)."""
    area = w * h
    log_lo, log_hi = math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1])
    for _ in range(_RRC_TRIES):
        target = area * rng.uniform(*_RRC_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target * ratio))
        ch = round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(rng.integers(0, w - cw + 1))
            top = int(rng.integers(0, h - ch + 1))
            return left, top, left + cw, top + ch
    # As torchvision: the whole image, cut to the nearest allowed aspect ratio, centred.
    ratio = w / h
    if ratio < _RRC_RATIO[0]:
        cw, ch = w, round(w / _RRC_RATIO[0])
    elif ratio > _RRC_RATIO[1]:
        cw, ch = round(h * _RRC_RATIO[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch


def decode(
    path: Path, channels: int, size: int, *, train: bool, seed: int | None = None
) -> np.ndarray:
    """One image file as uint8 (channels, size, size), transformed as the module's
    docstring says for ``train`` (augmented with ``seed``) or evaluation."""
    rng = np.random.default_rng(seed) if train else None
    with images.open_image(path, PREFIX) as im:
        w, h = im.size
        if size >= SMALL:
            box = _rrc_box(w, h, rng) if rng is not None else images.centre_box(w, h, EVAL_CROP)
        else:
            box = images.centre_box(w, h)
        if im.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when the crop still gets >= size pixels.
            bw, bh = box[2] - box[0], box[3] - box[1]
            want = (math.ceil(w * size / bw), math.ceil(h * size / bh))
            im.draft("L" if channels == 1 else "RGB", want)
            sx, sy = im.size[0] / w, im.size[1] / h
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        where = f"{PREFIX}{path}"
        try:
            arr = images.to_array(im, channels, (size, size), where=where, box=box)
        except (OSError, ValueError) as e:  # truncated or corrupt pixel data
            raise SigngradError(f"{PREFIX}cannot decode {path}: {e}") from None
    if rng is None:
        return np.require(arr, requirements=["C", "W"])  # Pillow's arrays are read-only
    flip = rng.random() < 0.5
    if size < SMALL:
        oy, ox = (int(v) for v in rng.integers(0, 2 * PAD + 1, 2))
        padded = np.zeros((channels, size + 2 * PAD, size + 2 * PAD), np.uint8)
        padded[:, PAD : PAD + size, PAD : PAD + size] = arr
        arr = padded[:, oy : oy + size, ox : ox + size]
    if flip:
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------- streaming


@dataclass(repr=False)
class StreamSet:
    """A streamed image folder: what :class:`signgrad.data.DataSet` says about a data set
    (classes, shape, normalisation), with file lists instead of tensors."""

    name: str
    folder: Folder
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = True
    workers: int = 0
    skip_bad: bool = False
    classes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.classes = self.folder.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def crop(self) -> float | None:
        """The evaluation's centre crop (share of the shorter side), if it takes one."""
        return EVAL_CROP if self.size >= SMALL else None

    def __repr__(self) -> str:
        return (
            f"StreamSet({self.name!r}, train={len(self.folder.train)}, "
            f"{self.folder.test_split}={len(self.folder.test)}, {self.channels}x{self.size}"
            f"x{self.size}, classes={self.num_classes})"
        )


class _Files(torch.utils.data.Dataset):
    """What a worker does: (index, seed) -> (uint8 image or None, label, error or None)."""

    def __init__(self, files: FileList, channels: int, size: int, train: bool) -> None:
        self.files, self.channels, self.size, self.train = files, channels, size, train

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, int, str | None]:
        i, seed = item
        label = int(self.files.labels[i])
        try:
            arr = decode(self.files.path(i), self.channels, self.size, train=self.train, seed=seed)
        except SigngradError as e:  # handed to the main process, which raises or skips
            return None, label, str(e)
        return torch.from_numpy(arr), label, None


def _collate(
    items: list[tuple[Any, int, str | None]],
) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    good = [(x, y) for x, y, err in items if err is None]
    errors = [err for _, _, err in items if err is not None]
    x = torch.stack([x for x, _ in good]) if good else None
    return x, torch.tensor([y for _, y in good], dtype=torch.int64), errors


def default_workers() -> int:
    """Decoding processes by default: the cores this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def _worker_context() -> multiprocessing.context.BaseContext | None:
    """Where decoding workers start from: a fork server where the platform has one.

    Forking the training process itself (the default on Linux before Python 3.14) copies
    a process with threads (Gloo's, the previous loader's queue feeder, tqdm's monitor),
    and a child can inherit a lock one of them held and wait on it forever: a two-rank
    streamed run hung that way when its evaluation loader forked. A fork server is a
    single-threaded process started once, with this module (and torch) imported, so that
    each worker is still a cheap fork."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None  # Windows: spawn, its only start method
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # no effect once the server runs
    return ctx


class StreamLoader:
    """Iterates (x, y) batches of one split of a :class:`StreamSet`, decoded by
    ``workers`` processes (0: in this process) and moved to ``device``.

    x: float32 N x C x S x S, normalised with the set's mean/std; y: int64. Same contract
    as :class:`signgrad.data.Loader`: each training epoch draws on the CPU ``generator``
    a permutation and then one seed per image; evaluation keeps the file order and the
    last partial batch; ``shard=(rank, world)`` yields one rank's part of every batch, as
    there.
    """

    def __init__(
        self,
        ds: StreamSet,
        *,
        split: str,
        batch_size: int,
        train: bool,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if split not in ("train", "test"):
            raise SigngradError(f"split must be train or test, got {split!r}")
        if batch_size < 1:
            raise SigngradError(f"batch size must be at least 1, got {batch_size}")
        if drop_last and not train:
            raise SigngradError("drop_last=True with train=False would skip evaluation images")
        if generator is not None and generator.device.type != "cpu":
            # As signgrad.data.Loader: drawing on the CPU makes a run the same on any device.
            raise SigngradError(f"needs a CPU torch.Generator, got one on {generator.device}")
        check_shard(shard, batch_size, train)
        self.shard = shard
        self.ds = ds
        self.files = ds.folder.train if split == "train" else ds.folder.test
        self.batch_size = batch_size
        self.train = train
        self.device = torch.device(device)
        self.generator = generator
        self.drop_last = drop_last
        self.skipped = 0  # unreadable images left out so far (skip_bad only)
        shape = (1, ds.channels, 1, 1)
        self.mean = torch.tensor(ds.mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(ds.std, dtype=torch.float32, device=self.device).view(shape)

    @property
    def num_images(self) -> int:
        return len(self.files)

    def __len__(self) -> int:
        n = len(self.files)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> list[list[tuple[int, int]]]:
        n, bs = len(self.files), self.batch_size
        if self.train:
            order = torch.randperm(n, generator=self.generator).tolist()
            seeds = torch.randint(0, 2**63 - 1, (n,), generator=self.generator).tolist()
        else:
            order, seeds = list(range(n)), [0] * n
        items = list(zip(order, seeds, strict=True))
        batches = []
        for i in range(len(self)):
            lo, hi = shard_range(i * bs, min((i + 1) * bs, n), *self.shard)
            batches.append(items[lo:hi])
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.ds
        workers = ds.workers
        loader = torch.utils.data.DataLoader(
            _Files(self.files, ds.channels, ds.size, self.train and ds.augment),
            batch_sampler=self._batches(),
            num_workers=workers,
            multiprocessing_context=_worker_context() if workers else None,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        for x, y, errors in loader:
            for err in errors:
                if not ds.skip_bad:
                    raise SigngradError(f"{err} (--skip-bad-images leaves such files out)")
                self.skipped += 1
                log.warning("%s; skipped", err)
            if x is None:
                continue
            x = x.to(self.device, non_blocking=True).float().div_(255.0)
            yield x.sub_(self.mean).div_(self.std), y.to(self.device, non_blocking=True)


# --------------------------------------------------------------------------- opening


def _first_size(folder: Folder) -> tuple[int, int]:
    with images.open_image(folder.train.path(0), PREFIX) as im:
        return im.size


def _sample(files: FileList, k: int) -> list[int]:
    """A fixed spread of ``k`` indices (every n/k-th file), the same on every run."""
    n = len(files)
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, k))})


def _each(
    files: FileList, idx: Sequence[int], skip_bad: bool, read: Callable[[Path], Any]
) -> Iterator[Any]:
    """``read(path)`` of each file of ``idx``, lazily; a file it cannot read is a
    SigngradError, or with ``skip_bad`` logged and passed over."""
    for i in idx:
        try:
            yield read(files.path(i))
        except SigngradError as e:
            if not skip_bad:
                raise
            log.warning("%s; skipped", e)


def _is_grey(path: Path) -> bool:
    with images.open_image(path, PREFIX) as im:
        return images.is_grey(im)


def _probe_channels(lists: Sequence[FileList], k: int | None, skip_bad: bool = False) -> int:
    """1 when every probed image is grey, else 3; ``k`` None probes every file."""
    for files in lists:
        idx = range(len(files)) if k is None else _sample(files, k)
        if not all(_each(files, idx, skip_bad, _is_grey)):
            return 3
    return 1


def _stats(
    files: FileList, channels: int, size: int, skip_bad: bool
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on [0, 1] over a fixed sample of evaluation-transformed
    training images."""

    def evaluated(path: Path) -> np.ndarray:
        return decode(path, channels, size, train=False)

    arrays = list(_each(files, _sample(files, _SAMPLE), skip_bad, evaluated))
    if not arrays:
        raise SigngradError(f"imagefolder: no readable image among those sampled in {files.base}")
    x = np.stack(arrays).astype(np.float64) / 255.0
    mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


@dataclass(repr=False)
class Decoded:
    """A folder decoded into memory: uint8 images (N x C x H x W) and int64 labels of
    both splits; :func:`signgrad.data.load` makes it a :class:`signgrad.data.DataSet`."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    augment: bool


def read_memory(folder: Folder, image_size: int | None, augment: bool) -> Decoded:
    """Decode every image of ``folder``.

    Channels: grey when every image is grey, else RGB. Without ``image_size`` every image
    is resized (bilinear) to the size of the first training image; with it, to
    ``image_size`` squared (shorter side, centre crop)."""
    channels = _probe_channels((folder.train, folder.test), None)
    first = _first_size(folder) if image_size is None else None

    def read(files: FileList) -> tuple[torch.Tensor, torch.Tensor]:
        if first is not None:
            arrays = [
                images.read(files.path(i), channels, first, PREFIX) for i in range(len(files))
            ]
        else:
            arrays = [
                decode(files.path(i), channels, image_size, train=False) for i in range(len(files))
            ]
        return torch.from_numpy(np.stack(arrays)), torch.from_numpy(files.labels.copy())

    train_x, train_y = read(folder.train)
    test_x, test_y = read(folder.test)
    return Decoded(
        f"imagefolder:{folder.base}", train_x, train_y, test_x, test_y, folder.classes, augment
    )


def open_folder(
    path_text: str,
    *,
    mode: str = "auto",
    image_size: int | None = None,
    augment: bool = True,
    workers: int | None = None,
    skip_bad: bool = False,
) -> Decoded | StreamSet:
    """The image folder at ``path_text`` decoded into memory (:class:`Decoded`) or to be
    streamed (:class:`StreamSet`), as ``mode`` says (see the module's docstring)."""
    if mode not in MODES:
        raise SigngradError(f"unknown folder mode {mode!r}; choose one of {', '.join(MODES)}")
    folder = scan(path_text)
    w, h = _first_size(folder)
    size = image_size or min(DEFAULT_MAX_SIZE, w, h)
    n = len(folder.train) + len(folder.test)
    held = n * 3 * (size * size if image_size else w * h)
    if mode == "auto":
        small, fits = size < SMALL, held <= MEMORY_BUDGET
        mode = "memory" if small and fits else "stream"
        why = (
            f"{size}-pixel images, {held / 2**20:.0f} MiB decoded"
            if mode == "memory"
            else (f"{held / 2**20:.0f} MiB decoded exceeds {MEMORY_BUDGET / 2**30:.0f} GiB"
                  if not fits else f"images of {size} pixels take the random-resized-crop recipe")
        )  # fmt: skip
        log.info("imagefolder: %s images, held in %s (%s)", f"{n:,}", mode, why)
    else:
        log.info("imagefolder: %s images, %s as asked", f"{n:,}", mode)
    if mode == "memory":
        return read_memory(folder, image_size, augment)
    channels = _probe_channels((folder.train,), _SAMPLE, skip_bad)
    mean, std = _stats(folder.train, channels, size, skip_bad)
    ds = StreamSet(
        name=f"imagefolder:{folder.base}",
        folder=folder,
        channels=channels,
        size=size,
        mean=mean,
        std=std,
        augment=augment,
        workers=default_workers() if workers is None else workers,
        skip_bad=skip_bad,
    )
    log.info(
        "imagefolder: streaming %s, %d worker(s), %s recipe", ds, ds.workers,
        "ImageNet" if size >= SMALL else "CIFAR",
    )  # fmt: skip
    return ds
