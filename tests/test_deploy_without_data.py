"""Deploying needs no data set: the checkpoint records the classes, input shape and
normalisation (its ``deploy`` entry), export and summary read no data, older checkpoints
without the entry still export (from their data set, with a note), and ``predict`` and
the packed runtime run where PyTorch cannot be imported."""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from signgrad import checkpoint, cli, export
from signgrad.errors import SigngradError

# Runs its arguments as ``signgrad`` in a process where ``import torch`` fails.
NO_TORCH = """
import sys

class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("PyTorch is not installed here (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoTorch())
import signgrad.runtime
from signgrad import cli

code = cli.main(sys.argv[1:])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch imported"
sys.exit(code)
"""


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _edit(run: Path, change) -> None:
    """Rewrite the run's checkpoint as ``torch.save`` of ``change(state)``, bypassing the
    checks of :func:`checkpoint.save` (an old or damaged file)."""
    path = run / checkpoint.CHECKPOINT_NAME
    state = torch.load(path, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, path)


def _no_data(state: dict, root: Path) -> None:
    """The run's data root points at an empty folder, and downloads are off."""
    state["config"]["data_root"] = str(root)
    state["config"]["download"] = False


def test_training_records_what_deployment_needs(tiny_run):
    d = checkpoint.load(tiny_run)["deploy"]
    assert set(d) == set(checkpoint.DEPLOY_KEYS)
    assert len(d["classes"]) == 10 and d["classes"][0] == "airplane"
    assert (d["in_channels"], d["height"], d["width"]) == (3, 32, 32)
    assert len(d["mean"]) == len(d["std"]) == 3
    assert all(math.isfinite(x) for x in d["mean"]) and all(s > 0 for s in d["std"])


def test_export_without_the_data_gives_the_same_bytes(tiny_run, tmp_path, run_cli, run_child):
    run = _copy(tiny_run, tmp_path / "run")
    assert run_cli("export", run, "--out", tmp_path / "with-data.safetensors") == 0
    empty, env_root = tmp_path / "gone", tmp_path / "env-root"
    empty.mkdir()
    env_root.mkdir()
    _edit(run, lambda s: _no_data(s, empty))
    out = tmp_path / "without-data.safetensors"
    proc = run_child("export", run, "--out", out, SIGNGRAD_DATA=str(env_root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes() == (tmp_path / "with-data.safetensors").read_bytes()
    assert not any(empty.iterdir()) and not any(env_root.iterdir())  # nothing downloaded
    # summary reads no data either
    proc = run_child("summary", run, SIGNGRAD_DATA=str(env_root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(empty.iterdir()) and not any(env_root.iterdir())


def test_export_and_summary_never_load_the_data_set(tiny_run, monkeypatch, capsys):
    from signgrad import data

    def refuse(*args, **kwargs):
        raise AssertionError("the data set was read")

    monkeypatch.setattr(data, "load", refuse)
    src = export.from_checkpoint(tiny_run)
    assert src.input_shape == (3, 32, 32) and len(src.classes) == 10
    assert cli.main(["-q", "summary", str(tiny_run)]) == 0
    assert "conv" in capsys.readouterr().out.lower()


def test_an_old_checkpoint_exports_from_its_data_set_with_a_note(
    tiny_run, tmp_path, cifar_root, run_cli, caplog, one_line_error, run_child
):
    run = _copy(tiny_run, tmp_path / "run")
    assert run_cli("export", run, "--out", tmp_path / "new.safetensors") == 0
    _edit(run, lambda s: s.pop("deploy"))  # as the code before the entry wrote it
    assert "deploy" not in checkpoint.load(run)
    caplog.set_level(logging.INFO, logger="signgrad")
    out = tmp_path / "old.safetensors"
    assert run_cli("export", run, "--out", out, "--data-root", cifar_root) == 0
    notes = [r for r in caplog.records if "no deployment entry" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO, caplog.text
    assert out.read_bytes() == (tmp_path / "new.safetensors").read_bytes()
    # Its data set is needed: without it, one line (and no download into the empty folder).
    empty = tmp_path / "gone"
    empty.mkdir()
    _edit(run, lambda s: _no_data(s, empty))
    proc = run_child(
        "-q", "export", run, "--out", tmp_path / "x.safetensors", SIGNGRAD_DATA=str(empty)
    )
    one_line_error(proc)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: "cifar", "'deploy' is a str"),
        (lambda d: {k: v for k, v in d.items() if k != "std"}, "has no 'std'"),
        (lambda d: {**d, "classes": "airplane"}, "classes are not a list"),
        (lambda d: {**d, "classes": ["a"] * 10}, "repeat a name"),
        (lambda d: {**d, "height": 32.0}, "height is 32.0"),
        (lambda d: {**d, "in_channels": 0}, "in_channels is 0"),
        (lambda d: {**d, "mean": d["mean"][:2]}, "mean has 2 values for 3 channels"),
        (lambda d: {**d, "mean": [0.5, "0.5", 0.5]}, "mean is not a list of numbers"),
        (lambda d: {**d, "mean": [0.5, float("nan"), 0.5]}, "NaN or infinite"),
        (lambda d: {**d, "std": [0.2, 0.0, 0.2]}, "not above 0"),
        (lambda d: {**d, "std": [0.2, float("inf"), 0.2]}, "NaN or infinite"),
    ],
)
def test_a_damaged_deploy_entry_is_refused(tiny_run, tmp_path, change, fragment):
    run = _copy(tiny_run, tmp_path / "run")
    _edit(run, lambda s: s.update(deploy=change(s["deploy"])))
    with pytest.raises(SigngradError, match="damaged checkpoint") as e:
        checkpoint.load(run)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_deploy_entry_is_one_line_on_the_command_line(
    tiny_run, tmp_path, run_child, one_line_error
):
    run = _copy(tiny_run, tmp_path / "run")
    _edit(run, lambda s: s["deploy"].update(std=[0.2, -1.0, 0.2]))
    out = tmp_path / "m.safetensors"
    one_line_error(run_child("export", run, "--out", out), "damaged checkpoint", "std")
    assert not out.exists()


def test_eval_refuses_a_data_set_that_no_longer_matches(tiny_run, tmp_path, cifar_root, capsys):
    run = _copy(tiny_run, tmp_path / "run")
    _edit(run, lambda s: s["deploy"].update(classes=[f"c{i}" for i in range(10)]))
    code = cli.main(["-q", "eval", str(run), "--device", "cpu", "--data-root", str(cifar_root)])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on 10 classes (c0, c1, c2, ...)" in err, err


def test_predict_and_the_runtime_need_no_torch(tiny_run, tmp_path, run_cli):
    packed = tmp_path / "m.safetensors"
    assert run_cli("export", tiny_run, "--out", packed) == 0
    image = tmp_path / "cat.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "predict", str(packed), str(image), "--top", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith(f"{image}: ") and line.count("%") == 2, proc.stdout
    classes = checkpoint.load(tiny_run)["deploy"]["classes"]
    assert line.split(": ", 1)[1].split(" ")[0] in classes
    # The block is real: the training commands do need PyTorch.
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "list"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "PyTorch is not installed here" in proc.stderr


@pytest.mark.slow
def test_an_image_folder_run_exports_after_its_images_are_deleted(cifar_root, tmp_path, run_cli):
    from signgrad import data

    cifar = data.load("cifar10", root=cifar_root, download=False)
    folder = tmp_path / "pictures"
    for split, images, labels in (
        ("train", cifar.train_images, cifar.train_labels),
        ("test", cifar.test_images, cifar.test_labels),
    ):
        for cls in range(3):
            picked = (labels == cls).nonzero().flatten()[: 24 if split == "train" else 6]
            (folder / split / cifar.classes[cls]).mkdir(parents=True)
            for i in picked.tolist():
                pixels = images[i].permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / split / cifar.classes[cls] / f"{i}.png")
    run = tmp_path / "run"
    assert run_cli("train", "--model", "convnet", "--data", f"imagefolder:{folder}",
                   "--quantizer", "bnn", "--input-quantizer", "bnn", "--epochs", "1",
                   "--batch-size", "16", "--out", run, "--no-progress") == 0  # fmt: skip
    before = tmp_path / "before.safetensors"
    assert run_cli("export", run, "--out", before) == 0
    shutil.rmtree(folder)
    after = tmp_path / "after.safetensors"
    assert run_cli("export", run, "--out", after) == 0
    assert after.read_bytes() == before.read_bytes()
    src = export.from_checkpoint(run)
    assert src.classes == list(cifar.classes[:3]) and src.input_shape == (3, 32, 32)
