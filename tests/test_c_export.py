"""The C export (``signgrad export RUN --format c``): compiled with the host compiler and
with Debian's aarch64 and 32-bit ARM cross compilers (run under qemu user-mode
emulation), its logits on real CIFAR-10 test images are the packed runtime's, bit for
bit; the command writes the two files, reports flash and RAM, and refuses bad names."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from signgrad import c_export, convert, data, export, models
from signgrad.errors import SigngradError
from signgrad.runtime import format as fmt
from signgrad.runtime import kernels as K
from signgrad.runtime import model as runtime

CC = c_export.compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang)")
needs_compiled = pytest.mark.skipif(K.COMPILED is None, reason=f"no kernels: {K.UNAVAILABLE}")
WARN = ["-Wall", "-Wextra", "-Werror"]
#: (compiler, flags, emulator): the machines the export must agree on
TARGETS = {
    "aarch64": ("aarch64-linux-gnu-gcc", ["-std=c99", "-O2", "-static"], "qemu-aarch64"),
    "armhf": ("arm-linux-gnueabihf-gcc", ["-std=c99", "-O2", "-static"], "qemu-arm"),
}


@pytest.fixture(scope="module")
def cifar(cifar_root) -> data.DataSet:
    return data.load("cifar10", root=cifar_root, download=False)


@pytest.fixture(scope="module")
def resnet20(cifar) -> tuple[export.Source, np.ndarray]:
    """A 1W1A ResNet-20 with batch-norm statistics from real images (option-A shortcuts,
    residual adds, hardtanh, the float stem and classifier), and 64 real test images."""
    torch.manual_seed(0)
    m = models.get("resnet20", num_classes=10, in_channels=3, activation="hardtanh")
    convert.binarize(m, "bnn", "bnn")
    mean, std = (
        torch.tensor(cifar.mean).view(1, -1, 1, 1),
        torch.tensor(cifar.std).view(1, -1, 1, 1),
    )
    m.train()
    with torch.no_grad():
        for chunk in (cifar.train_images[:512].float() / 255.0 - mean).div(std).split(128):
            m(chunk)
    src = export.Source(m.eval(), (3, 32, 32), cifar.classes, list(cifar.mean), list(cifar.std), {})
    return src, cifar.test_images[:64].numpy()


def _runtime_and_export(src: export.Source, images: np.ndarray):
    doc, tensors = fmt.read_bytes(export.packed(src))
    pm = runtime.build(doc, tensors, backend="compiled", threads=1)
    return pm, pm.preprocess(images), c_export.generate(doc, tensors, "net0")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@needs_cc
@needs_compiled
@pytest.mark.parametrize(
    "flags",
    [
        ["-std=c99", "-O2"],
        ["-std=gnu11", "-O3", "-march=native"],
        ["-std=c99", "-O1", "-DSIGNGRAD_PORTABLE"],
    ],
    ids=["c99", "gnu11-native", "portable"],
)
def test_the_host_build_gives_the_runtime_s_logits_bit_for_bit(resnet20, flags):
    """gnu11 with -march=native lets GCC fuse multiply-adds where the code keeps them
    apart; the export's pragma must stop it (a build of the same source without the
    pragma gave other bits, on x86 and on aarch64)."""
    src, images = resnet20
    pm, x, cx = _runtime_and_export(src, images)
    got = c_export.compile_and_run(cx, x, [CC, *flags, *WARN])
    assert _same_bits(got, pm.run(x))
    with torch.no_grad():
        ref = src.model(torch.from_numpy(x)).numpy()
    assert np.array_equal(got.argmax(1), ref.argmax(1))


@needs_compiled
@pytest.mark.parametrize("target", list(TARGETS))
def test_arm_builds_under_qemu_give_the_x86_runtime_s_logits_bit_for_bit(resnet20, target):
    compiler, flags, emulator = TARGETS[target]
    missing = [t for t in (compiler, emulator) if shutil.which(t) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed (Debian: apt-get install gcc-aarch64-linux-gnu "
            "gcc-arm-linux-gnueabihf qemu-user); .ci/run installs them"
        )
    src, images = resnet20
    pm, x, cx = _runtime_and_export(src, images)
    got = c_export.compile_and_run(cx, x, [compiler, *flags, *WARN], run=[emulator])
    assert _same_bits(got, pm.run(x))


@pytest.mark.slow  # child processes export and compile
@needs_cc
def test_the_export_command_writes_both_files_and_reports_flash_and_ram(
    tiny_run, tmp_path, run_child, one_line_error
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = run_child("export", run, "--format", "c")
    assert proc.returncode == 0, proc.stderr[-2000:]
    source, header = (run / "model.c").read_text(), (run / "model.h").read_text()
    flash = int(re.search(r"flash: ([\d,]+) bytes", proc.stdout)[1].replace(",", ""))
    ram = int(re.search(r"RAM: ([\d,]+) bytes", proc.stdout)[1].replace(",", ""))
    assert 0 < flash < len(source) and ram > 0
    assert "bit-identical to the packed runtime" in proc.stdout
    assert "int model_run(const float *input, float *logits);" in header
    assert not re.search(r"\b(malloc|calloc|realloc|free|fopen|pthread_\w+)\s*\(", source)
    # --out names the files and the symbols; a name that cannot is one line.
    proc = run_child("export", run, "--format", "c", "--out", tmp_path / "cifar_net.c")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "int cifar_net_run(" in (tmp_path / "cifar_net.h").read_text()
    for out, fragment in (("9lives.c", "must be a C identifier"), ("x.h", "writes a .c file")):
        one_line_error(run_child("export", run, "--format", "c", "--out", tmp_path / out), fragment)
    assert not (tmp_path / "9lives.c").exists()


def test_names_that_collide_with_the_kernels_are_refused(resnet20):
    src, _ = resnet20
    doc, tensors = fmt.read_bytes(export.packed(src))
    for bad in ("net", "if", "__x", "a-b", ""):
        with pytest.raises(SigngradError, match="C export name"):
            c_export.generate(doc, tensors, bad)
