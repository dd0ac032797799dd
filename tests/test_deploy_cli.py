"""From a trained run to deployment on the command line: summary, export (packed and
ONNX), predict, and the one-line errors of each."""

import shutil

import numpy as np
import pytest
from PIL import Image

from signgrad import data


def test_export_packed_then_predict_the_real_test_images(
    tiny_run, cifar_root, tmp_path, run_cli, capsys
):
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")  # export writes into the run
    assert run_cli("export", str(run_dir)) == 0
    printed = capsys.readouterr().out
    packed = run_dir / "model-packed.safetensors"
    assert packed.is_file() and f"wrote {packed}: {packed.stat().st_size:,} bytes" in printed
    assert "every class agrees" in printed

    ds = data.load("cifar10", root=cifar_root, download=False)
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


def test_export_onnx(tiny_run, tmp_path, run_cli, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "net.onnx"
    assert run_cli("export", str(tiny_run), "--format", "onnx", "--out", str(out)) == 0
    assert out.is_file() and "checked with onnxruntime" in capsys.readouterr().out


def test_summary_of_a_run_and_of_a_model_name(tiny_run, run_cli, capsys):
    assert run_cli("summary", str(tiny_run)) == 0
    text = capsys.readouterr().out
    assert "conv2 (+bn2)" in text and "exported (packed) size" in text
    assert run_cli("summary", "resnet20", "--input-quantizer", "bnn") == 0
    text = capsys.readouterr().out
    total = next(line for line in text.splitlines() if line.startswith("total"))
    # ResNet-20: 267,264 binary weights; 1W1A MACs 40,108,032, stem + classifier float.
    assert "267,264" in total and "40,108,032" in total
    assert "x the exported size" in text


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, run_cli, run_child, one_line_error):
    packed = tmp_path / "model-packed.safetensors"
    assert run_cli("export", str(tiny_run), "--out", str(packed)) == 0
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
        one_line_error(run_child(*args), message)


@pytest.mark.slow
def test_a_soft_quantizer_mid_training_is_not_exported(tmp_path, cifar_root, run_cli, run_child):
    out = tmp_path / "pc"
    assert run_cli("train", "--model", "convnet", "--data", "cifar10", "--quantizer", "pc",
                   "--epochs", "10", "--stop-after", "1", "--out", str(out),
                   "--no-progress") == 0  # fmt: skip
    proc = run_child("export", str(out))
    assert proc.returncode == 2 and "not give +-1 yet" in proc.stderr
    assert not (out / "model-packed.safetensors").exists()  # nothing half-written


@pytest.mark.slow  # child processes export and compile
def test_export_checks_on_the_run_s_test_images_when_they_are_at_hand(
    tiny_run, tmp_path, run_child
):
    """With the run's data set at hand the check runs on its test images and says how
    many classes differ; without it, on random inputs, saying why."""
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    for fmt_name in ("packed", "onnx"):
        proc = run_child("export", run_dir, "--format", fmt_name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "against PyTorch on 1,017 test images of cifar10: " in proc.stdout, proc.stdout
        assert "every class agrees" in proc.stdout or "the class differs on " in proc.stdout
    (tmp_path / "empty").mkdir()  # a data root without the data set
    proc = run_child("export", run_dir, "--data-root", tmp_path / "empty")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 64 random inputs (its data set is not at hand: cifar10" in proc.stdout
