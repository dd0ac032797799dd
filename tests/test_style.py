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
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_ruff
def test_ruff_check_clean():
    proc = ruff("check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_ruff
def test_ruff_format_clean():
    proc = ruff("format", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, package: Path) -> set[str]:
    """The signgrad modules ``path`` imports, at any depth (function-level ones too)."""
    import ast

    modules = {_module_name(p, package.parent) for p in package.rglob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from signgrad import train" imports the submodule signgrad.train; a name
            # that is not a submodule comes from the package (or module) itself.
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found.update(subs & modules if subs & modules else {node.module})
            if subs - modules:
                found.add(node.module)
    return {m for m in found if m in modules and m != "signgrad"}


def test_no_import_cycle_inside_the_package():
    package = ROOT / "signgrad"
    graph = {}
    for p in package.rglob("*.py"):
        name = _module_name(p, ROOT)
        # A submodule importing its own package (already initialising) is no cycle.
        graph[name] = {m for m in _imports(p, package) if not name.startswith(m + ".")} - {name}
    # A depth-first search; a module met again while still on the path closes a cycle.
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "signgrad.train" in graph and graph["signgrad.train"]  # the walk saw real edges
