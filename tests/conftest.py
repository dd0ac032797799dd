"""Fixtures shared by the test modules: the real data root, the command line in this
process or in a child process, one small trained run, and a small folder of real images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from signgrad import cli

DATA = os.environ.get("SIGNGRAD_DATA")
HAVE_CIFAR = bool(DATA) and (Path(DATA) / "cifar-10-batches-py" / "data_batch_1").is_file()


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The data root holding ``cifar-10-batches-py/``; skips the test where it is absent."""
    if not HAVE_CIFAR:
        pytest.skip("SIGNGRAD_DATA with cifar-10-batches-py is not available")
    return Path(DATA)


def _run_here(*args: str) -> int:
    return cli.main(["-q", *[str(a) for a in args]])


def _run_child(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "SIGNGRAD_DATA": DATA or "", **env}
    return subprocess.run(
        [sys.executable, "-m", "signgrad.cli", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args) -> exit status``: the command line in this process (``-q``)."""
    return _run_here


@pytest.fixture(scope="session")
def run_child():
    """``run_child(*args, timeout=..., **env) -> CompletedProcess``: ``python -m
    signgrad.cli`` in a child process, with ``SIGNGRAD_DATA`` passed on."""
    return _run_child


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user's mistake: exit status 2, one ``signgrad: error:`` line, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("signgrad: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def one_line_error():
    """The check of :func:`assert_one_line_error`, as a fixture."""
    return assert_one_line_error


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar_root) -> Path:
    """A 1W1A ConvNet trained for one epoch on the real CIFAR-10 subset, shared by the
    session: copy it (shutil.copytree) before changing anything in it."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    code = _run_here(
        "train", "--model", "convnet", "--data", "cifar10", "--quantizer", "bnn",
        "--input-quantizer", "bnn", "--epochs", "1", "--out", out, "--no-progress",
        "--data-root", cifar_root,
    )  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="session")
def pictures(cifar_root: Path, tmp_path_factory) -> Path:
    """Real CIFAR-10 images of 3 classes as PNG files in ``train/`` and ``val/`` class
    folders: 8 per class to train, 4 to test. Read only: copy it before changing it."""
    from PIL import Image

    from signgrad import data

    ds = data.load("cifar10", root=cifar_root, download=False)
    base = tmp_path_factory.mktemp("pictures")
    for split, x, y, n in (("train", ds.train_images, ds.train_labels, 8),
                           ("val", ds.test_images, ds.test_labels, 4)):  # fmt: skip
        for c in range(3):
            (base / split / ds.classes[c]).mkdir(parents=True)
            for i in (y == c).nonzero().flatten()[:n].tolist():
                Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(
                    base / split / ds.classes[c] / f"{i}.png"
                )
    return base
