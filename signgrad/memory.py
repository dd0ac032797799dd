"""How much memory is left, and refusing work that cannot fit in it before it starts.

Size estimates elsewhere (learned estimators, the model and batch of a training run) are
lower bounds of what a step holds at once; when even that exceeds what the device has
free, the run could only be killed by the kernel (or the CUDA allocator) part-way, so it
is refused up front with both numbers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from signgrad.errors import SigngradError

GiB = 2**30


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts in kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux, or a kernel without MemAvailable: free pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What a cgroup v2 memory limit still allows this process, if one is set."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available(device: Any = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` (a name or ``torch.device``): for
    the CPU MemAvailable of /proc/meminfo (else free pages from ``os.sysconf``), lowered to
    a cgroup v2 limit where one applies; for CUDA the device's free memory; None when
    unknown (other devices), in which case nothing is refused."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cpu":
        found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
        return min(found) if found else None
    if kind == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    return None


def local_ranks() -> int:
    """The training processes sharing this machine's memory: torchrun's
    LOCAL_WORLD_SIZE, 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_fits(needed: int, what: str, device: Any = "cpu") -> None:
    """Raise SigngradError when ``needed`` bytes exceed what ``device`` has available;
    ``what`` says what needs them ("estimator 'fsg' with d_inner=100000"). On the CPU,
    the data-parallel ranks of one machine (torchrun) share what it has."""
    free = available(device)
    kind = getattr(device, "type", str(device).split(":")[0])
    ranks = local_ranks() if kind == "cpu" else 1
    if free is None or needed * ranks <= free:
        return
    where = "this machine has" if kind == "cpu" else f"{device} has"
    each = f" for {ranks} ranks needing as much each" if ranks > 1 else ""
    raise SigngradError(
        f"{what} would need {needed / GiB:.1f} GiB; {where} {free / GiB:.1f} GiB available{each}"
    )
