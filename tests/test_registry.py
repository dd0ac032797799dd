"""The one registry idiom: every kind of named component registers, lists, builds with
checked parameters and refuses unknown names alike, in Python and on the command line."""

from __future__ import annotations

import argparse

import pytest
import torch

from signgrad import cli, config, export, models, optim, quantizers
from signgrad.errors import SigngradError
from signgrad.registry import REQUIRED, Registry


def _toy() -> Registry:
    reg: Registry = Registry("widget", inputs=("size",))

    @reg.register("round-one")
    def round_one(size: int, *, smooth: float = 1.0, label: str = "x") -> tuple:
        """A round widget."""
        return ("round", size, smooth, label)

    reg.register("round-soft", round_one, defaults={"smooth": 3.0}, summary="softer")
    reg.register("square_one", lambda size, edge: ("square", size, edge))
    return reg


def test_names_in_registration_order_and_summaries():
    reg = _toy()
    assert reg.names() == ["round-one", "round-soft", "square_one"] == list(reg)
    assert len(reg) == 3
    assert reg.summaries()[:2] == [("round-one", "A round widget."), ("round-soft", "softer")]
    assert reg.help("round-one") == "round-one, round-soft, square_one (round-one)"
    assert reg.help(also=["any-WIDGET"]) == "round-one, round-soft, square_one, any-WIDGET"


@pytest.mark.parametrize(
    "spelling,name",
    [("round-one", "round-one"), ("ROUND_ONE", "round-one"), (" Round-One ", "round-one"),
     ("square-one", "square_one"), ("SQUARE_ONE", "square_one")],
)  # fmt: skip
def test_spelling_is_free_and_the_registered_one_comes_back(spelling, name):
    reg = _toy()
    assert spelling in reg
    assert reg.canonical(spelling) == name
    assert reg.get(spelling) is reg[name]


def test_unknown_names_list_the_valid_ones():
    reg = _toy()
    assert "round-two" not in reg and 3 not in reg
    with pytest.raises(SigngradError) as e:
        reg.canonical("round-two", also=["any-WIDGET"])
    assert str(e.value) == (
        "unknown widget 'round-two'; valid: round-one, round-soft, square_one, any-WIDGET"
    )
    with pytest.raises(SigngradError, match="unknown widget 'nope'"):
        reg.build("nope", 1)


def test_build_checks_parameters_and_applies_presets():
    reg = _toy()
    assert reg.build("round-one", 4) == ("round", 4, 1.0, "x")
    assert reg.build("Round_Soft", 4, label="y") == ("round", 4, 3.0, "y")
    assert reg.parameters("round-soft") == {"smooth": 3.0, "label": "x"}
    assert reg.parameters("square_one") == {"edge": REQUIRED}
    with pytest.raises(SigngradError) as e:
        reg.build("round-one", 4, colour="red", size2=1)
    assert str(e.value) == (
        "widget 'round-one' takes no parameter colour, size2; it takes: smooth, label"
    )


def test_registering_twice_or_a_preset_the_builder_cannot_take_is_refused():
    reg = _toy()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("Round_One", lambda size: None)
    with pytest.raises(SigngradError, match="takes no parameter colour"):
        reg.register("round-red", reg["round-one"], defaults={"colour": "red"})
    assert "round-red" not in reg


def test_cli_type_gives_the_registered_spelling_or_argparse_error():
    convert = _toy().cli_type()
    assert convert("SQUARE-ONE") == "square_one"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown widget 'hex'; valid: "):
        convert("hex")


# -- the library's registries -------------------------------------------------------------


REGISTRIES = cli._registries()


@pytest.mark.parametrize("kind", REGISTRIES)
def test_every_registry_follows_the_idiom(kind):
    reg = REGISTRIES[kind]
    assert isinstance(reg, Registry) and len(reg) >= 1
    for name, summary in reg.summaries():
        assert summary, f"{kind}: {name} has no summary"
        assert reg.canonical(name) == name
        other = name.upper().replace("-", "#").replace("_", "-").replace("#", "_")
        assert reg.canonical(other) == name
    with pytest.raises(SigngradError) as e:
        reg.canonical("no-such-name")
    assert all(name in str(e.value) for name in reg)


def test_vgg_small_is_one_model_in_python_and_on_the_command_line(run_cli, capsys):
    built = models.get("vgg_small", num_classes=10, in_channels=3)
    assert type(built).__name__ == "VGGSmall"
    assert config.Config(model="VGG_small").resolved().model == "vgg-small"
    resolved = config.Config(model="hyper_ResNet20", keep="first-last").resolved()
    assert (resolved.model, resolved.hyper, resolved.keep) == ("resnet20", True, "first_last")
    outs = []
    for spelling in ("vgg_small", "VGG-Small"):
        torch.manual_seed(0)  # the summary of a model name compresses fresh random weights
        assert run_cli("summary", spelling) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "binary" in outs[0]


def test_a_resumed_run_accepts_any_spelling_of_its_names(tmp_path):
    saved = config.Config(model="vgg-small", quantizer="bnn+", epochs=2).resolved()
    flags = {"model": "vgg_small", "quantizer": "BNN+", "epochs": 3}
    cfg = config.resumed_config(tmp_path, vars(saved), 1, flags)
    assert (cfg.model, cfg.quantizer, cfg.epochs) == ("vgg-small", "bnn+", 3)
    with pytest.raises(SigngradError, match="flags differ from it: model"):
        config.resumed_config(tmp_path, vars(saved), 1, {"model": "resnet20"})


def _train_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = commands.choices["train"]
    train.format_help()  # adds the lazily built flags
    return train


def test_every_name_flag_takes_its_names_and_help_from_the_registry():
    flags = {a.dest: a for a in _train_parser()._actions}
    fields = config.name_fields()
    registries = {
        "model": models.MODELS,
        "quantizer": quantizers.QUANTIZERS,
        "optimizer": optim.OPTIMIZERS,
        "schedule": optim.LR_SCHEDULES,
    }
    for field, canonical in fields.items():
        action = flags[field]
        assert action.type is not None, field
        # The flag spells names as the Python API does.
        sample = REGISTRIES_BY_FIELD[field].names()[-1]
        assert action.type(sample.upper()) == canonical(sample)
        with pytest.raises(argparse.ArgumentTypeError, match="valid: "):
            action.type("no-such-name")
    for field, reg in registries.items():
        assert all(name in flags[field].help for name in reg), field


REGISTRIES_BY_FIELD = {
    "model": REGISTRIES["models"],
    "data": REGISTRIES["data"],
    "quantizer": REGISTRIES["quantizers"],
    "input_quantizer": REGISTRIES["quantizers"],
    "scaling": REGISTRIES["scalings"],
    "keep": REGISTRIES["keep"],
    "activation": REGISTRIES["activations"],
    "generator": REGISTRIES["generators"],
    "estimator": REGISTRIES["estimators"],
    "optimizer": REGISTRIES["optimizers"],
    "schedule": REGISTRIES["lr-schedules"],
    "recipe": REGISTRIES["recipes"],
}


def test_name_fields_cover_every_registry_a_config_names():
    assert set(config.name_fields()) == set(REGISTRIES_BY_FIELD)


def test_a_bad_name_on_the_command_line_is_one_line_naming_the_flag(run_cli, capsys):
    assert run_cli("train", "--activation", "swish") == 2
    err = capsys.readouterr().err
    assert err.startswith("signgrad: error: argument --activation: unknown activation 'swish'")
    assert "relu, hardtanh, prelu, identity" in err and len(err.strip().splitlines()) == 1
    assert run_cli("train", "--no-such-flag") == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-flag" in err and "signgrad train --help" in err
    assert len(err.strip().splitlines()) == 1


def test_list_shows_every_kind_and_one_kind_with_summaries(run_cli, capsys):
    assert run_cli("list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(REGISTRIES)
    assert run_cli("list", "optimizers") == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"{name:<4}  {summary}" for name, summary in optim.OPTIMIZERS.summaries()
    ]
    assert run_cli("list", "widgets") == 2
    assert "unknown kind 'widgets'; valid: quantizers, " in capsys.readouterr().err


def test_optimizers_take_their_settings_from_the_config():
    model = torch.nn.Linear(3, 2)
    from signgrad import builders

    sgd = builders.make_optimizer(config.Config(optimizer="SGD", momentum=0.5).resolved(), model)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.5
    assert sgd.defaults["nesterov"] and sgd.defaults["lr"] == config.DEFAULT_LR["sgd"] == 0.1
    adam = builders.make_optimizer(config.Config(betas=[0.5, 0.9]).resolved(), model)
    assert adam.defaults["betas"] == (0.5, 0.9) and adam.defaults["lr"] == 1e-3


def test_export_checked_from_python_is_the_command_lines_file(tiny_run, run_cli, tmp_path):
    src = export.from_checkpoint(tiny_run)
    built = export.checked(src, "Packed")
    assert built.agree == 1.0 and built.filename == "model-packed.safetensors"
    assert built.data == export.packed(src)
    out = tmp_path / "m.safetensors"
    assert run_cli("export", tiny_run, "--out", out) == 0
    assert out.read_bytes() == built.data
    with pytest.raises(SigngradError, match="unknown export format 'tflite'"):
        export.checked(src, "tflite")
