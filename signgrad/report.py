"""Reading, plotting and comparing training runs.

A run directory, as written by ``signgrad train --out RUN_DIR``, holds

* ``config.json``: the resolved configuration, one flat JSON object;
* ``metrics.jsonl``: one JSON object per finished epoch (1-based ``epoch``, ``train_loss``,
  ``train_acc``, ``test_loss``, ``test_acc`` as a fraction, ``time_s``, ``lr``, ``sharpness``;
  any of the values may be ``null``).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so this
module never touches pyplot or the global backend, and every PNG is written atomically (a
temporary file in the same folder, then :func:`os.replace`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from signgrad import diagnostics
from signgrad.checkpoint import CONFIG_NAME, METRICS_NAME, atomic_write
from signgrad.errors import SigngradError

__all__ = [
    "CONFIG_NAME",
    "METRICS_NAME",
    "GROUP_IGNORE",
    "read_metrics",
    "read_config",
    "plot_run",
    "group_runs",
    "compare",
    "diagnose",
    "step_losses",
]


#: Config keys that say how or where a run was made, not what was trained: runs that differ
#: only in these belong to the same group (they are repeats of one configuration).
GROUP_IGNORE = (
    "seed",
    "out",
    "resume",
    "device",
    "data_root",
    "version",
    "channels_last",
    "download",
    "diagnostics",
)

#: Metric fields that must be numbers (or null) when present.
_NUMERIC_FIELDS = (
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "time_s",
    "lr",
    "sharpness",
)

_MISSING = object()  # a config key a run does not have at all


# --------------------------------------------------------------------------- reading


def _run_path(run_dir: str | os.PathLike[str]) -> Path:
    path = Path(run_dir)
    if not path.exists():
        raise SigngradError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise SigngradError(f"{path} is not a run directory (it is a file)")
    return path


def _check_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """Return ``run_dir`` as a Path, or raise if it lacks config.json or metrics.jsonl."""
    path = _run_path(run_dir)
    missing = [name for name in (CONFIG_NAME, METRICS_NAME) if not (path / name).is_file()]
    if missing:
        raise SigngradError(f"{path} is not a run directory: no {' or '.join(missing)} in it")
    return path


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The resolved configuration of a run (``RUN_DIR/config.json``) as a dict."""
    file = _run_path(run_dir) / CONFIG_NAME
    if not file.is_file():
        raise SigngradError(f"{file} not found (is {file.parent} a run directory?)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SigngradError(f"{file} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise SigngradError(f"cannot read {file}: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise SigngradError(f"{file} must hold a JSON object, found {type(config).__name__}")
    return config


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch records of a run (``RUN_DIR/metrics.jsonl``), sorted by epoch.

    Blank lines are skipped. If an epoch appears more than once (a resumed run that repeated
    it) the later record wins. Raises :class:`SigngradError` if the file is missing, holds
    no records, or a line is not a JSON object with a positive integer ``epoch`` and numeric
    (or null) metric values; the message names the file and the line.
    """
    file = _run_path(run_dir) / METRICS_NAME
    if not file.is_file():
        raise SigngradError(f"{file} not found (is {file.parent} a run directory?)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SigngradError(f"{file} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise SigngradError(f"cannot read {file}: {exc.strerror or exc}") from None

    by_epoch: dict[int, dict[str, Any]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SigngradError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise SigngradError(f"{where}: expected a JSON object, found {type(record).__name__}")
        epoch = record.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise SigngradError(f"{where}: 'epoch' must be a positive integer, got {epoch!r}")
        for key in _NUMERIC_FIELDS:
            value = record.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise SigngradError(f"{where}: {key!r} must be a number or null, got {value!r}")
        by_epoch[epoch] = record
    if not by_epoch:
        raise SigngradError(f"{file} is empty: the run has no finished epoch yet")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _series(records: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> np.ndarray:
    """One metric over epochs as floats; null or absent values become NaN."""
    return np.array(
        [math.nan if r.get(key) is None else float(r[key]) * scale for r in records],
        dtype=float,
    )


# --------------------------------------------------------------------------- writing


def _save_atomic(fig: Figure, path: Path) -> Path:
    """Render ``fig`` as PNG to ``path`` via a temporary file in the same folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SigngradError(f"cannot write {path}: {exc.strerror or exc}") from None
    FigureCanvasAgg(fig)  # attach an Agg canvas: no pyplot, no global backend
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path


# --------------------------------------------------------------------------- one run


def _run_title(run_dir: Path, config: dict[str, Any]) -> str:
    parts = [
        f"{k}={_fmt_value(config[k])}"
        for k in ("model", "data", "quantizer", "estimator")
        if config.get(k) is not None
    ]
    return run_dir.name + (f"  ({', '.join(parts)})" if parts else "")


def plot_run(run_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """Plot one run's curves to a PNG (default ``RUN_DIR/curves.png``); returns its path.

    Panels: train & test loss, accuracy (test, with train dashed), learning rate and
    sharpness. A panel whose values are all null is left out.
    """
    run = _check_run_dir(run_dir)
    config = read_config(run)
    records = read_metrics(run)
    out = Path(path) if path is not None else run / "curves.png"
    epochs = np.array([r["epoch"] for r in records], dtype=float)

    # (title, y label, [(values, label, style)])
    panels: list[tuple[str, str, list[tuple[np.ndarray, str, str]]]] = [
        (
            "loss",
            "loss",
            [
                (_series(records, "train_loss"), "train", "-"),
                (_series(records, "test_loss"), "test", "-"),
            ],
        ),
        (
            "accuracy",
            "accuracy (%)",
            [
                (_series(records, "test_acc", 100.0), "test", "-"),
                (_series(records, "train_acc", 100.0), "train", "--"),
            ],
        ),
        ("learning rate", "lr", [(_series(records, "lr"), "lr", "-")]),
        ("sharpness", "sharpness", [(_series(records, "sharpness"), "sharpness", "-")]),
    ]
    shown = []
    for title, ylabel, lines in panels:
        lines = [line for line in lines if not np.all(np.isnan(line[0]))]
        if lines:
            shown.append((title, ylabel, lines))
    if not shown:
        raise SigngradError(f"{run / METRICS_NAME} has no metric values to plot (all null)")

    fig = Figure(figsize=(4.0 * len(shown), 3.6), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    for ax, (title, ylabel, lines) in zip(axes, shown, strict=True):
        for values, label, style in lines:
            ax.plot(epochs, values, style, marker="." if len(epochs) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize="small")
    fig.suptitle(_run_title(run, config), fontsize="medium")
    return _save_atomic(fig, out)


# --------------------------------------------------------------------------- grouping


def _canon(value: Any) -> Any:
    """A JSON-able form in which equal configuration values compare equal (30 == 30.0)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return [_canon(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canon(v) for k, v in value.items()}
    return repr(value)


def _canon_key(value: Any) -> str:
    if value is _MISSING:
        return "\0missing"
    return json.dumps(_canon(value), sort_keys=True)


def _fmt_value(value: Any) -> str:
    if value is _MISSING:
        return "(unset)"
    if value is None:
        return "none"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _as_run_list(run_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    if isinstance(run_dirs, str | os.PathLike):
        run_dirs = [run_dirs]
    runs: list[Path] = []
    seen: set[Path] = set()
    for run_dir in run_dirs:
        run = _check_run_dir(run_dir)
        resolved = run.resolve()
        if resolved not in seen:  # the same run named twice counts once
            seen.add(resolved)
            runs.append(run)
    if not runs:
        raise SigngradError("no run directories given: need at least one")
    return runs


def _with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the configuration fields it lacks at their defaults: a run written
    before a field existed is trained as the default says (as ``Config.from_dict`` reads
    it), so it belongs with the runs that state that default."""
    import dataclasses

    from signgrad.config import Config  # the configuration, not the loop: no cycle

    filled = {}
    for f in dataclasses.fields(Config):
        if f.default is not dataclasses.MISSING:
            filled[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            filled[f.name] = f.default_factory()
    return {**filled, **config}


def _group(runs: list[Path]) -> dict[str, list[Path]]:
    configs = [_with_defaults(read_config(run)) for run in runs]
    keys: list[str] = []
    for config in configs:
        keys.extend(k for k in config if k not in GROUP_IGNORE and k not in keys)
    differing = [k for k in keys if len({_canon_key(c.get(k, _MISSING)) for c in configs}) > 1]

    groups: dict[tuple[str, ...], list[Path]] = {}
    full: dict[tuple[str, ...], str] = {}
    short: dict[tuple[str, ...], str] = {}
    for run, config in zip(runs, configs, strict=True):
        ident = tuple(_canon_key(config.get(k, _MISSING)) for k in differing)
        groups.setdefault(ident, []).append(run)
        values = [(k, config.get(k, _MISSING)) for k in differing]
        full.setdefault(ident, ", ".join(f"{k}={_fmt_value(v)}" for k, v in values))
        # "estimator_params=[]" says nothing: empty lists and strings are left out where
        # that keeps every label distinct (None is a choice: "estimator=none")
        kept = [(k, v) for k, v in values if v not in ([], {}, "")]
        short.setdefault(ident, ", ".join(f"{k}={_fmt_value(v)}" for k, v in kept))
    if not differing:  # one configuration only
        label = runs[0].name if len(runs) == 1 else "all runs"
        return {label: list(runs)}
    labels = short if all(short.values()) and len(set(short.values())) == len(short) else full
    return {labels[ident]: members for ident, members in groups.items()}


def group_runs(
    run_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
) -> dict[str, list[Path]]:
    """Group runs that share a configuration, ignoring the keys in :data:`GROUP_IGNORE`.

    Each key is a short label built from the configuration keys whose values differ between
    the given runs, e.g. ``"quantizer=bnn"`` or ``"estimator=ste, lr=0.01"``; each value is
    the list of run directories in that group, in the order given. Groups come in the order
    their first run was given. When no key differs there is one group, labelled with the run
    directory's name for a single run and ``"all runs"`` otherwise.
    """
    return _group(_as_run_list(run_dirs))


# --------------------------------------------------------------------------- comparing


def _mean_spread(values: list[float], decimals: int) -> str:
    """``mean ± sample std``; ``—`` for the spread of a single value, ``n/a`` for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{decimals}f} ± —"
    std = float(np.std(values, ddof=1))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _mean_only(values: list[float], decimals: int) -> str:
    values = [v for v in values if v is not None]
    return f"{float(np.mean(values)):.{decimals}f}" if values else "n/a"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _final(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> float | None:
    value = records[-1].get(key)
    return None if value is None else float(value) * scale


def _best(records: list[dict[str, Any]], key: str, scale: float = 1.0) -> float | None:
    values = [float(r[key]) * scale for r in records if r.get(key) is not None]
    return max(values) if values else None


def compare(
    run_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    png_path: str | os.PathLike[str],
) -> str:
    """Compare runs group by group: return a markdown table and write one PNG of curves.

    One table row per group (see :func:`group_runs`): number of runs, epochs, final test
    accuracy in % and final training loss as ``mean ± sample std`` over the group's runs
    (``± —`` when the group has one run), and the mean over runs of the best test accuracy.
    If a group's runs finished different numbers of epochs, every statistic and curve of
    that group uses the epochs all of them have (the common prefix); the epochs cell is
    marked ``*`` and a footnote under the table says so.

    The PNG has two panels, training loss and test accuracy against epoch; per group the
    mean curve over its runs and a shaded band from the minimum to the maximum.
    """
    runs = _as_run_list(run_dirs)
    groups = _group(runs)

    rows: list[str] = []
    notes: list[str] = []
    curves: list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]] = []
    for label, members in groups.items():
        all_records = [read_metrics(run) for run in members]
        common = set.intersection(*({r["epoch"] for r in recs} for recs in all_records))
        if not common:
            raise SigngradError(
                f"runs in group {label!r} share no finished epoch: "
                + ", ".join(str(run) for run in members)
            )
        records = [[r for r in recs if r["epoch"] in common] for recs in all_records]
        epochs_cell = str(len(common))
        if any(len(recs) != len(common) for recs in all_records):
            epochs_cell += "*"
            finished = ", ".join(str(recs[-1]["epoch"]) for recs in all_records)
            notes.append(
                f"\\* `{_md_cell(label)}`: runs finished {finished} epochs; its statistics and "
                f"curves use the {len(common)} epochs common to all of them."
            )
        rows.append(
            "| "
            + " | ".join(
                [
                    _md_cell(label),
                    str(len(members)),
                    epochs_cell,
                    _mean_spread([_final(r, "test_acc", 100.0) for r in records], 2),
                    _mean_spread([_final(r, "train_loss") for r in records], 4),
                    _mean_only([_best(r, "test_acc", 100.0) for r in records], 2),
                ]
            )
            + " |"
        )
        xs = np.array(sorted(common), dtype=float)
        loss = np.stack([_series(r, "train_loss") for r in records])
        acc = np.stack([_series(r, "test_acc", 100.0) for r in records])
        curves.append((label, len(members), xs, loss, acc))

    _plot_compare(curves, Path(png_path))

    header = [
        "| config | runs | epochs | final test acc (%) | final train loss | best test acc (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    table = "\n".join(header + rows)
    if notes:
        table += "\n\n" + "\n".join(notes)
    return table + "\n"


def _log_axis(ax: Any) -> None:
    """A log y axis labelled with plain numbers (0.2, not 2 x 10^-1)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(partial(_minor_log_label, ax)))


def _minor_log_label(ax: Any, value: float, _pos: int | None = None) -> str:
    """The label of a minor tick on a log axis: every one within a decade, only 2, 3 and 5
    times a power of ten over up to 2.5 decades (all of them would overlap), none beyond."""
    lo, hi = ax.get_ylim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
    if decades <= 1 or (decades <= 2.5 and mantissa in (2, 3, 5)):
        return f"{value:g}"
    return ""


def _nan_stats(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over runs (axis 0), ignoring NaN; all-NaN epochs stay NaN."""
    mask = ~np.isnan(values)
    count = mask.sum(axis=0)
    filled = np.where(mask, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(axis=0) / count
    lo = np.where(count > 0, np.where(mask, values, np.inf).min(axis=0), np.nan)
    hi = np.where(count > 0, np.where(mask, values, -np.inf).max(axis=0), np.nan)
    return mean, lo, hi


def _plot_compare(
    curves: list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]], path: Path
) -> Path:
    fig = Figure(figsize=(11.0, 4.4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    styles = ("-", "--", ":", "-.")
    for i, (label, n, xs, loss, acc) in enumerate(curves):
        color = f"C{i % 10}"
        style = styles[(i // 10) % len(styles)]
        legend = f"{label} (n={n})"
        for ax, values in ((ax_loss, loss), (ax_acc, acc)):
            mean, lo, hi = _nan_stats(values)
            marker = "." if len(xs) == 1 else None
            ax.plot(xs, mean, style, color=color, marker=marker, label=legend)
            if n > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
    ax_loss.set_title("training loss")
    ax_loss.set_ylabel("loss")
    losses = np.concatenate([loss.ravel() for _, _, _, loss, _ in curves])
    if np.nanmin(losses) > 0:
        # Early losses of binary runs can be 10x the final ones; a log axis keeps the
        # differences at the end readable.
        _log_axis(ax_loss)
    ax_acc.set_title("test accuracy")
    ax_acc.set_ylabel("accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    # Below both panels: group labels can be long, and inside a panel they hide the curves.
    handles, names = ax_acc.get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="outside lower center",
        fontsize="small",
        title="mean, band = min–max",
        title_fontsize="small",
    )
    return _save_atomic(fig, path)


# --------------------------------------------------------------------------- diagnostics

#: What :func:`diagnose` tabulates and plots: (series, label, scale).
_DIAG_PANELS = (
    ("loss", "training loss (batch)", 1.0),
    ("cos", "cosine with STE's gradient", 1.0),
    ("norm_ratio", "norm ratio to STE's gradient", 1.0),
    ("drift", "drift |mean| / rms", 1.0),
    ("flips", "weights changing sign (%)", 100.0),
)


#: The table's cells: (summary key, scale, decimals).
_DIAG_CELLS = (
    ("cos_early", 1.0, 3),
    ("cos", 1.0, 3),
    ("norm_ratio", 1.0, 3),
    ("drift_early", 1.0, 3),
    ("drift", 1.0, 3),
    ("flips", 100.0, 2),
)


def _diag_series(records: list[dict[str, Any]], key: str) -> np.ndarray:
    if key == "loss":
        return np.array([np.nan if r.get("loss") is None else r["loss"] for r in records])
    return np.array(diagnostics.layer_means(records, key), dtype=float)


def diagnose(
    run_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    early: int = 10,
) -> str:
    """Gradient-fidelity diagnostics of runs trained with ``--diagnostics``, group by group
    (as :func:`compare` groups them): a markdown table and one PNG of the series against
    the step (layer means; per group the mean over runs and a min-max band).

    The table gives, per group, the means over steps of the layer means: the cosine and
    norm ratio of the applied gradient to the straight-through one, the drift and the
    percentage of weights changing sign per step, each over the first ``early`` steps
    with a learned gradient and over the whole run; and the fallback count (summed over
    runs). Runs of one group use the steps all of them recorded."""
    runs = _as_run_list(run_dirs)
    rows, panels = [], []
    for label, members in _group(runs).items():
        recs = [diagnostics.read(run)[1] for run in members]
        common = set.intersection(*({r["step"] for r in rs} for rs in recs))
        if not common:
            raise SigngradError(f"runs in group {label!r} share no recorded step")
        recs = [[r for r in rs if r["step"] in common] for rs in recs]
        sums = [diagnostics.summary(rs, early) for rs in recs]
        cells = [
            _mean_only([scale * s[key] for s in sums if math.isfinite(s[key])], digits)
            for key, scale, digits in _DIAG_CELLS
        ]
        fallbacks = int(sum(s["fallbacks"] for s in sums))
        rows.append(
            f"| {_md_cell(label)} | {len(members)} | {len(common)} | "
            + " | ".join(cells)
            + f" | {fallbacks} |"
        )
        xs = np.array(sorted(common), dtype=float)
        series = {k: np.stack([_diag_series(rs, k) for rs in recs]) for k, _, _ in _DIAG_PANELS}
        panels.append((label, len(members), xs, series))
    _plot_diagnostics(panels, Path(png_path))
    header = [
        f"| config | runs | steps | cos (first {early}) | cos | norm ratio | "
        f"drift (first {early}) | drift | sign flips per step (%) | fallbacks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(header + rows) + "\n"


def _plot_diagnostics(
    panels: list[tuple[str, int, np.ndarray, dict[str, np.ndarray]]], path: Path
) -> Path:
    return _save_atomic(_diagnostics_figure(panels), path)


def _diagnostics_figure(panels: list[tuple[str, int, np.ndarray, dict[str, np.ndarray]]]) -> Figure:
    """One panel per series of ``_DIAG_PANELS``, a line (mean) and band (min-max) per group
    of ``panels`` (label, runs, steps, series by key)."""
    fig = Figure(figsize=(15.0, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    positive = {key: True for key, _, _ in _DIAG_PANELS}
    for i, (label, n, xs, series) in enumerate(panels):
        color = f"C{i % 10}"
        for ax, (key, title, scale) in zip(axes, _DIAG_PANELS, strict=False):
            mean, lo, hi = _nan_stats(scale * series[key])
            positive[key] &= not bool(np.nanmin(lo, initial=np.inf) <= 0)
            ax.plot(xs, mean, color=color, linewidth=1, label=f"{label} (n={n})")
            if n > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
            ax.set_title(title)
    for ax in axes[: len(_DIAG_PANELS)]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    # The loss, and norm ratios that run from 1 (STE) to orders of magnitude above it: log
    # axes, where every value is positive.
    for ax, (key, _, _) in zip(axes, _DIAG_PANELS, strict=False):
        if key in ("loss", "norm_ratio") and positive[key]:
            _log_axis(ax)
    axes[-1].axis("off")
    handles, names = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, names, loc="center", fontsize="small", title="mean, band = min–max")
    return fig


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` steps (fewer at the start)."""
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def step_losses(
    run_dirs: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], window: int = 40
) -> str:
    """Training loss per step of runs trained with ``--diagnostics``, group by group (as
    :func:`compare` groups them): a markdown table of the loss (a trailing mean over
    ``window`` steps) at a quarter, half and all of the steps every run has, as the mean
    over the group's runs and a 95% interval (1.96 standard errors); the first step at
    which the group's mean reaches the first group's final value (the baseline, e.g.
    STE); the final test accuracy (mean ± standard error); seconds per step
    (evaluation included); and the final loss minus the first group's, paired by seed
    (runs of the two groups with the same ``seed``): the mean difference ± 1.96 standard
    errors of the differences, which removes what the seed does to both."""
    runs = _as_run_list(run_dirs)
    groups = _group(runs)
    curves: dict[str, np.ndarray] = {}
    seeds = {label: [read_config(run).get("seed") for run in members]
             for label, members in groups.items()}  # fmt: skip
    recorded: dict[str, int] = {}  # steps recorded, over the group's runs
    rows = []
    for label, members in groups.items():
        recs = [diagnostics.read(run)[1] for run in members]
        n = min(len(r) for r in recs)
        curves[label] = np.stack([_smooth(_diag_series(r[:n], "loss"), window) for r in recs])
        recorded[label] = sum(len(r) for r in recs)
    target = float(next(iter(curves.values())).mean(axis=0)[-1])
    first_label = next(iter(curves))
    base = dict(zip(seeds[first_label], curves[first_label][:, -1], strict=True))
    for label, members in groups.items():
        losses = curves[label]
        n = losses.shape[1]
        mean = losses.mean(axis=0)
        half = (
            1.96 * losses.std(axis=0, ddof=1) / math.sqrt(len(members))
            if len(members) > 1
            else np.full(n, np.nan)
        )
        cells = []
        for k in (n // 4, n // 2, n):
            spread = "" if math.isnan(half[k - 1]) else f" ± {half[k - 1]:.3f}"
            cells.append(f"{mean[k - 1]:.3f}{spread}")
        reached = np.nonzero(mean <= target)[0]
        reach = str(int(reached[0]) + 1) if len(reached) else f"not in {n}"
        metrics = [read_metrics(run) for run in members]
        accs = [_final(m, "test_acc", 100.0) for m in metrics]
        acc = _mean_se([a for a in accs if a is not None])
        seconds = sum(r.get("time_s") or 0.0 for m in metrics for r in m)
        per_step = seconds / max(1, recorded[label])
        rows.append(
            f"| {_md_cell(label)} | {len(members)} | {n} | "
            + " | ".join(cells)
            + f" | {reach} | {acc} | {per_step:.3f} | "
            + ("baseline" if label == first_label else _paired(base, seeds[label], losses[:, -1]))
            + " |"
        )
    header = [
        f"| config | runs | steps | loss at 1/4 | loss at 1/2 | final loss | steps to "
        f"{_md_cell(first_label)}'s final loss | final test acc (%) | s / step | final loss "
        f"- {_md_cell(first_label)}'s, paired by seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    note = (
        f"\nLoss: mean over runs of the training loss averaged over the last {window} steps, "
        "± 1.96 standard errors; test accuracy ± one standard error.\n"
    )
    return "\n".join(header + rows) + "\n" + note


def _paired(base: dict[Any, float], seeds: list[Any], finals: np.ndarray) -> str:
    """The mean of (final - the baseline run's of the same seed) ± 1.96 standard errors,
    and how many pairs; "no shared seed" when the groups have none in common."""
    diffs = [float(f) - base[s] for s, f in zip(seeds, finals, strict=True) if s in base]
    if not diffs:
        return "no shared seed"
    if len(diffs) == 1:
        return f"{diffs[0]:+.3f} (1 pair)"
    half = 1.96 * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
    return f"{float(np.mean(diffs)):+.3f} ± {half:.3f} ({len(diffs)} pairs)"


def _mean_se(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.2f}"
    se = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{mean:.2f} ± {se:.2f}"
