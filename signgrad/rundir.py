"""The run directory's rules: one writer at a time, how a run starts and resumes in it.

:func:`prepare` creates (or, on resume, finds) the directory and takes its lock before
the checkpoint is looked at; :func:`resume_config` reads the saved configuration that a
resumed run continues (what may change: :func:`signgrad.config.resumed_config`).

The lock is ``fcntl.flock`` on ``RUN/.lock``, a file that also names its holder (pid and
host) for the error message of a second writer. The kernel drops a ``flock`` when its
holder dies, even by ``kill -9``, so a lock file left by a crashed run is simply taken
over: there is no stale-lock guessing by pid. Readers (eval, export, summary) never lock.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from signgrad import checkpoint
from signgrad.config import Config, resumed_config
from signgrad.errors import SigngradError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("signgrad.rundir")

LOCK_NAME = ".lock"

#: The files ``train`` writes through :func:`checkpoint.atomic_write`; their temporary
#: files (``.NAME.XXXX.tmp``) are left behind only by a killed run.
WRITTEN = (
    checkpoint.CHECKPOINT_NAME,
    checkpoint.CONFIG_NAME,
    checkpoint.METRICS_NAME,
    "curves.png",
)


class RunLock:
    """The exclusive lock of one run directory; a context manager that releases it."""

    def __init__(self, run_dir: Path, fd: int | None) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        # Unlink while still holding the lock: a process that opened the old file and
        # then gets the lock sees that it is no longer the file at .lock and retries.
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # the lock itself still goes away with the close below
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(path: Path) -> str:
    """Who holds the lock, as the lock file says (best effort: it may be mid-write)."""
    try:
        info = json.loads(path.read_text())
        return f"pid {int(info['pid'])} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def in_use(run_dir: Path, holder: str) -> SigngradError:
    return SigngradError(
        f"{run_dir} is in use by another training run ({holder}); wait for it to end or "
        "choose another --out"
    )


def check_not_busy(run_dir: Path) -> None:
    """Raise the error of :func:`lock` if a run holds ``run_dir`` now, without taking its
    lock: for a message better than "no checkpoint" before a new run's first epoch."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody writes here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise in_use(Path(run_dir), _holder(path)) from None
    finally:
        os.close(fd)


def lock(run_dir: Path) -> RunLock:
    """Take the run directory's lock or fail at once naming its holder.

    ``run_dir`` must exist. On a file system without ``flock`` support the run goes on
    unlocked, with a warning.
    """
    path = run_dir / LOCK_NAME
    if fcntl is None:  # pragma: no cover
        log.warning("no file locking on this platform: nothing stops a second writer")
        return RunLock(run_dir, None)
    for _ in range(100):  # retried only when the file was replaced under us
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SigngradError(f"cannot create the lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise in_use(run_dir, _holder(path)) from None
            log.warning("cannot lock %s (%s): nothing stops a second writer", path, e.strerror)
            return RunLock(run_dir, None)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed it as we locked it: lock the new one
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # only the message of a second writer needs it
        return RunLock(run_dir, fd)
    raise SigngradError(f"cannot take the lock {path}: it keeps being replaced")


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left (call it holding the lock, since a
    live writer's temporary file has the same name pattern); returns what was removed."""
    removed = []
    for name in WRITTEN:
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise SigngradError(f"cannot remove the leftover {tmp}: {e.strerror}") from None
            removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", len(removed))
    return removed


def prepare(cfg: Config, resume: bool) -> tuple[Path, RunLock]:
    """The run directory, created if new, and its lock, taken before the checkpoint is
    looked at so that of two runs started on one directory exactly one goes on."""
    if cfg.out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cfg.out = str(Path("runs") / f"{cfg.model}-{cfg.data}-{cfg.quantizer}-s{cfg.seed}-{stamp}")
    run_dir = Path(cfg.out)
    ckpt = run_dir / checkpoint.CHECKPOINT_NAME
    if resume and not ckpt.is_file():  # before creating anything; checked again below
        check_not_busy(run_dir)
        raise SigngradError(f"--resume: no checkpoint in {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SigngradError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise SigngradError(f"run directory {run_dir} is not writable")
    run_lock = lock(run_dir)
    try:
        if resume and not ckpt.is_file():
            raise SigngradError(f"--resume: no checkpoint in {run_dir}")
        if not resume and ckpt.exists():
            raise SigngradError(
                f"{run_dir} already holds a run; continue it with --resume or choose another --out"
            )
        remove_leftovers(run_dir)
    except BaseException:
        run_lock.release()
        raise
    return run_dir, run_lock


def resume_config(run_dir: str | os.PathLike, overrides: dict[str, Any]) -> Config:
    """The configuration of the run in ``run_dir`` with ``overrides`` applied; only the
    number of epochs, the device and the data root may change on resume (the rules:
    :func:`signgrad.config.resumed_config`)."""
    try:
        state = checkpoint.load(run_dir)
    except SigngradError:
        check_not_busy(Path(run_dir))  # a new run before its first checkpoint
        raise
    return resumed_config(run_dir, state["config"], state["epoch"], overrides)
