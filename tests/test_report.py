"""Tests for signgrad.report, on run directories written by hand in the documented format."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from signgrad.errors import SigngradError
from signgrad.report import (
    _DIAG_PANELS,
    _diagnostics_figure,
    _minor_log_label,
    compare,
    group_runs,
    plot_run,
    read_config,
    read_metrics,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

BASE_CONFIG = {
    "model": "resnet20",
    "data": "cifar10",
    "quantizer": "bnn",
    "input_quantizer": None,
    "estimator": None,
    "optimizer": "adam",
    "lr": 0.001,
    "epochs": 4,
    "batch_size": 128,
    "seed": 0,
    "weight_decay": 0.0,
    "schedule": "cosine",
    "bf16": True,
    "channels_last": True,
    "out": "runs/x",
    "device": "cpu",
    "init": None,
    "scaling": "none",
    "keep": "first_last",
    "sharpness": None,
    "exact_sign_after": None,
    "data_root": "/data",
    "resume": False,
    "version": "0.1.0",
}


def epoch_record(epoch: int, offset: float = 0.0, sharpness: float | None = None) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 2.0 / epoch + offset,
        "train_acc": min(0.99, 0.2 * epoch + offset),
        "test_loss": 2.2 / epoch + offset,
        "test_acc": min(0.99, 0.15 * epoch + offset),
        "time_s": 5.0,
        "lr": 0.001 * (1.0 - (epoch - 1) / 4),
        "sharpness": sharpness,
    }


def make_run(root: Path, name: str, records: list[dict], **overrides: object) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = {**BASE_CONFIG, "out": str(run), **overrides}
    (run / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )
    return run


def assert_png(path: Path, min_bytes: int = 5_000) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    # not a blank canvas: something was drawn
    assert float(image[..., :3].std()) > 0.01
    # no temporary files left next to it
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# Two configurations (quantizer bnn / xnor) x three seeds, with per-seed offsets.
OFFSETS = {
    ("bnn", 0): 0.000,
    ("bnn", 1): 0.013,
    ("bnn", 2): -0.021,
    ("xnor", 0): 0.030,
    ("xnor", 1): 0.047,
    ("xnor", 2): 0.002,
}


@pytest.fixture
def six_runs(tmp_path: Path) -> list[Path]:
    runs = []
    for (quantizer, seed), offset in OFFSETS.items():
        records = [epoch_record(e, offset) for e in range(1, 5)]
        runs.append(
            make_run(
                tmp_path / "runs",
                f"{quantizer}-s{seed}",
                records,
                quantizer=quantizer,
                seed=seed,
                device="cuda" if seed == 2 else "cpu",
            )
        )
    return runs


# --------------------------------------------------------------------------- reading


def test_read_config_and_metrics_roundtrip(tmp_path: Path) -> None:
    records = [epoch_record(e, sharpness=5.0 * e) for e in (1, 2, 3)]
    run = make_run(tmp_path, "r", records)
    assert read_config(run)["model"] == "resnet20"
    assert read_metrics(run) == records


def test_read_metrics_skips_blank_lines_and_later_duplicate_wins(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", [])
    lines = [
        json.dumps(epoch_record(1)),
        "",
        json.dumps(epoch_record(2)),
        json.dumps(epoch_record(2, 0.5)),  # resumed run repeating epoch 2
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = read_metrics(run)
    assert [r["epoch"] for r in got] == [1, 2]
    assert got[1]["train_loss"] == pytest.approx(1.0 + 0.5)


def test_corrupt_metrics_line_names_file_and_line(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", [epoch_record(1), epoch_record(2)])
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"epoch": 3, "train_loss": 0.5, "test_ac\n')
    with pytest.raises(SigngradError, match=r"metrics\.jsonl, line 3"):
        read_metrics(run)
    with pytest.raises(SigngradError, match="line 3"):
        compare([run], tmp_path / "c.png")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[1, 2]", "JSON object"),
        ('{"train_loss": 1.0}', "epoch"),
        ('{"epoch": 0}', "epoch"),
        ('{"epoch": 1, "test_acc": "high"}', "test_acc"),
    ],
)
def test_invalid_metrics_records(tmp_path: Path, line: str, problem: str) -> None:
    run = make_run(tmp_path, "r", [epoch_record(1)])
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    with pytest.raises(SigngradError, match=rf"line 2.*{problem}"):
        read_metrics(run)


def test_empty_metrics_is_an_error(tmp_path: Path) -> None:
    run = make_run(tmp_path, "r", [])
    with pytest.raises(SigngradError, match=r"metrics\.jsonl.*empty"):
        read_metrics(run)


def test_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(SigngradError, match="does not exist"):
        read_metrics(tmp_path / "nope")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(SigngradError, match=r"config\.json"):
        read_config(empty_dir)
    with pytest.raises(SigngradError, match=r"metrics\.jsonl"):
        read_metrics(empty_dir)
    run = make_run(tmp_path, "r", [epoch_record(1)])
    (run / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(SigngradError, match=r"config\.json.*not valid JSON"):
        read_config(run)
    (run / "config.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(SigngradError, match="JSON object"):
        read_config(run)


def test_not_a_run_directory_is_named(tmp_path: Path, six_runs: list[Path]) -> None:
    missing = tmp_path / "missing-run"
    with pytest.raises(SigngradError, match="missing-run"):
        group_runs([*six_runs, missing])
    with pytest.raises(SigngradError, match="missing-run"):
        compare([six_runs[0], missing], tmp_path / "c.png")
    half = tmp_path / "half-run"
    half.mkdir()
    (half / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(SigngradError, match=r"half-run.*metrics\.jsonl"):
        compare([half], tmp_path / "c.png")
    with pytest.raises(SigngradError, match="at least one"):
        compare([], tmp_path / "c.png")
    with pytest.raises(SigngradError, match="at least one"):
        group_runs([])
    assert not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------- plot_run


def test_plot_run_default_path(tmp_path: Path) -> None:
    records = [epoch_record(e, sharpness=5.0 * e) for e in range(1, 6)]
    run = make_run(tmp_path, "r", records)
    out = plot_run(run)
    assert out == run / "curves.png"
    assert_png(out)


def test_plot_run_skips_all_null_panel(tmp_path: Path) -> None:
    with_sharp = make_run(tmp_path, "a", [epoch_record(e, sharpness=1.0) for e in range(1, 4)])
    without = make_run(tmp_path, "b", [epoch_record(e) for e in range(1, 4)])
    a = matplotlib.image.imread(plot_run(with_sharp, tmp_path / "a.png"))
    b = matplotlib.image.imread(plot_run(without, tmp_path / "sub" / "b.png"))
    assert_png(tmp_path / "sub" / "b.png")
    # one panel fewer -> narrower figure
    assert b.shape[1] < a.shape[1]


# --------------------------------------------------------------------------- grouping


def test_group_runs_by_differing_keys_ignoring_seed(six_runs: list[Path]) -> None:
    groups = group_runs(six_runs)
    assert list(groups) == ["quantizer=bnn", "quantizer=xnor"]
    assert [p.name for p in groups["quantizer=bnn"]] == ["bnn-s0", "bnn-s1", "bnn-s2"]
    assert [p.name for p in groups["quantizer=xnor"]] == ["xnor-s0", "xnor-s1", "xnor-s2"]


def test_group_runs_several_keys_and_single_config(tmp_path: Path) -> None:
    recs = [epoch_record(1)]
    a = make_run(tmp_path, "a", recs, estimator="ste", lr=0.01)
    b = make_run(tmp_path, "b", recs, estimator="ste", lr=0.001)
    c = make_run(tmp_path, "c", recs, estimator=None, lr=0.01, seed=5)
    groups = group_runs([a, b, c])
    assert list(groups) == [
        "estimator=ste, lr=0.01",
        "estimator=ste, lr=0.001",
        "estimator=none, lr=0.01",
    ]
    # only ignored keys differ -> one group
    d = make_run(tmp_path, "d", recs, seed=1, out="elsewhere", data_root="/other")
    e = make_run(tmp_path, "e", recs, seed=2, epochs=4.0)  # 4 == 4.0
    assert group_runs([d, e]) == {"all runs": [d, e]}
    assert group_runs(d) == {"d": [d]}
    # the same run named twice counts once
    assert group_runs([d, d]) == {"d": [d]}
    # a field a run predates counts as its default: data_mode came after run f
    f = make_run(tmp_path, "f", recs, seed=3)
    g = make_run(tmp_path, "g", recs, seed=4, data_mode="auto")
    h = make_run(tmp_path, "h", recs, seed=5, data_mode="stream")
    assert group_runs([f, g, h]) == {"data_mode=auto": [f, g], "data_mode=stream": [h]}


def test_group_labels_leave_out_empty_values_while_they_stay_distinct(tmp_path: Path) -> None:
    recs = [epoch_record(1)]
    ste = make_run(tmp_path, "ste", recs, estimator=None, estimator_params=[])
    ref = make_run(tmp_path, "ref", recs, estimator="metaquant-fc-ref", estimator_params=[])
    bias = make_run(
        tmp_path, "bias", recs, estimator="metaquant-fc", estimator_params=["bias=true"]
    )
    assert list(group_runs([ste, ref, bias])) == [
        "estimator=none",
        "estimator=metaquant-fc-ref",
        'estimator=metaquant-fc, estimator_params=["bias=true"]',
    ]
    # left out, [] and "" would both read as nothing: every label keeps all its values
    a = make_run(tmp_path, "a", recs, sharpness=[])
    b = make_run(tmp_path, "b", recs, sharpness="")
    assert list(group_runs([a, b])) == ["sharpness=[]", "sharpness="]


@pytest.mark.parametrize(
    ("limits", "labels"),
    [
        ((0.2, 0.6), {0.3: "0.3", 0.4: "0.4", 0.5: "0.5"}),  # within a decade: all
        ((0.15, 10.0), {0.2: "0.2", 0.3: "0.3", 0.4: "", 0.5: "0.5", 7.0: ""}),  # 2, 3, 5
        ((1e-3, 10.0), {0.2: "", 0.5: "", 3.0: ""}),  # four decades: none
    ],
)
def test_minor_ticks_of_the_loss_axis_are_labelled_as_far_as_they_fit(
    limits: tuple[float, float], labels: dict[float, str]
) -> None:
    ax = Figure().add_subplot()
    ax.set_yscale("log")
    ax.set_ylim(*limits)
    assert {v: _minor_log_label(ax, v) for v in labels} == labels


@pytest.mark.parametrize(
    ("norm_ratio", "scale"),
    [
        ([[1.0, 10.0, 1e4], [1.0, 20.0, 1e5]], "log"),  # STE's 1 to orders above it
        ([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], "linear"),  # a zero cannot go on a log axis
    ],
)
def test_diagnostics_plot_puts_positive_norm_ratios_on_a_log_axis(
    norm_ratio: list[list[float]], scale: str
) -> None:
    series = {key: np.full((2, 3), 0.5) for key, _, _ in _DIAG_PANELS}
    series["norm_ratio"] = np.array(norm_ratio)
    axes = _diagnostics_figure([("a", 2, np.arange(1.0, 4.0), series)]).axes
    keys = [key for key, _, _ in _DIAG_PANELS]
    assert axes[keys.index("norm_ratio")].get_yscale() == scale
    assert axes[keys.index("loss")].get_yscale() == "log"
    assert axes[keys.index("cos")].get_yscale() == "linear"


# --------------------------------------------------------------------------- compare


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(f"| {label} |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no row for {label!r} in\n{table}")


def test_compare_table_statistics(tmp_path: Path, six_runs: list[Path]) -> None:
    png = tmp_path / "out" / "compare.png"
    table = compare(six_runs, png)
    assert_png(png, min_bytes=10_000)
    assert table.splitlines()[0].startswith("| config | runs | epochs |")
    for quantizer in ("bnn", "xnor"):
        offsets = [OFFSETS[(quantizer, s)] for s in range(3)]
        final_acc = [100 * epoch_record(4, o)["test_acc"] for o in offsets]
        final_loss = [epoch_record(4, o)["train_loss"] for o in offsets]
        best_acc = [max(100 * epoch_record(e, o)["test_acc"] for e in range(1, 5)) for o in offsets]
        row = _row(table, f"quantizer={quantizer}")
        assert row[1] == "3"
        assert row[2] == "4"
        acc = f"{statistics.mean(final_acc):.2f} ± {statistics.stdev(final_acc):.2f}"
        loss = f"{statistics.mean(final_loss):.4f} ± {statistics.stdev(final_loss):.4f}"
        assert row[3] == acc
        assert row[4] == loss
        assert row[5] == f"{statistics.mean(best_acc):.2f}"
    assert "*" not in table  # no footnote: all runs finished the same epochs


def test_compare_single_run_has_no_spread(tmp_path: Path) -> None:
    run = make_run(tmp_path, "solo", [epoch_record(e) for e in (1, 2)])
    table = compare([run], tmp_path / "c.png")
    row = _row(table, "solo")
    assert row[1:] == ["1", "2", "30.00 ± —", "1.0000 ± —", "30.00"]
    assert_png(tmp_path / "c.png")


def test_compare_common_prefix_footnote(tmp_path: Path) -> None:
    long_run = make_run(tmp_path, "long", [epoch_record(e, 0.01) for e in range(1, 6)], seed=0)
    short_run = make_run(tmp_path, "short", [epoch_record(e) for e in range(1, 4)], seed=1)
    other = make_run(tmp_path, "other", [epoch_record(e) for e in range(1, 3)], lr=0.1)
    table = compare([long_run, short_run, other], tmp_path / "c.png")
    row = _row(table, "lr=0.001")
    assert row[2] == "3*"
    # statistics at epoch 3, the last common epoch, not epoch 5
    final_acc = [100 * epoch_record(3, 0.01)["test_acc"], 100 * epoch_record(3)["test_acc"]]
    assert row[3] == f"{statistics.mean(final_acc):.2f} ± {statistics.stdev(final_acc):.2f}"
    footnotes = [line for line in table.splitlines() if line.startswith("\\*")]
    assert len(footnotes) == 1
    assert "lr=0.001" in footnotes[0] and "5, 3" in footnotes[0] and "3 epochs" in footnotes[0]
    assert _row(table, "lr=0.1")[2] == "2"


def test_compare_overwrites_atomically(tmp_path: Path, six_runs: list[Path]) -> None:
    png = tmp_path / "c.png"
    png.write_bytes(b"old")
    os.chmod(png, 0o644)
    compare(six_runs[:3], png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "runs"]
