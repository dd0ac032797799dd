"""Tests for signgrad.data: official formats, bad input, verified downloads, batches.

Real data is read from ``$SIGNGRAD_DATA`` (tests that need it skip when it is unset or
lacks the files); everything else uses small files in the official formats written here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from signgrad import data
from signgrad.errors import SigngradError

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
IDX_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# --------------------------------------------------------------------------- helpers


def _real_root(folder: str, files: list[str]) -> Path:
    """The real data root from $SIGNGRAD_DATA, or skip the test."""
    env = os.environ.get("SIGNGRAD_DATA")
    if not env:
        pytest.skip("SIGNGRAD_DATA is not set: no real data to test against")
    root = Path(env)
    absent = [f for f in files if not (root / folder / f).is_file()]
    if absent:
        pytest.skip(f"{root / folder} lacks {', '.join(absent)}")
    return root


@pytest.fixture(scope="module")
def cifar_root() -> Path:
    return _real_root("cifar-10-batches-py", CIFAR10_FILES)


@pytest.fixture(scope="module")
def fmnist_root() -> Path:
    return _real_root("fashion-mnist", IDX_FILES)


@pytest.fixture(scope="module")
def cifar(cifar_root: Path) -> data.DataSet:
    return data.load("cifar10", cifar_root, download=False)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, n_train: int = 50, n_test: int = 20, gz: bool = True) -> dict:
    """Write a small MNIST-layout data set; return its arrays."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def _cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"synthetic",
        label_key: rng.integers(0, num_classes, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
    }


def _write_cifar10(folder: Path, sizes: tuple[int, ...] = (6, 5, 5, 5, 5, 7)) -> dict:
    """Write a small CIFAR-10-layout data set (5 train batches, test batch, meta)."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, (fname, n) in enumerate(zip(CIFAR10_FILES[:6], sizes, strict=True)):
        batches[fname] = _cifar_batch(n, 10, b"labels", seed=i)
        (folder / fname).write_bytes(pickle.dumps(batches[fname], protocol=2))
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- real data


def test_cifar10_subset(cifar_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="signgrad.data"):
        ds = data.load("cifar10", cifar_root, download=False)
    assert ds.train_images.shape == (5170, 3, 32, 32)
    assert ds.test_images.shape == (1017, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.test_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.dtype == torch.int64
    assert ds.classes == CIFAR10_CLASSES
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, (32, 32))
    assert ds.augment and ds.mean == (0.4914, 0.4822, 0.4465)
    counts = torch.bincount(ds.train_labels, minlength=10)
    assert len(counts) == 10 and int(counts.sum()) == 5170
    assert int(counts.min()) >= 484 and int(counts.max()) <= 540
    warnings = [r for r in caplog.records if r.name == "signgrad.data"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    msg = warnings[0].getMessage()
    assert "train 5170 of 50000" in msg and "test 1017 of 10000" in msg


def test_cifar10_pixel_layout(cifar: data.DataSet, cifar_root: Path) -> None:
    # Independent read of the first test image: row = R(1024) G(1024) B(1024).
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    row = raw[b"data"][0]
    assert torch.equal(cifar.test_images[0, 1], torch.from_numpy(row[1024:2048].reshape(32, 32)))
    assert int(cifar.test_labels[0]) == raw[b"labels"][0]


def test_fashion_mnist(fmnist_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="signgrad.data"):
        ds = data.load("fashion-mnist", fmnist_root, download=False)
    assert not [r for r in caplog.records if r.name == "signgrad.data"]  # complete copy
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.train_labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_labels), torch.full((10,), 1000))
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert (ds.mean, ds.std, ds.augment) == ((0.2860,), (0.3530,), False)
    # The official mean agrees with the pixels actually read.
    assert abs(ds.train_images.float().mean().item() / 255 - 0.2860) < 1e-3


# --------------------------------------------------------------------------- names, root


def test_names_and_unknown_name() -> None:
    assert data.names() == ["cifar10", "cifar100", "fashion-mnist", "mnist", "imagefolder:PATH"]
    with pytest.raises(SigngradError, match="unknown data set 'cifar11'") as exc:
        data.load("cifar11")
    assert "cifar10, cifar100, fashion-mnist, mnist, imagefolder:PATH" in str(exc.value)


def test_data_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNGRAD_DATA", str(tmp_path / "env"))
    assert data.data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data.data_root() == tmp_path / "env"
    monkeypatch.delenv("SIGNGRAD_DATA")
    assert data.data_root() == Path.home() / ".cache" / "signgrad" / "data"


def test_missing_files_without_download(tmp_path: Path) -> None:
    with pytest.raises(SigngradError) as exc:
        data.load("cifar10", tmp_path, download=False)
    msg = str(exc.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert f"data root {tmp_path}" in msg and "SIGNGRAD_DATA" in msg
    assert "and 6 more" in msg
    assert list(tmp_path.iterdir()) == []  # nothing was fetched or created


# --------------------------------------------------------------------------- bad CIFAR files


def test_truncated_cifar_batch(cifar_root: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(cifar_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    bad = folder / "data_batch_3"
    bad.chmod(0o644)  # the shared copy is read-only
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SigngradError, match="pickle data was truncated") as exc:
        data.load("cifar10", tmp_path, download=False)
    assert str(bad) in str(exc.value)


def test_cifar_inconsistent_lengths(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar10(folder)
    batch = batches["data_batch_2"]
    batch[b"labels"] = batch[b"labels"][:-1]
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(SigngradError, match="5 images but b'labels' of shape") as exc:
        data.load("cifar10", tmp_path, download=False)
    assert str(folder / "data_batch_2") in str(exc.value)


def test_cifar_wrong_row_length(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar10(folder)
    batch = batches["test_batch"]
    batch[b"data"] = batch[b"data"][:, :3000]
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(SigngradError, match=r"uint8 N x 3072, found ndarray uint8 of shape"):
        data.load("cifar10", tmp_path, download=False)


def test_pickle_may_not_run_code(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(str(marker))})
    (folder / "data_batch_1").write_bytes(evil)
    with pytest.raises(SigngradError, match="refusing to load"):
        data.load("cifar10", tmp_path, download=False)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # unpickling would call pathlib.Path.touch(path)
        return (Path.touch, (Path(self.path),))


def test_cifar_python2_style_pickle(tmp_path: Path) -> None:
    # The official files predate numpy 2: their arrays name numpy.core.multiarray.
    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_cifar10(folder)
    path = folder / "data_batch_1"
    raw = pickle.dumps(batches["data_batch_1"], protocol=2)
    assert b"numpy._core.multiarray\n" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ds = data.load("cifar10", tmp_path, download=False)
    assert torch.equal(
        ds.train_images[:6].reshape(6, -1), torch.from_numpy(batches[path.name][b"data"])
    )


def test_cifar100_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = _cifar_batch(12, 100, b"fine_labels", seed=1)
    train[b"coarse_labels"] = [0] * 12
    test = _cifar_batch(4, 100, b"fine_labels", seed=2)
    (folder / "train").write_bytes(pickle.dumps(train))
    (folder / "test").write_bytes(pickle.dumps(test))
    fine = [f"class{i:03d}".encode() for i in range(100)]
    meta = {b"fine_label_names": fine, b"coarse_label_names": [b"x"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="signgrad.data"):
        ds = data.load("cifar100", tmp_path, download=False)
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.num_classes == 100 and ds.classes[7] == "class007"
    assert ds.train_labels.tolist() == train[b"fine_labels"]
    # R plane first, then G, then B.
    assert torch.equal(ds.train_images[3, 2].flatten(), torch.from_numpy(train[b"data"][3, 2048:]))
    assert ds.mean == (0.5071, 0.4865, 0.4409)
    assert "train 12 of 50000, test 4 of 10000" in caplog.text


# --------------------------------------------------------------------------- bad idx files


def test_idx_plain_and_gz_equal(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path / "a" / "mnist", gz=True)
    _write_mnist(tmp_path / "b" / "mnist", gz=False)
    a = data.load("mnist", tmp_path / "a", download=False)
    b = data.load("mnist", tmp_path / "b", download=False)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).unsqueeze(1)
    assert torch.equal(a.train_images, expected)
    assert a.classes == [str(d) for d in range(10)] and a.in_channels == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("garbage_gz", "cannot decompress"),
        ("truncated_gz", "cannot decompress"),
        ("truncated_idx", "bytes but its header"),
        ("bad_magic", "bad idx magic number 00000803, expected 00000801"),
        ("short_labels", "holds 50 images but"),
    ],
)
def test_corrupt_idx(tmp_path: Path, damage: str, message: str) -> None:
    folder = tmp_path / "mnist"
    arrays = _write_mnist(folder)
    labels = arrays["train-labels-idx1-ubyte"]
    gz = folder / "train-labels-idx1-ubyte.gz"
    bad = gz
    if damage == "garbage_gz":
        gz.write_bytes(b"this is not gzip data at all")
    elif damage == "truncated_gz":
        gz.write_bytes(gz.read_bytes()[:-20])
    else:
        gz.unlink()  # an already-decompressed file takes its place
        bad = folder / "train-labels-idx1-ubyte"
        if damage == "truncated_idx":
            bad.write_bytes(_idx_bytes(labels)[:-3])
        elif damage == "bad_magic":
            bad.write_bytes(_idx_bytes(labels[:, None, None]))
        else:
            bad.write_bytes(_idx_bytes(labels[:-1]))
    with pytest.raises(SigngradError, match=message) as exc:
        data.load("mnist", tmp_path, download=False)
    assert str(bad) in str(exc.value)


def test_truncated_real_fashion_mnist(fmnist_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in IDX_FILES:
        shutil.copyfile(fmnist_root / "fashion-mnist" / name, folder / name)
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:2000])
    with pytest.raises(SigngradError, match="cannot decompress") as exc:
        data.load("fashion-mnist", tmp_path, download=False)
    assert str(bad) in str(exc.value)


def test_more_images_than_official(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "mnist", n_train=10, n_test=10001, gz=False)
    with pytest.raises(SigngradError, match="test split has 10001 images, more than the official"):
        data.load("mnist", tmp_path, download=False)


# --------------------------------------------------------------------------- downloads


def _serve_mnist(src: Path, monkeypatch: pytest.MonkeyPatch, md5: bool = True) -> None:
    """Point the MNIST source table at local files (official md5s unless md5=True)."""
    entries = []
    for old in data.SOURCES["mnist"]:
        path = src / old.filename
        entries.append(data.Source(old.filename, path.as_uri(), _md5(path) if md5 else old.md5))
    monkeypatch.setitem(data.SOURCES, "mnist", tuple(entries))


def test_download_idx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = _write_mnist(tmp_path / "src")
    _serve_mnist(tmp_path / "src", monkeypatch)
    root = tmp_path / "root"
    ds = data.load("mnist", root, download=True)
    assert _files_under(root) == sorted(f"mnist/{f}" for f in IDX_FILES)
    assert ds.test_labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # A second load finds the files and needs no source at all.
    monkeypatch.setitem(data.SOURCES, "mnist", ())
    assert torch.equal(data.load("mnist", root).train_images, ds.train_images)


def test_download_only_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_mnist(tmp_path / "src")
    root = tmp_path / "root"
    _write_mnist(root / "mnist")
    (root / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    for f in IDX_FILES:  # a wrong md5 everywhere: only the missing file may be fetched
        (tmp_path / "src" / f).write_bytes(b"wrong")
    _serve_mnist(tmp_path / "src", monkeypatch, md5=False)
    with pytest.raises(SigngradError, match="t10k-images-idx3-ubyte.gz: expected md5"):
        data.load("mnist", root)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_checksum_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    wrong = tmp_path / "src" / "wrong.bin"
    wrong.parent.mkdir()
    wrong.write_bytes(b"not the data set you are looking for\n" * 1000)
    entries = tuple(
        data.Source(s.filename, wrong.as_uri(), s.md5, s.extract) for s in data.SOURCES[name]
    )
    monkeypatch.setitem(data.SOURCES, name, entries)
    root = tmp_path / "root"
    with pytest.raises(SigngradError, match="checksum mismatch") as exc:
        data.load(name, root, download=True)
    msg = str(exc.value)
    assert entries[0].md5 in msg and _md5(wrong) in msg and wrong.as_uri() in msg
    assert _files_under(root) == []  # the partial download was removed


def test_download_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = (tmp_path / "nowhere.tar.gz").as_uri()
    monkeypatch.setitem(data.SOURCES, "cifar10", (data.Source("c.tar.gz", url, "0" * 32, True),))
    with pytest.raises(SigngradError, match="download of .* failed"):
        data.load("cifar10", tmp_path / "root")
    assert _files_under(tmp_path / "root") == []


def test_download_and_extract_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        info = tarfile.TarInfo("../escape")  # a hostile member must not be written
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    source = data.Source("cifar-10-python.tar.gz", archive.as_uri(), _md5(archive), True)
    monkeypatch.setitem(data.SOURCES, "cifar10", (source,))
    root = tmp_path / "root"
    ds = data.load("cifar10", root)
    assert _files_under(root) == sorted(f"cifar-10-batches-py/{f}" for f in CIFAR10_FILES)
    assert not (tmp_path / "escape").exists()
    assert ds.train_images.shape == (26, 3, 32, 32) and ds.classes == CIFAR10_CLASSES
    assert ds.test_labels.tolist() == batches["test_batch"][b"labels"]


# --------------------------------------------------------------------------- image folder


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_imagefolder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # Created out of order: classes must come back sorted.
    for i in range(3):
        _png(tmp_path / "train" / "b_cat" / f"{i}.png", rng.integers(0, 256, (6, 8, 3), np.uint8))
    red = np.zeros((6, 8, 3), np.uint8)
    red[..., 0] = 200
    _png(tmp_path / "train" / "a_dog" / "0.png", red)  # first image: fixes the size 6 x 8
    _png(tmp_path / "train" / "a_dog" / "1.png", rng.integers(0, 256, (12, 16), np.uint8))
    (tmp_path / "train" / "a_dog" / ".DS_Store").write_bytes(b"junk")  # hidden: skipped
    _png(tmp_path / "test" / "b_cat" / "0.png", rng.integers(0, 256, (6, 8, 3), np.uint8))
    ds = data.load(f"imagefolder:{tmp_path}")
    assert ds.classes == ["a_dog", "b_cat"]
    assert ds.train_images.shape == (5, 3, 6, 8) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (1, 3, 6, 8)
    assert ds.train_labels.tolist() == [0, 0, 1, 1, 1] and ds.test_labels.tolist() == [1]
    assert torch.equal(ds.train_images[0], torch.from_numpy(red).permute(2, 0, 1))
    grey = ds.train_images[1]  # greyscale, resized: all channels equal
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    x = ds.train_images.double() / 255
    assert np.allclose(ds.mean, x.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(ds.std, x.std(dim=(0, 2, 3), unbiased=False).tolist())
    # The standard crop and flip, unless asked not to.
    assert ds.name == f"imagefolder:{tmp_path}" and ds.augment
    assert not data.load(f"imagefolder:{tmp_path}", augment=False).augment


def test_imagefolder_greyscale_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("x", "y"):
            _png(tmp_path / split / cls / "0.png", rng.integers(0, 256, (5, 5), np.uint8))
    ds = data.load(f"imagefolder:{tmp_path}")
    assert ds.in_channels == 1 and len(ds.mean) == 1 and ds.image_size == (5, 5)
    (tmp_path / "train" / "x" / "notes.txt").write_text("not an image")
    with pytest.raises(SigngradError, match="cannot read image .*notes.txt"):
        data.load(f"imagefolder:{tmp_path}")
    (tmp_path / "train" / "x" / "notes.txt").unlink()
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(SigngradError, match=r"neither val/ nor test/ beside train/"):
        data.load(f"imagefolder:{tmp_path}")


# --------------------------------------------------------------------------- Loader


def _images(n: int = 250, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _loader(images: torch.Tensor, seed: int | None = 0, **kw) -> data.Loader:
    args = dict(batch_size=64, mean=MEAN, std=STD, train=True, augment=True)
    args.update(kw)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return data.Loader(images, torch.arange(len(images)), generator=gen, **args)


def _reference_crop_flip(images: torch.Tensor, offsets, flip, pad: int = 4) -> torch.Tensor:
    """Per-image crop + flip, written independently of the batched version."""
    out = []
    h, w = images.shape[2:]
    for img, (oy, ox), f in zip(images.numpy(), offsets.tolist(), flip.tolist(), strict=True):
        padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
        crop = padded[:, oy : oy + h, ox : ox + w]
        out.append(crop[:, :, ::-1] if f else crop)
    return torch.from_numpy(np.stack(out).copy())


def _normalise(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (images.double() / 255 - m) / s


def test_loader_batches_and_length() -> None:
    images = _images(250)
    train = _loader(images)
    batches = list(train)
    assert len(train) == len(batches) == 4
    assert [len(y) for _, y in batches] == [64, 64, 64, 58]
    x, y = batches[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    seen = torch.cat([y for _, y in batches])  # labels are the image indices
    assert sorted(seen.tolist()) == list(range(250)) and seen.tolist() != list(range(250))
    assert len(_loader(images, drop_last=True)) == 3
    assert [len(y) for _, y in _loader(images, drop_last=True)] == [64, 64, 64]
    evaluation = _loader(images, train=False)
    ys = [y for _, y in evaluation]
    assert len(evaluation) == 4 and torch.equal(torch.cat(ys), torch.arange(250))


def test_loader_normalisation_by_hand() -> None:
    images = _images(20)
    x, y = next(iter(_loader(images, train=False, batch_size=8)))
    k, c, i, j = 5, 2, 17, 3
    by_hand = (int(images[k, c, i, j]) / 255 - MEAN[c]) / STD[c]
    assert x[k, c, i, j].item() == pytest.approx(by_hand, abs=1e-5)
    assert torch.allclose(x.double(), _normalise(images[:8]), atol=1e-5)
    assert y.tolist() == list(range(8))


def test_crop_flip_matches_reference() -> None:
    images = _images(64, c=3, h=7, w=9, seed=3)  # non-square catches H/W mix-ups
    g = torch.Generator().manual_seed(11)
    offsets, flip = data.random_crop_flip_params(64, g)
    offsets[:2] = torch.tensor([[0, 8], [8, 0]])  # extreme corners
    flip[:2] = torch.tensor([True, False])
    expected = _reference_crop_flip(images, offsets, flip)
    assert torch.equal(data.crop_flip(images, offsets, flip), expected)


def test_crop_shifts_content() -> None:
    images = _images(3, h=10, w=12, seed=4)
    offsets = torch.tensor([[0, 0], [4, 4], [4, 4]])
    flip = torch.tensor([False, False, True])
    out = data.crop_flip(images, offsets, flip)
    # Offset (0, 0): the image moves 4 down and 4 right, zeros come in at top/left.
    assert torch.equal(out[0, :, 4:, 4:], images[0, :, :-4, :-4])
    assert int(out[0, :, :4].abs().sum()) == 0 and int(out[0, :, :, :4].abs().sum()) == 0
    assert torch.equal(out[1], images[1])  # centred crop: unchanged
    assert torch.equal(out[2], images[2].flip(-1))  # centred and mirrored


def test_random_crop_flip_params() -> None:
    offsets, flip = data.random_crop_flip_params(2000, torch.Generator().manual_seed(0))
    assert offsets.shape == (2000, 2) and offsets.dtype == torch.int64 and flip.dtype == torch.bool
    assert set(offsets.flatten().tolist()) == set(range(9))
    assert 900 < int(flip.sum()) < 1100


def test_loader_augmentation_replays_from_seed() -> None:
    images = _images(100)
    x, y = next(iter(_loader(images, seed=5, batch_size=32)))
    g = torch.Generator().manual_seed(5)  # documented draw order: permutation, then params
    perm = torch.randperm(100, generator=g)
    offsets, flip = data.random_crop_flip_params(100, g)
    assert torch.equal(y, perm[:32])
    expected = _reference_crop_flip(images[perm[:32]], offsets[:32], flip[:32])
    assert torch.allclose(x.double(), _normalise(expected), atol=1e-5)
    plain = _normalise(images[perm[:32]])
    assert not torch.allclose(x.double(), plain, atol=1e-3)  # augmentation did something


def test_loader_determinism() -> None:
    images = _images(200)

    def epochs(seed: int, n: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        loader = _loader(images, seed=seed)
        return [list(loader) for _ in range(n)]

    a, b, c = epochs(7), epochs(7), epochs(8)
    for ea, eb in zip(a, b, strict=True):
        for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0][1], c[0][0][1])  # another seed, another order
    assert not torch.equal(a[0][0][1], a[1][0][1])  # a new epoch, a new order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_loader_same_batches_on_cuda() -> None:
    images = _images(300)
    cpu = list(_loader(images, seed=3))
    gpu = list(_loader(images, seed=3, device="cuda"))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda"
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-6)


def test_loader_on_real_cifar(cifar: data.DataSet) -> None:
    loader = data.Loader(
        cifar.test_images,
        cifar.test_labels,
        batch_size=500,
        mean=cifar.mean,
        std=cifar.std,
        train=False,
        augment=cifar.augment,
    )
    batches = list(loader)
    assert [len(y) for _, y in batches] == [500, 500, 17]
    x = torch.cat([x for x, _ in batches])
    # Evaluation batches are the test set, in order, un-augmented.
    assert torch.allclose(
        x.double(), _normalise(cifar.test_images, cifar.mean, cifar.std), atol=1e-5
    )


def test_loader_rejects_bad_arguments() -> None:
    images = _images(10)
    with pytest.raises(SigngradError, match="drop_last=True with train=False"):
        _loader(images, train=False, drop_last=True)
    with pytest.raises(SigngradError, match=r"one value per channel \(3\), got 1 and 1"):
        _loader(images, mean=(0.5,), std=(0.5,))
    with pytest.raises(SigngradError, match="uint8 images"):
        data.Loader(
            images.float(),
            torch.arange(10),
            batch_size=4,
            mean=MEAN,
            std=STD,
            train=True,
            augment=False,
        )
    with pytest.raises(SigngradError, match="batch size must be at least 1"):
        _loader(images, batch_size=0)
