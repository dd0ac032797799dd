import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["signgrad", "tests", "benchmarks", "setup.py"]

needs_ruff = pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="no ruff")


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *PATHS],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@needs_ruff
def test_ruff_check_clean():
    proc = ruff("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_ruff
def test_ruff_format_clean():
    proc = ruff("format", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
