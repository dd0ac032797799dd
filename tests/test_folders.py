"""Image folders held in memory or streamed (signgrad.folders), on real CIFAR-10 images
written to temporary folders."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from signgrad import data, folders, images
from signgrad.errors import SigngradError


@pytest.fixture(scope="module")
def cifar(cifar_root: Path) -> data.DataSet:
    return data.load("cifar10", root=cifar_root, download=False)


def _export(
    ds: data.DataSet,
    base: Path,
    *,
    per_class: tuple[int, int] = (12, 4),
    classes: int = 3,
    size: tuple[int, int] | None = None,
    suffix: str = ".jpg",
    split: str = "val",
) -> Path:
    """Write real images of the first ``classes`` classes as files under ``base``."""
    for name, x, y, n in (
        ("train", ds.train_images, ds.train_labels, per_class[0]),
        (split, ds.test_images, ds.test_labels, per_class[1]),
    ):
        for c in range(classes):
            d = base / name / ds.classes[c].replace("/", "-")  # Fashion-MNIST's T-shirt/top
            d.mkdir(parents=True, exist_ok=True)
            for i in (y == c).nonzero().flatten()[:n].tolist():
                pixels = x[i].permute(1, 2, 0).numpy()
                im = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
                if size is not None:
                    im = im.resize(size, Image.BICUBIC)
                im.save(d / f"{i}{suffix}", quality=90) if suffix == ".jpg" else im.save(
                    d / f"{i}{suffix}"
                )
    return base


def _batches(ds: folders.StreamSet, split: str = "train", seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    train = split == "train"
    loader = folders.StreamLoader(ds, split=split, batch_size=8, train=train, generator=g)
    return list(loader)


def test_scan_takes_val_or_test(cifar, tmp_path):
    base = _export(cifar, tmp_path / "a", split="val")
    f = folders.scan(str(base))
    assert f.test_split == "val" and f.classes == sorted(cifar.classes[:3])
    assert len(f.train) == 36 and len(f.test) == 12
    assert f.train.paths.dtype.kind == "S"  # bytes, not Python objects: cheap for workers
    # Labels follow the sorted class folders.
    for i in range(len(f.train)):
        assert f.train.path(i).parent.name == f.classes[f.train.labels[i]]
    base = _export(cifar, tmp_path / "b", split="test")
    assert folders.scan(str(base)).test_split == "test"
    (tmp_path / "c" / "train" / "x").mkdir(parents=True)
    with pytest.raises(SigngradError, match="neither val/ nor test/"):
        folders.scan(str(tmp_path / "c"))


def test_streamed_batches_do_not_depend_on_workers(cifar, tmp_path):
    base = _export(cifar, tmp_path, size=(96, 80))
    sets = [folders.open_folder(str(base), mode="stream", workers=w) for w in (0, 2)]
    assert sets[0].size == 80 and sets[0].in_channels == 3 and sets[0].mean == sets[1].mean
    for split in ("train", "test"):
        a, b = (_batches(s, split) for s in sets)
        assert len(a) == len(b) == (5 if split == "train" else 2)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xa.shape[1:] == (3, 80, 80) and xa.dtype == torch.float32
    # Another seed, another epoch; the evaluation order is the files' order.
    other = _batches(sets[0], "train", seed=1)
    assert not torch.equal(other[0][0], _batches(sets[0], "train")[0][0])
    y = torch.cat([y for _, y in _batches(sets[0], "test")])
    assert y.tolist() == sets[0].folder.test.labels.tolist()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's default start is fork")
def test_decoding_workers_start_from_a_fork_server_not_from_the_training_process():
    """Forking the training process, whose other threads may hold locks, hung a two-rank
    run; the workers above (workers=2) start from a single-threaded fork server."""
    assert folders._worker_context().get_start_method() == "forkserver"


def test_streamed_shards_of_the_ranks_make_up_the_global_batch(cifar, tmp_path):
    """Data-parallel ranks (``shard=(rank, world)``) each decode their part of every batch
    of the same seeded permutation; together they are the single process's batches."""
    ds = folders.open_folder(str(_export(cifar, tmp_path, size=(96, 80))), mode="stream",
                             workers=0)  # fmt: skip
    for split, train in (("train", True), ("test", False)):
        whole = _batches(ds, split)
        parts = [
            list(
                folders.StreamLoader(
                    ds,
                    split=split,
                    batch_size=8,
                    train=train,
                    generator=torch.Generator().manual_seed(0),
                    shard=(r, 2),
                )
            )  # fmt: skip
            for r in range(2)
        ]
        assert all(len(p) == len(whole) for p in parts)
        for i, (x, y) in enumerate(whole):
            assert [len(p[i][1]) for p in parts] == [len(y) - len(y) // 2, len(y) // 2]
            assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    with pytest.raises(SigngradError, match="does not split evenly over 3 ranks"):
        folders.StreamLoader(ds, split="train", batch_size=8, train=True, shard=(0, 3))


def test_evaluation_is_the_centre_crop(cifar, tmp_path):
    # torchvision's recipe done the plain way: shorter side to S / 0.875, then the centre S.
    rgb = cifar.test_images[0].permute(1, 2, 0).numpy()
    im = Image.fromarray(rgb).resize((300, 200), Image.BICUBIC)
    path = tmp_path / "a.png"
    im.save(path)
    got = folders.decode(path, 3, 64, train=False)
    short = round(64 / folders.EVAL_CROP)
    resized = np.asarray(im.resize((round(300 * short / 200), short), Image.BILINEAR))
    top, left = (resized.shape[0] - 64) // 2, (resized.shape[1] - 64) // 2
    want = resized[top : top + 64, left : left + 64].transpose(2, 0, 1)
    assert got.shape == (3, 64, 64) and got.dtype == np.uint8
    # The two differ by resampling and up to half a pixel of offset only.
    near = np.abs(got.astype(int) - want).mean()
    squeezed = np.asarray(im.resize((64, 64), Image.BILINEAR)).transpose(2, 0, 1)
    corner = np.asarray(im.resize((73, 64), Image.BILINEAR, box=(0, 0, 200 * 73 / 64, 200)))
    for wrong in (squeezed, corner[:, :64].transpose(2, 0, 1)):
        assert np.abs(got.astype(int) - wrong).mean() > 2 * near, near


def test_reduced_jpeg_decoding_stays_close_to_the_full_decode(cifar, tmp_path):
    rgb = cifar.test_images[3].permute(1, 2, 0).numpy()
    im = Image.fromarray(rgb).resize((512, 384), Image.BICUBIC)
    im.save(tmp_path / "a.jpg", quality=95)
    im.save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.jpg") as j:
        j.draft("RGB", (64, 64))
        assert j.size[0] < 512  # Pillow decodes this JPEG at a reduced scale
    jpg = folders.decode(tmp_path / "a.jpg", 3, 64, train=False).astype(int)
    png = folders.decode(tmp_path / "a.png", 3, 64, train=False).astype(int)
    assert np.abs(jpg - png).mean() < 4


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.integers(0, 2**63 - 1))
def test_random_resized_crop_boxes(w, h, seed):
    left, top, right, bottom = folders._rrc_box(w, h, np.random.default_rng(seed))
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    cw, ch = right - left, bottom - top
    fallback = (cw == w or ch == h) and (left, top) == ((w - cw) // 2, (h - ch) // 2)
    area_ok = 0.08 * w * h - 2 * (cw + ch) <= cw * ch <= w * h
    # Rounding to whole pixels moves the ratio of tiny crops; allow one pixel.
    ratio_ok = (cw - 1) / (ch + 1) <= 4 / 3 + 1e-9 and (cw + 1) / max(ch - 1, 1) >= 3 / 4 - 1e-9
    assert fallback or (area_ok and ratio_ok)


def test_small_images_take_the_cifar_crop_and_flip(cifar, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(cifar.train_images[5].permute(1, 2, 0).numpy()).save(path)
    plain = folders.decode(path, 3, 32, train=False)
    assert np.array_equal(plain, cifar.train_images[5].numpy())  # 32 x 32 is left alone
    padded = np.pad(plain, ((0, 0), (4, 4), (4, 4)))
    seen_flip = set()
    for seed in range(40):
        got = folders.decode(path, 3, 32, train=True, seed=seed)
        matches = [
            (oy, ox, f)
            for oy in range(9)
            for ox in range(9)
            for f in (False, True)
            if np.array_equal(
                got, (lambda a: a[:, :, ::-1] if f else a)(padded[:, oy : oy + 32, ox : ox + 32])
            )
        ]
        assert matches, f"seed {seed}: not a padded crop of the image"
        seen_flip.update(f for _, _, f in matches)
        assert np.array_equal(got, folders.decode(path, 3, 32, train=True, seed=seed))
    assert seen_flip == {False, True}


def test_a_corrupt_image_is_named_or_skipped(cifar, tmp_path):
    base = _export(cifar, tmp_path, size=(72, 72))
    ds = folders.open_folder(str(base), mode="stream", workers=2)
    victim = sorted((base / "train" / cifar.classes[0]).iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    with pytest.raises(SigngradError, match=rf"cannot (decode|read image) .*{victim.name}"):
        _batches(ds)
    ds = folders.open_folder(str(base), mode="stream", workers=2, skip_bad=True)
    g = torch.Generator().manual_seed(0)
    loader = folders.StreamLoader(ds, split="train", batch_size=8, train=True, generator=g)
    assert sum(len(y) for _, y in loader) == 35 and loader.skipped == 1


def test_auto_mode_says_which_and_why(cifar, tmp_path, caplog):
    base = _export(cifar, tmp_path)
    with caplog.at_level(logging.INFO, logger="signgrad.folders"):
        small = folders.open_folder(str(base))
        large = folders.open_folder(str(base), image_size=64, workers=0)
    assert isinstance(small, folders.Decoded) and small.augment
    assert small.train_images.shape == (36, 3, 32, 32) and small.train_images.dtype == torch.uint8
    assert isinstance(large, folders.StreamSet) and large.image_size == (64, 64)
    assert "held in memory (32-pixel images" in caplog.text
    assert "held in stream (images of 64 pixels take the random-resized-crop" in caplog.text
    forced = data.load(f"imagefolder:{base}", mode="memory", image_size=40)
    assert isinstance(forced, data.DataSet) and forced.image_size == (40, 40)


def test_folder_flags_need_an_image_folder(run_child, one_line_error):
    proc = run_child("train", "--data", "cifar10", "--workers", "2", "--epochs", "1")
    one_line_error(proc, "--workers only apply to --data imagefolder:PATH")


def test_streamed_training_resumes_exactly(cifar, tmp_path, run_cli):
    base = _export(cifar, tmp_path / "pics", per_class=(24, 8), size=(80, 72))
    common = ["--model", "convnet", "--data", f"imagefolder:{base}", "--data-mode", "stream",
              "--workers", "1", "--quantizer", "bnn", "--epochs", "3", "--batch-size", "16",
              "--no-progress"]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli("train", *common, "--out", whole) == 0
    assert run_cli("train", *common, "--out", split, "--stop-after", "1") == 0
    # A different number of workers on resume changes nothing.
    assert run_cli("train", *common, "--out", split, "--resume", "--workers", "0") == 0

    def metrics(run: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert metrics(whole) == metrics(split) and len(metrics(whole)) == 3
    assert all(math.isfinite(r["train_loss"]) for r in metrics(whole))
    cfg = json.loads((whole / "config.json").read_text())
    assert cfg["data_mode"] == "stream" and cfg["image_size"] is None
    assert run_cli("eval", whole) == 0
    # 72-pixel images take the ImageNet recipe: the deployed model keeps its centre crop,
    # and predict feeds it what evaluation fed it.
    assert torch.load(whole / "checkpoint.pt", weights_only=False)["deploy"]["crop"] == 0.875
    packed = tmp_path / "model.safetensors"
    assert run_cli("export", whole, "--out", packed) == 0
    from signgrad.runtime import load

    pm = load(packed)
    assert pm.crop == 0.875 and pm.input_shape == (3, 72, 72)
    val = sorted((base / "val").rglob("*.jpg"))[:3]
    seen = np.stack([folders.decode(p, 3, 72, train=False) for p in val])
    assert np.array_equal(seen, np.stack([images.read(p, 3, (72, 72), crop=pm.crop)
                                          for p in val]))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("model", "size", "floor", "fall"), [
    # The runs of docs/imagenet.md: 71.0% (loss 1.881 -> 0.890) and 38.5% (2.383 -> 1.927).
    ("resnet18-imagenet", [], 0.5, 0.8),
    ("deit-tiny", ["--image-size", "32"], 0.25, 0.85),
])  # fmt: skip
def test_real_images_train_through_the_streaming_path(cifar_root, tmp_path, run_cli, caplog,
                                                      model, size, floor, fall):  # fmt: skip
    if not (cifar_root / "fashion-mnist").is_dir():
        pytest.skip("no fashion-mnist in SIGNGRAD_DATA")
    ds = data.load("fashion-mnist", root=cifar_root, download=False)
    base = _export(ds, tmp_path / "jpeg", per_class=(60, 20), classes=10)
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="signgrad.folders"):
        assert run_cli("train", "--model", model, "--data", f"imagefolder:{base}", *size,
                       "--data-mode", "stream", "--workers", "2", "--quantizer", "bnn",
                       "--epochs", "4", "--batch-size", "32", "--out", run,
                       "--no-progress") == 0  # fmt: skip
    assert "imagefolder: streaming StreamSet" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < fall * rows[0]["train_loss"]
    assert rows[-1]["test_acc"] > floor  # chance: 0.1
