"""From a trained run to deployment on the command line: summary, export (packed and
ONNX), predict, and the one-line errors of each."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signgrad import cli, data

DATA = os.environ.get("SIGNGRAD_DATA")
needs_cifar = pytest.mark.skipif(
    not DATA or not (Path(DATA) / "cifar-10-batches-py" / "data_batch_1").is_file(),
    reason="SIGNGRAD_DATA with cifar-10-batches-py is not available",
)


def run_cli(*args: str) -> int:
    return cli.main(["-q", *args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 1W1A ConvNet trained for one epoch on the real CIFAR-10 subset."""
    out = tmp_path_factory.mktemp("deploy") / "run"
    code = run_cli("train", "--model", "convnet", "--data", "cifar10", "--quantizer", "bnn",
                   "--input-quantizer", "bnn", "--epochs", "1", "--out", str(out),
                   "--no-progress")  # fmt: skip
    assert code == 0
    return out


@needs_cifar
def test_export_packed_then_predict_the_real_test_images(run_dir, tmp_path, capsys):
    assert run_cli("export", str(run_dir)) == 0
    printed = capsys.readouterr().out
    packed = run_dir / "model-packed.safetensors"
    assert packed.is_file() and f"wrote {packed}: {packed.stat().st_size:,} bytes" in printed
    assert "every class agrees" in printed

    ds = data.load("cifar10", root=DATA, download=False)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(ds.test_images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image, skipped in a folder")
    assert run_cli("predict", str(packed), str(folder), "--top", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(folder / f"{i}.png") for i in range(5)]
    shown = [[c.rsplit(" ", 1) for c in line.split(": ", 1)[1].split(", ")] for line in lines]
    for (first, p1), (second, p2) in shown:
        assert first in ds.classes and second in ds.classes and first != second
        assert 100 >= float(p1.rstrip("%")) >= float(p2.rstrip("%")) >= 0

    # What predict printed is the runtime's answer on the same pixels.
    from signgrad.runtime import model as runtime

    pm = runtime.load(packed)
    probs = pm.predict(ds.test_images[:5].numpy())
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert [pm.classes[k] for k in probs.argmax(1)] == [row[0][0] for row in shown]


@needs_cifar
def test_export_onnx(run_dir, capsys):
    pytest.importorskip("onnxruntime")
    out = run_dir / "net.onnx"
    assert run_cli("export", str(run_dir), "--format", "onnx", "--out", str(out)) == 0
    assert out.is_file() and "checked with onnxruntime" in capsys.readouterr().out


@needs_cifar
def test_summary_of_a_run_and_of_a_model_name(run_dir, capsys):
    assert run_cli("summary", str(run_dir)) == 0
    text = capsys.readouterr().out
    assert "conv2 (+bn2)" in text and "exported (packed) size" in text
    assert run_cli("summary", "resnet20", "--input-quantizer", "bnn") == 0
    text = capsys.readouterr().out
    total = next(line for line in text.splitlines() if line.startswith("total"))
    # ResNet-20: 267,264 binary weights; 1W1A MACs 40,108,032, stem + classifier float.
    assert "267,264" in total and "40,108,032" in total
    assert "x the exported size" in text


def error_line(*args: str) -> tuple[int, str]:
    """Exit status and stderr of the installed command (a separate process)."""
    env = {**os.environ, "SIGNGRAD_DATA": DATA or ""}
    p = subprocess.run([sys.executable, "-m", "signgrad.cli", *args], capture_output=True,
                       text=True, env=env)  # fmt: skip
    return p.returncode, p.stderr


@pytest.mark.slow
@needs_cifar
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path):
    packed = run_dir / "model-packed.safetensors"
    if not packed.exists():
        assert run_cli("export", str(run_dir)) == 0
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(packed.read_bytes()[:-200])
    cases = [
        (["predict", str(tmp_path / "missing.safetensors"), str(tmp_path)], "no packed model"),
        (["predict", str(cut), str(tmp_path)], "truncated or damaged"),
        (["predict", str(packed), str(tmp_path / "broken.png")], "cannot read image"),
        (["predict", str(packed), str(tmp_path / "nothing-here")], "no image or folder"),
        (["export", str(tmp_path / "no-run")], "no checkpoint or run directory"),
        (["summary", "resnet21"], "unknown model 'resnet21'"),
    ]
    for args, message in cases:
        code, err = error_line(*args)
        assert code == 2, (args, err)
        assert err.startswith("signgrad: error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
@needs_cifar
def test_a_soft_quantizer_mid_training_is_not_exported(tmp_path):
    out = tmp_path / "pc"
    assert run_cli("train", "--model", "convnet", "--data", "cifar10", "--quantizer", "pc",
                   "--epochs", "10", "--stop-after", "1", "--out", str(out),
                   "--no-progress") == 0  # fmt: skip
    code, err = error_line("export", str(out))
    assert code == 2 and "not give +-1 yet" in err
    assert not (out / "model-packed.safetensors").exists()  # nothing half-written
