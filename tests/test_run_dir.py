"""Run directories: one writer at a time, leftovers of killed runs, the resume rules, write
errors (a real file size limit and a real full disk), and checkpoints that load but hold
the wrong things, for every command that reads one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from signgrad import checkpoint, cli, rundir

TINY = ["--model", "convnet", "--data", "cifar10", "--no-progress"]


def files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory with its bytes, to show that nothing changed."""
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def error_line(err: str) -> str:
    """The one error line of stderr captured in this process (logging's WARNINGs aside)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if not x.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("signgrad: error: "), err
    return lines[0]


def child_env() -> dict[str, str]:
    return {**os.environ, "SIGNGRAD_DATA": os.environ.get("SIGNGRAD_DATA", "")}


def start_training(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "signgrad.cli", "-q", "train", *TINY, "--out", str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 600) -> None:
    """Wait until ``path`` exists (the child's first epoch is written); not a timing check."""
    end = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the training child ended early: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"{path} did not appear")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_of_three(tmp_path_factory, tiny_run, run_cli) -> Path:
    """A ConvNet run of 3 epochs stopped after 2: the tiny run resumed for one more epoch
    (copy it before changing it)."""
    out = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(tiny_run, out)
    args = ["--resume", "--epochs", "3", "--stop-after", "2", "--no-progress", "--out", out]
    assert run_cli("train", *args) == 0
    return out


# -- one writer per run directory ---------------------------------------------------------


@pytest.mark.slow
def test_second_writer_fails_at_once_and_a_killed_runs_lock_is_reused(
    tmp_path, cifar_root, run_child, one_line_error
):
    run = tmp_path / "run"
    first = start_training(run, "--epochs", "30")
    try:
        wait_for(run / checkpoint.CHECKPOINT_NAME, first)
        # A fresh run and a resume on the same directory: both refused, naming the holder.
        for args in (["train", *TINY, "--epochs", "30"], ["train", "--resume", "--no-progress"]):
            proc = run_child("-q", *args, "--out", run, timeout=300)
            one_line_error(proc, "in use by another training run", str(run), f"pid {first.pid}")
        assert first.poll() is None  # the first run went on
    finally:
        first.send_signal(signal.SIGKILL)  # as a crash would: no clean-up of any kind
        first.communicate()
    # What the killed run wrote is whole: the checkpoint loads, metrics.jsonl is whole lines
    # of the epochs up to it (the kill may fall between the checkpoint and its line).
    done = checkpoint.load(run)["epoch"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))
    assert len(records) in (done - 1, done)
    lock_file = run / rundir.LOCK_NAME
    assert json.loads(lock_file.read_text())["pid"] == first.pid  # left by the crash
    # The kernel dropped the dead run's flock: resuming takes the leftover lock file over.
    stop = str(done + 1)
    proc = run_child(
        "-q", "train", "--resume", "--out", run, "--no-progress", "--stop-after", stop, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.load(run)["epoch"] == done + 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, done + 2))
    assert not lock_file.exists()  # a finished run removes its lock
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_two_fresh_runs_on_one_directory_one_wins(tmp_path, cifar_root):
    run = tmp_path / "run"
    procs = [start_training(run, "--epochs", "1") for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    # The loser either met the lock or (had it started after the winner ended) the run.
    assert "in use by another training run" in loser or "already holds a run" in loser, loser
    assert "Traceback" not in loser
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]  # no interleaving
    assert checkpoint.load(run)["epoch"] == 1


@pytest.mark.slow
def test_a_held_lock_refuses_a_writer_and_leaves_the_run_untouched(
    tmp_path, tiny_run, run_child, one_line_error
):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = files(run)
    with rundir.lock(run):  # this process is the writer now
        proc = run_child(
            "-q", "train", "--resume", "--out", run, "--epochs", "2", "--no-progress", timeout=300
        )
        one_line_error(proc, "in use", str(run), f"pid {os.getpid()}")
        with pytest.raises(Exception, match="in use"):
            rundir.lock(run)  # a second lock in the same process is refused as well
    after = files(run)
    assert after == before  # the lock file is gone again, nothing else changed
    # Readers need no lock: eval works while a writer holds the directory.
    with rundir.lock(run):
        proc = run_child("-q", "eval", run, "--device", "cpu", timeout=300)
        assert proc.returncode == 0, proc.stderr


def test_resume_of_a_new_run_before_its_first_checkpoint_says_it_is_in_use(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with rundir.lock(run):
        assert cli.main(["-q", "train", "--resume", "--out", str(run)]) == 2
    assert "in use by another training run" in error_line(capsys.readouterr().err)
    assert cli.main(["-q", "train", "--resume", "--out", str(run)]) == 2
    assert "no checkpoint" in error_line(capsys.readouterr().err)


# -- leftovers of killed runs -------------------------------------------------------------


def test_leftover_temporary_files_are_removed_when_a_run_is_opened(tmp_path, tiny_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ours = [
        ".checkpoint.pt.k2j4_x.tmp",
        ".config.json.abc.tmp",
        ".metrics.jsonl.q.tmp",
        ".curves.png.zz9.tmp",
    ]
    for name in ours:
        (run / name).write_bytes(b"half a file")
    other = run / ".model-packed.safetensors.abc.tmp"  # an export's, which takes no lock
    other.write_bytes(b"an export being written")
    kept = {n: b for n, b in files(run).items() if not n.endswith(".tmp")}
    assert cli.main(["-q", "train", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not any((run / n).exists() for n in ours)
    assert other.exists()
    assert {n: b for n, b in files(run).items() if not n.endswith(".tmp")} == kept


# -- resume rules --------------------------------------------------------------------------


def test_resume_with_fewer_epochs_than_done_is_refused_untouched(tmp_path, two_of_three, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_of_three, run)
    before = files(run)
    assert cli.main(["-q", "train", "--resume", "--out", str(run), "--epochs", "1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "--epochs 1 is below the 2 epochs" in line and str(run) in line
    assert files(run) == before
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("resume", [False, True])
def test_stop_after_below_one_is_refused(tmp_path, two_of_three, capsys, resume):
    run = tmp_path / "run"
    if resume:
        shutil.copytree(two_of_three, run)
        args = ["--resume", "--out", str(run)]
    else:
        args = [*TINY, "--out", str(run)]
    before = files(run) if resume else None
    assert cli.main(["-q", "train", *args, "--stop-after", "0"]) == 2
    assert "--stop-after must be at least 1, got 0" in error_line(capsys.readouterr().err)
    if resume:
        assert files(run) == before
    else:
        assert not run.exists()  # refused before the run directory is made


@pytest.mark.parametrize("stop_after", ["1", "2"])
def test_stop_after_at_or_below_done_says_nothing_was_trained(
    tmp_path, two_of_three, capsys, stop_after
):
    run = tmp_path / "run"
    shutil.copytree(two_of_three, run)
    before = files(run)
    code = cli.main(
        ["-q", "train", "--resume", "--out", str(run), "--stop-after", stop_after, "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("nothing trained") and "has done 2 of its 3 epochs" in out, out
    assert "finished" not in out
    assert files(run) == before


def test_resume_to_the_epochs_done_has_nothing_to_do_and_changes_nothing(
    tmp_path, two_of_three, capsys
):
    run = tmp_path / "run"
    shutil.copytree(two_of_three, run)
    before = files(run)
    assert cli.main(["-q", "train", "--resume", "--out", str(run), "--epochs", "2"]) == 0
    assert "has finished its 2 epochs" in capsys.readouterr().out
    assert files(run) == before  # config.json still says 3 epochs


# -- write errors ---------------------------------------------------------------------------

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from signgrad import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def assert_previous_checkpoint_survives(run: Path, before: dict[str, bytes], run_child) -> None:
    """After a failed epoch write: no temporary file, the old checkpoint byte for byte, and
    it resumes to the next epoch."""
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert (run / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    assert checkpoint.load(run)["epoch"] == 1
    proc = run_child("-q", "train", "--resume", "--out", run, "--epochs", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    state = checkpoint.load(run)
    assert state["epoch"] == 2 and [r["epoch"] for r in state["history"]] == [1, 2]


@pytest.mark.slow
def test_file_too_large_during_the_checkpoint_write(tmp_path, tiny_run, run_child, one_line_error):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = files(run)
    # Room for config.json and metrics.jsonl, not for a checkpoint (~320 kB).
    limit = len(before["checkpoint.pt"]) // 3
    train = ["-q", "train", "--resume", "--out", str(run), "--epochs", "2", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-c", LIMITED, str(limit), *train],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    one_line_error(
        proc,
        f"cannot write {run / 'checkpoint.pt'}: File too large",
        "the previous checkpoint is kept",
    )
    assert_previous_checkpoint_survives(run, before, run_child)


@pytest.mark.slow
def test_no_space_left_during_the_checkpoint_write(tmp_path, tiny_run, run_child, one_line_error):
    """A real full disk: a small tmpfs in a private mount namespace (skipped where mounting
    is not permitted)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {mnt}"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    before = files(tiny_run)
    room = sum(len(b) for b in before.values()) + len(before["checkpoint.pt"]) // 3
    back = tmp_path / "back"
    script = (
        f"mount -t tmpfs -o size={room} tmpfs {mnt} && cp -a {tiny_run} {mnt}/run && "
        f"{sys.executable} -m signgrad.cli -q train --resume --out {mnt}/run --epochs 2 "
        f"--no-progress; rc=$?; cp -a {mnt}/run {back}; exit $rc"
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=600,
    )
    one_line_error(
        proc,
        f"cannot write {mnt}/run/checkpoint.pt: No space left on device",
        "the previous checkpoint is kept",
    )
    assert_previous_checkpoint_survives(back, before, run_child)


def test_write_errors_of_other_kinds_stay_one_line(tmp_path):
    target = tmp_path / "config.json"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(checkpoint.SigngradError, match="cannot write .*config.json"):
        checkpoint.write_json(target, {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]

    def buggy(f):
        raise RuntimeError("a bug, not a write error")

    with pytest.raises(RuntimeError, match="a bug"):  # bugs keep their traceback
        checkpoint.atomic_write(tmp_path / "x", buggy)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


# -- checkpoints that load but hold the wrong things ---------------------------------------


def _set(key, value):
    def damage(s):
        s[key] = value

    return damage


def _drop(key):
    return lambda s: s.pop(key)


def _config(key, value):
    def damage(s):
        s["config"][key] = value

    return damage


def _first_model_key(s):
    return next(iter(s["model"]))


DAMAGE = {
    "not a dict": None,  # the whole file holds a list (below)
    "format missing": _drop("format"),
    "format wrong": _set("format", 99),
    "config missing": _drop("config"),
    "config not a dict": _set("config", ["convnet"]),
    "config field missing": lambda s: s["config"].pop("model"),
    "config unknown field": _config("colour", "red"),
    "config epochs not a number": _config("epochs", "x"),
    "config model a number": _config("model", 5),
    "config unknown quantizer": _config("quantizer", "sgn"),
    "epoch missing": _drop("epoch"),
    "epoch not an integer": _set("epoch", 0.5),
    "epoch negative": _set("epoch", -1),
    "epoch a bool": _set("epoch", True),
    "epoch beyond config epochs": _set("epoch", 7),
    "model not a dict": _set("model", "weights"),
    "model wrong shape": lambda s: s["model"].update({_first_model_key(s): torch.zeros(2, 2)}),
    "model missing key": lambda s: s["model"].pop(_first_model_key(s)),
    "model extra key": lambda s: s["model"].update({"extra.weight": torch.zeros(3)}),
    "model non-tensor": lambda s: s["model"].update({_first_model_key(s): [0.5, 1.5]}),
    "optimizer missing": _drop("optimizer"),
    "optimizer wrong structure": _set("optimizer", {"state": [], "param_groups": {}}),
    "optimizer group count": lambda s: s["optimizer"]["param_groups"].pop(),
    "optimizer moment shape": lambda s: s["optimizer"]["state"][0].update(
        {"exp_avg": torch.zeros(5)}
    ),
    "optimizer setting kind": lambda s: s["optimizer"]["param_groups"][0].update({"betas": "x"}),
    "rng missing": _drop("rng"),
    "rng wrong dtype": lambda s: s["rng"].update({"data": s["rng"]["data"].float()}),
    "rng wrong size": lambda s: s["rng"].update({"torch": s["rng"]["torch"][:100]}),
    "history not a list": _set("history", "1 epoch"),
    "history record broken": lambda s: s["history"][0].pop("test_acc"),
    "estimator state missing": _config("estimator", "fsg"),
}

RESUME = ["train", "--resume", "--epochs", "2", "--no-progress", "--out"]
INIT = ["train", *TINY, "--quantizer", "none", "--epochs", "1", "--init"]
COMMANDS = {
    "eval": lambda run, tmp: ["eval", run, "--device", "cpu"],
    "export": lambda run, tmp: ["export", run],
    "summary": lambda run, tmp: ["summary", run],
    "resume": lambda run, tmp: [*RESUME, run],
    "init": lambda run, tmp: [*INIT, run, "--out", tmp / "fresh"],
}


def damaged_copy(tiny_run: Path, tmp_path: Path, kind: str) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    if DAMAGE[kind] is None:
        state = [state]
    else:
        DAMAGE[kind](state)
    torch.save(state, run / "checkpoint.pt")
    return run


def test_the_undamaged_checkpoint_works_in_every_command(tmp_path, tiny_run, capsys):
    """The control of the matrix below: the same commands on the intact run succeed."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for name in ("eval", "summary", "resume"):  # resume: trains epoch 2 of 2
        args = [str(a) for a in COMMANDS[name](run, tmp_path)]
        assert cli.main(["-q", *args]) == 0, (name, capsys.readouterr().err)
    assert checkpoint.load(run)["epoch"] == 2


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint(tmp_path, tiny_run, capsys, kind, command):
    run = damaged_copy(tiny_run, tmp_path, kind)
    before = files(run)
    args = [str(a) for a in COMMANDS[command](run, tmp_path)]
    code = cli.main(["-q", *args])
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    line = error_line(captured.err)
    assert str(run) in line, line  # it names the checkpoint (or its run directory)
    assert files(run) == before


@pytest.mark.parametrize(
    "kind,command",
    [
        ("model wrong shape", "eval"),
        ("optimizer group count", "resume"),
        ("epoch a bool", "export"),
        ("config not a dict", "init"),
    ],
)
@pytest.mark.slow
def test_damaged_checkpoint_in_a_child_process(
    tmp_path, tiny_run, run_child, one_line_error, kind, command
):
    run = damaged_copy(tiny_run, tmp_path, kind)
    before = files(run)
    proc = run_child("-q", *COMMANDS[command](run, tmp_path), timeout=300)
    one_line_error(proc, str(run))
    assert files(run) == before


class Payload:
    """Pickles as a call that would create a directory: proof of code run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("command", ["eval", "resume", "init"])
def test_a_malicious_pickle_is_refused_without_running_it(tmp_path, tiny_run, capsys, command):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "payload-ran"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["history"] = [Payload(marker)]
    torch.save(state, run / "checkpoint.pt")
    assert not marker.exists()
    before = files(run)
    args = [str(a) for a in COMMANDS[command](run, tmp_path)]
    assert cli.main(["-q", *args]) == 2
    line = error_line(capsys.readouterr().err)
    assert "holds objects other than tensors and plain values" in line
    assert "refused without running them" in line and str(run) in line
    assert not marker.exists()
    assert files(run) == before
