"""``--init`` from the MetaQuant/FSG authors' full-precision CIFAR ResNets (plain
state_dicts saved from CUDA, option-B shortcuts), with their input normalisation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from signgrad import builders, checkpoint, config, data, train
from signgrad.errors import SigngradError

PRETRAINED = Path(os.environ.get("SIGNGRAD_DATA", "/nonexistent")) / "pretrained"
RESNET20 = PRETRAINED / "ResNet20-CIFAR10-pretrain.pth"
#: The normalisation the authors trained these models with (not CIFAR-10's own std).
AUTHORS = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}


@pytest.fixture(scope="module")
def resnet20_file() -> Path:
    if not RESNET20.is_file():
        pytest.skip("no pretrained/ResNet20-CIFAR10-pretrain.pth in SIGNGRAD_DATA")
    return RESNET20


def test_the_authors_resnet20_loads_into_resnet20_b_and_keeps_its_accuracy(
    resnet20_file, cifar_root
):
    cfg = config.Config(model="resnet20-b", quantizer="none", init=str(resnet20_file),
                        data_root=str(cifar_root), **AUTHORS).resolved()  # fmt: skip
    ds = builders.normalised(cfg, data.load("cifar10", root=cifar_root, download=False))
    model = builders.build_model(cfg, ds).eval()
    loader = data.Loader(ds.test_images, ds.test_labels, batch_size=500, mean=ds.mean,
                         std=ds.std, train=False, augment=False)  # fmt: skip
    _, acc = train.evaluate(model, loader)
    # The data root's README measured 91.94% on these 1,017 test images.
    assert acc > 0.90, acc


def test_a_plain_state_dict_that_does_not_fit_is_one_line_naming_tensors(resnet20_file):
    cfg = config.Config(model="resnet20", quantizer="none", init=str(resnet20_file)).resolved()
    with pytest.raises(SigngradError) as e:
        builders.build_architecture(cfg, 10, 3, 32)
    msg = str(e.value)
    assert "does not fit resnet20: tensors" in msg and "shortcut.0.weight" in msg
    assert "\n" not in msg


def test_read_init_refuses_what_is_not_tensors(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"a": torch.ones(2), "b": [1, 2]}, path)
    with pytest.raises(SigngradError, match="neither a signgrad checkpoint nor a state_dict"):
        checkpoint.read_init(path)
    torch.save({"w": torch.tensor([1.0, float("nan")])}, path)
    with pytest.raises(SigngradError, match="its w holds NaN"):
        checkpoint.read_init(path)
    torch.save({"layer2.0.downsample.0.weight": torch.ones(1)}, path)
    state, weights = checkpoint.read_init(path)
    assert state is None and list(weights) == ["layer2.0.shortcut.0.weight"]


@pytest.mark.parametrize(("mean", "std", "message"), [
    ([0.5], None, "go together"),
    ([0.5, 0.5], [0.2], "one per channel"),
    ([0.5], [0.0], "std > 0"),
])  # fmt: skip
def test_bad_normalisation_is_refused(mean, std, message):
    with pytest.raises(SigngradError, match=message):
        config.Config(mean=mean, std=std).resolved()
