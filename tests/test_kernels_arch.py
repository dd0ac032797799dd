"""The runtime's kernel variants against each other, bit for bit, without Python in the
way: ``tests/kernels_harness.c`` runs every variant a CPU has (generic, AVX2, AVX-512 on
x86-64; generic and NEON on aarch64) on the same seeded convolutions and prints a hash of
every output byte. It is compiled here and, with Debian's cross compiler, for aarch64 and
run under qemu user-mode emulation: the NEON kernels must give the x86 bytes."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "kernels_harness.c"
FLAGS = [
    "-O3",
    "-std=c11",
    "-Wall",
    "-Werror",
    "-pthread",
    "-I",
    str(ROOT / "signgrad" / "runtime"),
]


def _build(compiler: str, out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [compiler, *FLAGS, *extra, str(HARNESS), "-o", str(out), "-lm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _build_and_run(compiler: str, out: Path, run: list[str], static: bool) -> dict:
    build = _build(compiler, out, ["-static"] if static else [])
    assert build.returncode == 0, build.stderr[-3000:]
    proc = subprocess.run([*run, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _parse(proc.stdout)


def _parse(stdout: str) -> dict:
    lines = stdout.split("\n")
    assert lines[0].startswith("selected ")
    hashes: dict[int, set] = {}
    variants: dict[int, set] = {}
    for line in filter(None, lines[1:]):
        _, case, digest, variant = line.split()
        hashes.setdefault(int(case), set()).add(digest)
        variants.setdefault(int(case), set()).add(variant)
    return {"selected": lines[0].split()[1], "hashes": hashes, "variants": variants}


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> dict:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) on this machine")
    out = tmp_path_factory.mktemp("harness") / "host"
    return _build_and_run("cc", out, [], static=False)


def test_every_kernel_variant_of_this_cpu_gives_the_same_bytes(host) -> None:
    assert len(host["hashes"]) == 64
    for case, digests in host["hashes"].items():
        assert len(digests) == 1, (case, host["variants"][case], digests)
    assert "generic" in host["variants"][0]


@pytest.mark.slow  # an instrumented -O3 build: about 16-20 s
def test_the_kernels_under_address_and_undefined_behaviour_sanitizers(host, tmp_path) -> None:
    # Out-of-bounds accesses and undefined behaviour abort the run with a report; and a
    # build whose optimiser read the code otherwise would give other bytes (it has: GCC 12
    # mis-combined shifted AVX-512 masks under these flags until the code was changed).
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                "-fno-omit-frame-pointer"]  # fmt: skip
    build = _build("cc", tmp_path / "sanitized", sanitize)
    if build.returncode != 0 and "asan" in build.stderr.lower():
        pytest.skip("the C compiler has no AddressSanitizer runtime here (Debian: libasan)")
    assert build.returncode == 0, build.stderr[-3000:]
    proc = subprocess.run(
        [str(tmp_path / "sanitized")], capture_output=True, text=True, timeout=300,
        env={"ASAN_OPTIONS": "detect_leaks=0", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert _parse(proc.stdout)["hashes"] == host["hashes"]


def test_neon_kernels_give_the_x86_bytes_under_qemu(host, tmp_path) -> None:
    missing = [tool for tool in ("aarch64-linux-gnu-gcc", "qemu-aarch64") if not shutil.which(tool)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed (Debian: apt-get install "
            "gcc-aarch64-linux-gnu qemu-user); .ci/run installs them"
        )
    arm = _build_and_run("aarch64-linux-gnu-gcc", tmp_path / "arm", ["qemu-aarch64"], static=True)
    assert arm["selected"] == "neon"
    assert all(v == {"generic", "neon"} for v in arm["variants"].values())
    assert arm["hashes"] == host["hashes"]


def test_the_extension_itself_compiles_for_aarch64_with_its_neon_variant(tmp_path) -> None:
    """What ``pip install`` compiles on an ARM machine: ``_kernels.c`` with the Python
    glue, here cross-compiled to an object (this Python's headers: both are LP64) that
    holds the module's entry point and the NEON convolutions."""
    tools = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-nm")
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: gcc-aarch64-linux-gnu)")
    obj = tmp_path / "kernels.o"
    include = sysconfig.get_paths()["include"]
    source = ROOT / "signgrad" / "runtime" / "_kernels.c"
    cmd = ["aarch64-linux-gnu-gcc", *FLAGS, "-fPIC", "-I", include, "-c", str(source)]
    build = subprocess.run([*cmd, "-o", str(obj)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    symbols = subprocess.run(["aarch64-linux-gnu-nm", str(obj)], capture_output=True,
                             text=True, timeout=60).stdout  # fmt: skip
    assert " T PyInit__kernels" in symbols
    assert " bconv_rows_neon" in symbols and " fconv_rows_neon" in symbols
