"""End-to-end training on the real CIFAR-10 subset, resume, and the command line's errors."""

import json
import shutil

import pytest
import torch

from signgrad import checkpoint, data, layers, train


@pytest.mark.slow
def test_train_binary_resnet20_on_real_cifar10(tmp_path, cifar_root, run_cli, capsys):
    out = tmp_path / "run"
    code = run_cli(
        "train", "--model", "resnet20", "--data", "cifar10", "--quantizer", "bnn",
        "--epochs", "4", "--lr", "3e-3", "--channels-last", "--seed", "0",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    # Chance is 10%; a binary-weight ResNet-20 gets far above it within 4 short epochs.
    assert records[-1]["test_acc"] > 0.30
    config = json.loads((out / "config.json").read_text())
    assert config["quantizer"] == "bnn" and config["lr"] == 3e-3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The weights the model computes with really are +-1 (first and last layer kept).
    model = train.load_trained(out).model
    conv = model.layer1[0].conv1
    assert set(conv.binary_weight().detach().unique().tolist()) == {-1.0, 1.0}
    assert type(model.conv1).__name__ == "Conv2d"
    # `signgrad eval` reproduces the recorded test accuracy.
    assert run_cli("eval", str(out), "--device", "cpu") == 0
    assert f"{100 * records[-1]['test_acc']:.2f}%" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_gives_identical_weights(tmp_path, cifar_root, run_cli):
    # bnn++ switches to the exact sign in the last epoch: the schedules must survive too.
    common = ["--model", "convnet", "--data", "cifar10", "--quantizer", "bnn++",
              "--epochs", "3", "--batch-size", "256", "--seed", "7", "--no-progress"]  # fmt: skip
    assert run_cli("train", *common, "--out", str(tmp_path / "straight")) == 0
    assert run_cli("train", *common, "--out", str(tmp_path / "split"), "--stop-after", "1") == 0
    assert checkpoint.load(tmp_path / "split")["epoch"] == 1
    assert run_cli("train", "--out", str(tmp_path / "split"), "--resume", "--no-progress") == 0
    a = checkpoint.load(tmp_path / "straight")
    b = checkpoint.load(tmp_path / "split")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"][-1]["test_loss"] == b["history"][-1]["test_loss"]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


@pytest.mark.slow
def test_init_from_full_precision_checkpoint(tmp_path, cifar_root, run_cli):
    fp = tmp_path / "fp"
    args = ["--model", "convnet", "--data", "cifar10", "--epochs", "1", "--no-progress"]
    assert run_cli("train", *args, "--quantizer", "none", "--out", str(fp)) == 0
    fp_state = checkpoint.load(fp)["model"]
    assert run_cli("train", *args, "--quantizer", "dorefa", "--keep", "none", "--init", str(fp),
                   "--out", str(tmp_path / "bin")) == 0  # fmt: skip
    model = train.build_model(
        train.Config(model="convnet", quantizer="dorefa", keep="none", init=str(fp)).resolved(),
        data.load("cifar10"),
    )
    for k, v in fp_state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(type(m).__name__ != "Conv2d" for m in model.modules())


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "checkpoint.pt"
    checkpoint.save(target, {"config": {}, "model": {"w": torch.ones(3)}})
    good = target.read_bytes()

    def broken(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if the run was stopped in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(target, broken)
    assert target.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


BAD = [
    (["--quantizer", "sgn"], "unknown quantizer 'sgn'; valid: none, bc, bnn"),
    (["--model", "resnet7"], "unknown model"),
    (["--data", "imagenet"], "unknown data set"),
    (["--optimizer", "lamb"], "unknown optimizer 'lamb'; valid: adam, sgd"),
    (["--schedule", "poly"], "unknown lr schedule"),
    (["--sharpness", "linear:1", "--quantizer", "bnn+"], "needs 2 finite number"),
    (["--quantizer", "bnn", "--sharpness", "const:3"], "has no sharpness"),
    (["--input-quantizer", "proxquant"], "works on weights only"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--device", "tpu:x"], "device"),
    (["--model", "hyper-resnet7"], "unknown model 'hyper-resnet7'"),
    (["--hyper", "--generator", "conv"], "unknown generator 'conv'"),
    (["--recipe", "xnor"], "unknown recipe 'xnor'; valid: hyper-binarynet"),
    (["--betas", "0.9", "1.5"], "betas must be two numbers in [0, 1)"),
    (["--grad-clip", "0"], "grad_clip must be positive"),
    (["--input-sharpness", "decay:1:0.9"], "--input-sharpness given without"),
    (["--quantizer", "ste-warmup", "--sharpness", "stepdecay:1:0.9:2"], "needs 4 finite number"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_flags(tmp_path, run_cli, capsys, args, message):
    code = run_cli("train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r"), *args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("signgrad: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_shape_that_cannot_work(tmp_path, cifar_root, run_cli, capsys):
    fmnist = cifar_root / "fashion-mnist"
    if not fmnist.is_dir():
        pytest.skip("no fashion-mnist in SIGNGRAD_DATA")
    code = run_cli(
        "train", "--model", "vgg-small", "--data", "fashion-mnist", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "divisible by 8" in capsys.readouterr().err


def test_data_root_without_files(tmp_path, run_cli, capsys):
    code = run_cli(
        "train", "--data-root", str(tmp_path), "--no-download", "--out", str(tmp_path / "r")
    )
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path) in err and "cifar-10-batches-py" in err


def test_truncated_data_file(tmp_path, cifar_root, run_cli, capsys):
    root = tmp_path / "data"
    shutil.copytree(cifar_root / "cifar-10-batches-py", root / "cifar-10-batches-py")
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100_000])
    code = run_cli("train", "--data-root", str(root), "--out", str(tmp_path / "r"))
    err = capsys.readouterr().err
    assert code == 2 and "data_batch_3" in err


def test_unwritable_run_directory(tmp_path, cifar_root, run_cli, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = run_cli("train", "--model", "convnet", "--out", str(blocker / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot create run directory" in err


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, cifar_root, run_cli, capsys):
    out = tmp_path / "r"
    code = run_cli("train", "--model", "convnet", "--quantizer", "none", "--optimizer", "sgd",
                   "--lr", "1e30", "--epochs", "2", "--no-progress", "--out", str(out))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "training loss became nan" in err
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_existing_run_and_resume_clashes(tmp_path, cifar_root, run_cli, capsys):
    out = tmp_path / "r"
    args = ["--model", "convnet", "--epochs", "2", "--no-progress", "--out", str(out)]
    assert run_cli("train", *args, "--stop-after", "1") == 0
    assert run_cli("train", *args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run_cli("train", *args, "--resume", "--quantizer", "bc") == 2
    assert "flags differ from it: quantizer" in capsys.readouterr().err


def test_resume_without_a_run(tmp_path, run_cli, capsys):
    assert run_cli("train", "--resume", "--out", str(tmp_path / "nothing")) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_corrupt_checkpoint_for_eval(tmp_path, run_cli, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert run_cli("eval", str(bad)) == 2
    err = capsys.readouterr().err
    assert "is not a readable checkpoint" in err and len(err.strip().splitlines()) == 1


def test_command_line_error_has_no_traceback(tmp_path, run_child):
    proc = run_child("train", "--quantizer", "nope", "--out", tmp_path / "r", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(
        "signgrad: error: argument --quantizer: unknown quantizer 'nope'"
    )


@pytest.mark.slow
def test_1w1a_with_proxquant_trains(tmp_path, cifar_root, run_cli):
    out = tmp_path / "r"
    code = run_cli("train", "--model", "convnet", "--quantizer", "proxquant",
                   "--input-quantizer", "bnn", "--epochs", "3", "--lr", "3e-3",
                   "--no-progress", "--out", str(out))  # fmt: skip
    assert code == 0
    t = train.load_trained(out)
    assert t.config.activation == "hardtanh"  # sign(relu(x)) would be constant
    history = t.checkpoint["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [r["sharpness"] for r in history] == [0.0, 1.0, 2.0]  # rho * epoch
    for _, layer in layers.binary_layers(t.model):
        assert layer.input_quantizer is not None
        # The prox step clips the latent weights to [-1, 1].
        assert layer.weight.abs().max() <= 1


def test_accumulate_steps_on_the_sum_of_the_batches_gradients():
    from signgrad import convert, hooks, models
    from signgrad import train as train_mod

    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,))
    cfg = train_mod.Config(model="convnet", optimizer="sgd", momentum=0.0, lr=0.1,
                           schedule="constant", accumulate=2, epochs=1).resolved()  # fmt: skip

    def fresh():
        torch.manual_seed(1)
        m = models.get("convnet", num_classes=10, in_channels=3, image_size=8)
        return convert.binarize(m, "bnn")

    loader = data.Loader(images, labels, batch_size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                         train=False, augment=False)  # fmt: skip
    model = fresh()
    opt = train_mod.make_optimizer(cfg, model)
    train_mod.train_epoch(cfg, model, opt, loader, hooks.for_config(cfg, model, None), 0,
                          progress=False)  # fmt: skip
    # By hand: both batches' gradients at the starting weights, summed, one SGD step.
    ref = fresh()
    for x, y in loader:
        torch.nn.functional.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    pairs = zip(model.state_dict().items(), ref.state_dict().values(), strict=True)
    for (name, got), want in pairs:
        torch.testing.assert_close(got, want, msg=name)
