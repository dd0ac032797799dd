"""Keep the records of finished runs small enough for a repository, so that the figures
of the docs can be recomputed from them with ``signgrad compare`` and ``signgrad
diagnose`` without the checkpoints.

For every run directory given, writes ``OUT/<name>/``:

- ``config.json`` and ``metrics.jsonl`` as they are;
- ``diagnostics.jsonl`` (when the run has one) with every step's loss and fallback count
  as recorded, and each per-layer series replaced by its mean over the layers that have a
  value, as one pseudo-layer named ``mean of N layers``: exactly what ``compare`` and
  ``diagnose`` compute from the full file (they average over layers first), in about a
  twentieth of the size for ResNet-20.

    python benchmarks/archive_runs.py runs/protocol/*-s? --out docs/protocol-runs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from signgrad import checkpoint, diagnostics


def archive(run: Path, out: Path) -> Path:
    target = out / run.name
    target.mkdir(parents=True, exist_ok=True)
    for name in (checkpoint.CONFIG_NAME, checkpoint.METRICS_NAME):
        shutil.copyfile(run / name, target / name)
    source = run / diagnostics.DIAGNOSTICS_NAME
    if source.is_file():
        layers, records = diagnostics.read(source)
        lines = [json.dumps({"layers": [f"mean of {len(layers)} layers"]})]
        for r in records:
            reduced = dict(r)
            for key in diagnostics.SERIES:
                m = diagnostics.layer_means([r], key)[0]
                reduced[key] = [None if math.isnan(m) else m]
            lines.append(json.dumps(reduced))
        (target / diagnostics.DIAGNOSTICS_NAME).write_text("\n".join(lines) + "\n")
    return target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    for run in args.runs:
        if not (run / checkpoint.CONFIG_NAME).is_file():
            print(f"{run}: not a run directory, left out")
            continue
        done = checkpoint.load(run)["epoch"]
        cfg = json.loads((run / checkpoint.CONFIG_NAME).read_text())
        if done < cfg["epochs"]:
            print(f"{run}: {done} of {cfg['epochs']} epochs, left out")
            continue
        print(f"{run} -> {archive(run, args.out)}")


if __name__ == "__main__":
    main()
