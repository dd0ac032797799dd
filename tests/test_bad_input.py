"""A user's mistake is refused up front with one clear line, and no input is silently
misread: deep and float image pixels, decompression bombs, empty classes, non-finite
networks, nonsensical training settings, estimator and model sizes that cannot fit in
memory, and commands that would create folders nobody asked for."""

from __future__ import annotations

import logging
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from signgrad import checkpoint, convert, data, estimators, export, images, quantizers, schedules
from signgrad import memory as memory_mod
from signgrad.errors import SigngradError

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def fmnist(cifar_root: Path) -> np.ndarray:
    """The first 40 real Fashion-MNIST training images, uint8 N x 28 x 28."""
    if not (cifar_root / "fashion-mnist").is_dir():
        pytest.skip("no fashion-mnist in SIGNGRAD_DATA")
    return data.load("fashion-mnist", root=cifar_root, download=False).train_images[:40, 0].numpy()


@pytest.fixture(scope="module")
def cifar_images(cifar_root: Path) -> np.ndarray:
    """Five real CIFAR-10 test images, uint8 N x 32 x 32 x 3."""
    ds = data.load("cifar10", root=cifar_root, download=False)
    return ds.test_images[:5].permute(0, 2, 3, 1).numpy()


def save_16bit(path: Path, grey8: np.ndarray) -> None:
    """The 8-bit grey image as a 16-bit PNG with the same brightness (v * 257)."""
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)


def save_float(path: Path, grey8: np.ndarray, scale: float = 255.0) -> None:
    """The grey image as a 32-bit float TIFF, v / scale."""
    Image.fromarray((grey8 / scale).astype(np.float32), "F").save(path)


def png_bytes(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG file written by hand (Pillow cannot write every kind): IHDR, one IDAT of the
    already filtered ``rows``, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` 8-bit grey pixels (tiny file)."""
    path.write_bytes(png_bytes(width, height, 8, 0, b"\x00" * (width + 1)))  # one row only


def grey_folder(root: Path, fm: np.ndarray, per_class: int = 4) -> None:
    """An image folder of real Fashion-MNIST images, two classes, 8-bit PNG."""
    for split, offset in (("train", 0), ("test", 2 * per_class)):
        for label, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = fm[offset + label * per_class + i]
                Image.fromarray(img).save(root / split / cls / f"{i}.png")


def err_of(capsys) -> str:
    """The one stderr line of an in-process command that failed."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("signgrad: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- images


def test_16bit_and_float_pixels_decode_to_their_8bit_values(fmnist, tmp_path):
    for i, img in enumerate(fmnist[:8]):
        dark = img // 4  # a dark image: Pillow's own 16-bit -> 8-bit convert would clip it
        save_16bit(tmp_path / f"{i}.png", dark)
        save_float(tmp_path / f"{i}.tif", dark)
        with Image.open(tmp_path / f"{i}.png") as im:
            assert im.mode.startswith("I;16")  # really a 16-bit file
        assert np.array_equal(images.read(tmp_path / f"{i}.png", 1)[0], dark)
        assert np.array_equal(images.read(tmp_path / f"{i}.tif", 1)[0], dark)
        # As RGB (a colour model): three equal channels of the same values.
        rgb = images.read(tmp_path / f"{i}.png", 3)
        assert rgb.shape == (3, 28, 28) and all(np.array_equal(c, dark) for c in rgb)


def test_16bit_rounds_by_the_bit_depth(tmp_path):
    values = np.array([[0, 128, 129, 257, 385, 386, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "v.png")
    assert images.read(tmp_path / "v.png", 1)[0].tolist() == [[0, 0, 1, 1, 1, 2, 255]]
    # A 12-bit PGM: Pillow gives mode I scaled to 16 bits; the result is 8-bit by depth.
    v12 = np.array([[0, 4095, 2048]], dtype=">u2")
    (tmp_path / "v.pgm").write_bytes(b"P5\n3 1\n4095\n" + v12.tobytes())
    assert images.read(tmp_path / "v.pgm", 1)[0].tolist() == [[0, 255, 128]]


@pytest.mark.parametrize(
    "pixels,message",
    [
        (np.array([[0.0, 1.5]], np.float32), "float pixels range over 0..1.5"),
        (np.array([[-0.5, 0.5]], np.float32), "float pixels range over -0.5..0.5"),
        (np.array([[0.0, np.nan]], np.float32), "NaN or infinite"),
        (np.array([[0, 70000]], np.int32), "integer pixels range over 0..70000"),
        (np.array([[-3, 10]], np.int32), "integer pixels range over -3..10"),
    ],
)
def test_pixels_of_unknown_scale_are_refused(tmp_path, pixels, message):
    path = tmp_path / "x.tif"
    Image.fromarray(pixels).save(path)
    with pytest.raises(SigngradError, match=message) as e:
        images.read(path, 1)
    assert str(path) in str(e.value)


def test_imagefolder_with_16bit_and_float_images_stays_grey(fmnist, tmp_path):
    grey_folder(tmp_path, fmnist)
    save_16bit(tmp_path / "train" / "a" / "1.png", fmnist[1])  # replaces the 8-bit file
    (tmp_path / "train" / "b" / "2.png").unlink()
    save_float(tmp_path / "train" / "b" / "2.tif", fmnist[6])
    ds = data.load(f"imagefolder:{tmp_path}")
    assert ds.in_channels == 1  # one 16-bit or float image must not make the set RGB
    expected = np.stack([fmnist[i] for i in range(8)])
    assert np.array_equal(ds.train_images[:, 0].numpy(), expected)


def test_imagefolder_16bit_grey_alpha_png_is_grey(fmnist, tmp_path):
    grey_folder(tmp_path, fmnist)
    # A 16-bit grey + alpha PNG, written by hand (Pillow cannot write one); Pillow decodes
    # it as RGBA, but the file is grey.
    grey16 = fmnist[0].astype(">u2") * 257
    la = np.stack([grey16, np.full_like(grey16, 65535)], -1)
    rows = b"".join(b"\x00" + row.tobytes() for row in la)
    (tmp_path / "train" / "a" / "0.png").write_bytes(png_bytes(28, 28, 16, 4, rows))
    ds = data.load(f"imagefolder:{tmp_path}")
    assert ds.in_channels == 1
    assert np.array_equal(ds.train_images[0, 0].numpy(), fmnist[0])


def test_imagefolder_empty_class_folders(fmnist, tmp_path, caplog):
    grey_folder(tmp_path, fmnist)
    for p in (tmp_path / "test" / "b").iterdir():
        p.unlink()
    with caplog.at_level(logging.WARNING, logger="signgrad.data"):
        ds = data.load(f"imagefolder:{tmp_path}")
    assert ds.test_labels.tolist() == [0] * 4
    assert "no test images of class b" in caplog.text
    for p in (tmp_path / "train" / "b").iterdir():
        p.unlink()
    with pytest.raises(SigngradError, match=r"class folder .*train/b holds no images"):
        data.load(f"imagefolder:{tmp_path}")


def test_decompression_bomb_names_the_file(fmnist, tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)
    with pytest.raises(SigngradError, match=r"cannot read image .*bomb\.png.*decompression bomb"):
        images.read(bomb, 3)
    grey_folder(tmp_path / "folder", fmnist)
    shutil.copy(bomb, tmp_path / "folder" / "train" / "a" / "bomb.png")
    with pytest.raises(SigngradError, match=r"imagefolder: cannot read image .*a/bomb\.png"):
        data.load(f"imagefolder:{tmp_path / 'folder'}")


@pytest.fixture(scope="module")
def packed(tiny_run, tmp_path_factory, run_cli) -> Path:
    run = tmp_path_factory.mktemp("packed") / "run"
    shutil.copytree(tiny_run, run)
    assert run_cli("export", run) == 0
    return run / "model-packed.safetensors"


def test_predict_reads_16bit_and_float_images_as_their_8bit_form(
    packed, cifar_images, tmp_path, run_cli, capsys
):
    capsys.readouterr()
    for i, rgb in enumerate(cifar_images):
        grey = np.asarray(Image.fromarray(rgb).convert("L")) // 5  # dark grey
        Image.fromarray(grey).save(tmp_path / f"{i}-8.png")
        save_16bit(tmp_path / f"{i}-16.png", grey)
        save_float(tmp_path / f"{i}-f.tif", grey)
    answers = {}
    for kind in ("8", "16", "f"):
        outs = []
        for i in range(len(cifar_images)):
            name = f"{i}-{kind}.{'tif' if kind == 'f' else 'png'}"
            assert run_cli("predict", packed, tmp_path / name, "--top", "3") == 0
            outs.append(capsys.readouterr().out.split(": ", 1)[1])
        answers[kind] = outs
    assert answers["16"] == answers["8"] and answers["f"] == answers["8"]


def test_predict_one_line_errors(packed, tmp_path, run_child, one_line_error):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)
    one_line_error(run_child("-q", "predict", packed, bomb), "cannot read image", "bomb.png")
    bad = tmp_path / "hdr.tif"
    Image.fromarray(np.array([[0.0, 4.0]], np.float32)).save(bad)
    one_line_error(run_child("-q", "predict", packed, bad), "hdr.tif", "float pixels")


# --------------------------------------------------------------------------- export


def test_export_refuses_a_network_with_nan_weights(tiny_run, tmp_path, run_child, one_line_error):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for f in run.glob("model*"):
        f.unlink()
    ckpt = run / checkpoint.CHECKPOINT_NAME
    state = checkpoint.load(ckpt)
    for v in state["model"].values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    checkpoint.save(ckpt, state)
    for fmt in ("packed", "onnx"):
        line = one_line_error(run_child("-q", "export", run, "--format", fmt))
        assert "NaN" in line or "not finite" in line, line
    assert not list(run.glob("model*"))  # nothing written


def test_check_finite_names_the_first_bad_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    export.check_finite(model)  # finite: fine
    with torch.no_grad():
        model[1].running_var[1] = float("inf")
    with pytest.raises(SigngradError, match=r"1\.running_var holds 1 NaN or infinite value"):
        export.check_finite(model)


# --------------------------------------------------------------------------- settings

BAD_SETTINGS = [
    (["--schedule", "step", "--gamma", "-1"], "gamma must be a positive finite number"),
    (["--gamma", "nan"], "gamma must be a positive finite number"),
    (["--gamma", "0"], "gamma must be a positive"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number >= 0"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0"),
    (["--optimizer", "sgd", "--momentum", "-5"], "momentum must be a number in [0, 1)"),
    (["--momentum", "1"], "momentum must be a number in [0, 1)"),
    (["--momentum", "nan"], "momentum must be"),
    (["--seed", "99999999999999999999"], "seed must be an integer in [0, 2**64)"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64)"),
    (["--lr", "inf"], "lr must be a positive number"),
    (["--lr", "nan"], "lr must be a positive number"),
    (["--betas", "nan", "0.9"], "betas must be two numbers in [0, 1)"),
    (["--grad-clip", "inf"], "grad_clip must be positive and finite"),
    (["--grad-clip", "nan"], "grad_clip must be positive and finite"),
    (["--bn-momentum", "nan"], "bn_momentum must be in (0, 1]"),
    (["--schedule", "step", "--milestones", "0", "5"], "milestones must be whole epochs >= 1"),
    (["--quantizer", "bnn+", "--sharpness", "const:-5"], "beta must stay > 0"),
    (["--quantizer", "bnn+", "--sharpness", "const:0"], "beta must stay > 0"),
    (["--quantizer", "bnn+", "--sharpness", "decay:-1:0.9"], "goes down to -1"),
    (["--quantizer", "bnn++", "--sharpness", "linear:5:-1"], "mu must stay > 0"),
    (["--quantizer", "ede", "--sharpness", "linear:1:0"], "t must stay > 0"),
    (["--quantizer", "pc", "--sharpness", "linear:1:-0.5"], "mu must stay >= 0"),
    (["--quantizer", "rpc", "--sharpness", "const:-1"], "mu must stay >= 0"),
    (["--quantizer", "ste-warmup", "--sharpness", "const:-1"], "T must stay >= 0"),
    (["--quantizer", "ste-warmup", "--sharpness", "decay:1:1.5"], "factor in (0, 1]"),
    (["--quantizer", "ste-warmup", "--sharpness", "stepdecay:1:2:0:1"], "factor in (0, 1]"),
    (["--quantizer", "bnn+", "--sharpness", "linear:1e308:-1e308"], "finite numbers"),
    (["--input-quantizer", "bnn+", "--input-sharpness", "const:-2"], "beta must stay > 0"),
    (["--exact-sign-after", "-1", "--quantizer", "pc"], "exact_sign_after must be"),
]


@pytest.mark.parametrize("args,message", BAD_SETTINGS)
def test_nonsensical_settings_are_refused_before_any_work(tmp_path, run_cli, capsys, args, message):
    out = tmp_path / "run"
    assert run_cli("train", "--model", "convnet", "--out", out, "--data-root", tmp_path / "none",
                   *args) == 2  # fmt: skip
    assert message in err_of(capsys)
    assert not out.exists() and not (tmp_path / "none").exists()  # nothing made or read


def test_gamma_refused_in_a_child_process(tmp_path, run_child, one_line_error):
    proc = run_child("-q", "train", "--schedule", "step", "--gamma", "-1", "--out", tmp_path / "r")
    one_line_error(proc, "gamma must be a positive finite number, got -1.0")


def test_schedules_and_quantizers_check_their_values_in_python():
    with pytest.raises(SigngradError, match="finite"):
        schedules.parse(float("nan"))
    with pytest.raises(SigngradError, match="finite"):
        schedules.Linear(0.0, float("inf"))
    with pytest.raises(SigngradError, match="factor in"):
        schedules.Decay(1.0, 1.01)
    with pytest.raises(SigngradError, match="beta must stay > 0"):
        quantizers.BNNPlus(sharpness=-5.0)
    with pytest.raises(SigngradError, match="rho must be a finite number"):
        quantizers.get("proxquant", rho=float("inf"))
    with pytest.raises(SigngradError, match="exact_sign_after must be an integer"):
        quantizers.get("pc", exact_sign_after=1.5)
    # What the methods document stays allowed: PC from the identity (mu = 0), STE-Warmup
    # down to the exact sign (T = 0), a positive beta that decays towards 0.
    assert quantizers.get("pc", sharpness="linear:0:1").sharpness == 0
    q = quantizers.get("ste-warmup", sharpness="linear:1:0")
    q.set_epoch(9, 10)
    assert q.sharpness == 0
    assert quantizers.get("bnn+", sharpness="decay:5:0.5").sharpness == 5


# --------------------------------------------------------------------------- sizes

BAD_ESTIMATOR = [
    ("metaquant-fc", "hidden=-5", "hidden must be an integer >= 1, got -5"),
    ("metaquant-lstm", "hidden=0", "hidden must be an integer >= 1"),
    ("metaquant-multifc", "meta_lr=nan", "meta_lr must be a finite number in [0, inf)"),
    ("metaquant-fc", "meta_lr=-1", "meta_lr must be a finite number"),
    ("metaquant-fc", "activation=gelu", "unknown activation 'gelu'"),
    ("fsg", "beta=1.5", "beta must be a finite number in [0, 1]"),
    ("fsg", "beta=nan", "beta must be a finite number in [0, 1]"),
    ("fsg", "history=0", "history must be an integer >= 1"),
    ("fsg", "d_inner=-5", "d_inner must be an integer >= 1"),
    ("fsg", "chunk_size=0", "chunk_size must be an integer >= 1"),
    ("fsg", "fast_lr=inf", "fast_lr must be a finite number"),
    ("fsg-paper", "slow_hidden=-1", "slow_hidden must be an integer >= 1"),
    ("fsg", "hidden=3", "takes no parameter hidden"),
    ("metaquant-fc", "hidden=100000", "would need"),
    ("fsg", "d_inner=100000", "would need"),
    ("fsg-paper", "fast_hidden=1000000", "would need"),
]


@pytest.mark.parametrize("name,setting,message", BAD_ESTIMATOR)
def test_estimator_settings_are_refused_up_front(tmp_path, run_cli, capsys, name, setting, message):
    out = tmp_path / "run"
    code = run_cli("train", "--out", out, "--estimator", name, "--estimator-param", setting)
    assert code == 2
    assert message in err_of(capsys)
    assert not out.exists()


def test_estimator_memory_message_in_a_child_process(tmp_path, run_child, one_line_error):
    proc = run_child("-q", "train", "--estimator", "metaquant-fc", "--estimator-param",
                     "hidden=100000", "--out", tmp_path / "r")  # fmt: skip
    line = one_line_error(proc, "estimator 'metaquant-fc' (hidden=100000)", "GiB available")
    # 267,264 binarized weights of ResNet-20: the meta-net alone is 1e10 parameters.
    needed = float(line.split("would need ")[1].split(" GiB")[0])
    assert needed > 4 * 1e10 * 4 / 2**30


def test_estimators_check_sizes_in_python_before_allocating():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))
    convert.binarize(model, "bnn", keep="none")
    with pytest.raises(SigngradError, match="hidden must be an integer >= 1"):
        estimators.build("metaquant-fc", model, hidden=-5)
    with pytest.raises(SigngradError, match="d_state must be an integer >= 1"):
        estimators.build("fsg", model, d_state=0)
    # A 10^7-wide hidden layer is 10^14 meta-parameters: refused, not allocated.
    with pytest.raises(SigngradError, match=r"for 2,176 binarized weights would need .* GiB"):
        estimators.build("metaquant-lstm", model, hidden=10**7)
    est = estimators.build("metaquant-fc", model, hidden=4)  # sensible sizes still build
    assert sum(p.numel() for p in est.parameters()) == 4 + 16 + 4  # bias-free 1-4-4-1


def test_model_sizes_are_refused_up_front(tmp_path, run_cli, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--hyper", "--z-dim", "10000000", "--out", out) == 2
    assert "and z_dim 10000000 would need" in err_of(capsys)
    assert run_cli("train", "--batch-size", "10000000", "--out", out) == 2
    assert "with batch size 10000000 would need" in err_of(capsys)
    assert run_cli("train", "--hyper", "--z-dim", "0", "--out", out) == 2
    assert "z_dim must be an integer >= 1, got 0" in err_of(capsys)
    assert not out.exists()


def test_default_settings_are_not_refused():
    from signgrad import builders, train

    # The size check is builders.check_sizes, which train() runs after Config.resolved().
    for name in estimators.names():
        cfg = train.Config(estimator=name).resolved()
        builders.check_sizes(cfg)  # the defaults fit on any test machine
    builders.check_sizes(train.Config(model="resnet18", hyper=True).resolved())
    builders.check_sizes(train.Config(batch_size=1024).resolved())


def test_available_memory_is_read():
    free = memory_mod.available("cpu")
    assert free is not None and 0 < free < 2**50
    with pytest.raises(SigngradError, match=r"it would need 1048576\.0 GiB; this machine has"):
        memory_mod.check_fits(2**50, "it", "cpu")


# --------------------------------------------------------------------------- folders


def test_compare_does_not_create_folders(tiny_run, tmp_path, run_cli, capsys):
    png = tmp_path / "some" / "new" / "dir" / "x.png"
    assert run_cli("compare", tiny_run, "--png", png) == 2
    assert "the folder" in err_of(capsys) and not (tmp_path / "some").exists()
    assert run_cli("compare", tiny_run, "--png", tmp_path) == 2
    assert "is a folder" in err_of(capsys)
    assert run_cli("compare", tiny_run, "--png", tmp_path / "ok.png") == 0
    assert (tmp_path / "ok.png").is_file()


@pytest.mark.parametrize("command", ["eval", "export", "summary"])
def test_a_missing_data_root_is_an_error(tiny_run, tmp_path, run_cli, capsys, command):
    root = tmp_path / "no" / "such" / "dir"
    assert run_cli(command, tiny_run, "--data-root", root) == 2
    assert f"--data-root {root} is not a folder" in err_of(capsys)
    assert not (tmp_path / "no").exists()


def test_missing_data_root_in_a_child_process(tiny_run, tmp_path, run_child, one_line_error):
    root = tmp_path / "nowhere"
    one_line_error(run_child("-q", "eval", tiny_run, "--data-root", root), "is not a folder")
    assert not root.exists()


def test_float_limits_are_consistent():
    # The float checks of the estimator helpers reject what argparse lets through.
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(SigngradError):
            estimators.base.check_number("x", "y", bad, 0.0)
