"""Data-parallel training (signgrad.distributed): sharding, the reductions, synchronised
batch norm, the rank-agreement check, and real ``torchrun`` runs on this machine (Gloo on
127.0.0.1) against a single process, across a kill and resume, and across two "machines".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from signgrad import checkpoint, data, distributed
from signgrad.errors import SigngradError

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- sharding


@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 9))
def test_shard_range_partitions_the_batch_in_order(lo: int, n: int, world: int) -> None:
    parts = [distributed.shard_range(lo, lo + n, r, world) for r in range(world)]
    assert parts[0][0] == lo and parts[-1][1] == lo + n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1
    # torch.tensor_split's rule, an independent statement of the same split
    expected = [len(c) for c in torch.tensor_split(torch.arange(n), world)]
    assert sizes == expected


def _loader(shard: tuple[int, int], train: bool = True, seed: int = 3) -> data.Loader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (50,), generator=g)
    return data.Loader(
        images, labels, batch_size=12, mean=[0.5] * 3, std=[0.25] * 3, train=train,
        augment=train, generator=torch.Generator().manual_seed(seed), drop_last=train,
        shard=shard,
    )  # fmt: skip


@pytest.mark.parametrize("train", [True, False])
def test_ranks_batches_together_are_the_single_process_batch(train: bool) -> None:
    whole = list(_loader((0, 1), train))
    parts = [
        list(_loader((r, 3) if not train else (r, 2), train)) for r in range(3 if not train else 2)
    ]
    assert all(len(p) == len(whole) for p in parts)
    for i, (x, y) in enumerate(whole):
        xs = torch.cat([p[i][0] for p in parts])
        ys = torch.cat([p[i][1] for p in parts])
        assert torch.equal(xs, x) and torch.equal(ys, y)


def test_a_global_batch_that_does_not_split_evenly_is_refused() -> None:
    with pytest.raises(SigngradError, match="does not split evenly over 5 ranks"):
        _loader((0, 5))
    with pytest.raises(SigngradError, match="0 <= rank < world"):
        _loader((2, 2))


def test_state_digest_sees_one_ulp_a_dtype_and_a_key() -> None:
    a = {"w": torch.ones(3), "step": 4, "h": [torch.zeros(2, dtype=torch.bool), None]}
    same = {"step": 4, "w": torch.ones(3), "h": [torch.zeros(2, dtype=torch.bool), None]}
    assert distributed.state_digest(a) == distributed.state_digest(same)
    ulp = {**a, "w": torch.nextafter(torch.ones(3), torch.full((3,), 2.0))}
    assert distributed.state_digest(ulp) != distributed.state_digest(a)
    assert distributed.state_digest({**a, "w": torch.ones(3, dtype=torch.float64)}) != (
        distributed.state_digest(a)
    )
    assert distributed.state_digest({**a, "v": 1}) != distributed.state_digest(a)


# --------------------------------------------------------------------------- two processes


def _two_ranks(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of a 2-process Gloo group: batch norm on its half of a batch, the
    reductions, and the agreement check on equal and unequal states."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = distributed.Context(rank, 2, rank)
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    bn = distributed.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), torch.device("cpu"))
    half = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_()
    y = bn(half)
    (y * torch.arange(100.0).view(1, 4, 5, 5)).sum().backward()
    g = [torch.full((3,), float(rank)), torch.full((2,), 2.0 * rank)]
    distributed.all_reduce_mean_(ctx, g)
    outcome = {}
    try:
        distributed.check_identical(ctx, distributed.state_digest({"w": torch.ones(2)}), "w")
        outcome["equal"] = "ok"
    except SigngradError as e:
        outcome["equal"] = str(e)
    try:
        distributed.check_identical(ctx, distributed.state_digest({"w": torch.ones(2) * rank}), "w")
        outcome["unequal"] = "ok"
    except SigngradError as e:
        outcome["unequal"] = str(e)
    torch.save(
        {
            "y": y.detach(), "grad_x": half.grad, "bn": bn.state_dict(),
            "grad_w": bn[0].weight.grad, "mean": g, "outcome": outcome,
        },
        Path(out) / f"rank{rank}.pt",
    )  # fmt: skip
    dist.destroy_process_group()


def test_sync_batchnorm_reductions_and_the_agreement_check_on_two_processes(tmp_path) -> None:
    mp.spawn(_two_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    # The same as one BatchNorm2d over the whole batch (forward, input and weight
    # gradients, running statistics).
    torch.manual_seed(0)
    x = (torch.randn(8, 4, 5, 5) * 3 + 1).requires_grad_()
    ref = nn.BatchNorm2d(4)
    y = ref(x)
    (y * torch.arange(100.0).view(1, 4, 5, 5)).sum().backward()
    torch.testing.assert_close(torch.cat([r[0]["y"], r[1]["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([r[0]["grad_x"], r[1]["grad_x"]]), x.grad)
    # Each rank's weight gradient is its half's share (DDP adds them up, over 2).
    torch.testing.assert_close(r[0]["grad_w"] + r[1]["grad_w"], ref.weight.grad, rtol=1e-5, atol=0)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        for rank in r:
            torch.testing.assert_close(rank["bn"][f"0.{key}"], ref.state_dict()[key])
    for rank in r:
        torch.testing.assert_close(rank["mean"][0], torch.full((3,), 0.5))
        torch.testing.assert_close(rank["mean"][1], torch.full((2,), 1.0))
        assert rank["outcome"]["equal"] == "ok"
        assert "ranks' w differ (ranks [1] against rank 0)" in rank["outcome"]["unequal"]


# --------------------------------------------------------------------------- torchrun


def _torchrun(args: list[str], nproc: int) -> list[str]:
    """``signgrad train ARGS`` on ``nproc`` ranks of one machine (1: a plain process)."""
    launcher = [*TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]  # fmt: skip
    if nproc == 1:
        launcher = [sys.executable]
    return [*launcher, "-m", "signgrad", "train", *args]


def _env(threads: int = 1) -> dict[str, str]:
    """The children's environment: one thread each, and the data root as an absolute
    path (they run in a temporary directory; CI gives a relative one)."""
    data_root = os.environ.get("SIGNGRAD_DATA", "")
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "SIGNGRAD_DATA": str(Path(data_root).resolve()) if data_root else "",
    }


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "diagnostics.jsonl").open()
            if '"loss"' in line]  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    out = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    for r in out:
        r.pop("time_s")
    return out


def _checkpoint_digest(run: Path) -> str:
    state = checkpoint.load(run)
    return distributed.state_digest(
        state["model"], state["optimizer"], state["estimator"], state["rng"]
    )


def _logged_digests(stderr: str) -> list[str]:
    return re.findall(r"ranks' states agree \(sha256 ([0-9a-f]{64})\)", stderr)


COMMON = ["--model", "convnet", "--data", "cifar10", "--quantizer", "dorefa", "--keep", "none",
          "--batch-size", "256", "--schedule", "constant", "--sync-bn", "--diagnostics",
          "--no-progress"]  # fmt: skip


#: The 2-rank runs several tests read: STE for one epoch, ``fsg`` for two.
EPOCHS = {None: 1, "fsg": 2}


def _args(estimator: str | None) -> list[str]:
    extra = ["--estimator", estimator] if estimator else []
    return [*COMMON, "--epochs", str(EPOCHS[estimator]), *extra]


@pytest.fixture(scope="module")
def two_ranks(cifar_root, tmp_path_factory):
    """``two_ranks(estimator) -> (run directory, stderr)`` of a 2-rank run, made once."""
    made: dict = {}

    def get(estimator: str | None) -> tuple[Path, str]:
        if estimator not in made:
            base = tmp_path_factory.mktemp("two-ranks")
            proc = _run(_torchrun([*_args(estimator), "--out", "run"], 2), base)
            made[estimator] = (base / "run", proc.stderr)
        return made[estimator]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [None, "fsg"])
def test_two_ranks_train_as_one_process_with_the_global_batch(
    cifar_root, tmp_path, two_ranks, estimator
) -> None:
    """2 ranks x 128 images against 1 process x 256 from the same seed: the per-step
    loss curves agree to float rounding (the ranks add their halves' gradients in
    another order), and every rank ends with the checkpoint's state, bit for bit."""
    one = _run(_torchrun([*_args(estimator), "--epochs", "1", "--out", "one"], 1), tmp_path)
    two, two_stderr = two_ranks(estimator)
    steps = 5170 // 256  # the constant learning rate: epoch 1 is the same in either run
    a, b = _losses(tmp_path / "one"), _losses(two)[:steps]
    assert len(a) == len(b) == steps
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    # Each rank's digest was checked against rank 0's before each checkpoint was written;
    # the digest rank 0 logged last is that of the checkpoint as it lies on disk.
    logged = _logged_digests(two_stderr)
    assert len(logged) == EPOCHS[estimator] and logged[-1] == _checkpoint_digest(two)
    assert not _logged_digests(one.stderr)  # a single process has nothing to compare
    ma, mb = _metrics(tmp_path / "one")[0], _metrics(two)[0]
    assert ma["train_acc"] == mb["train_acc"]
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5)


def _kill_mid_epoch(cmd: list[str], cwd: Path, run: Path, after_epochs: int) -> None:
    """Start ``cmd`` and kill its whole process group once ``after_epochs`` epochs are
    in ``run``'s metrics, in the middle of the next epoch."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    metrics = run / checkpoint.METRICS_NAME
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_epochs:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(1.0)  # into the next epoch
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.slow
def test_a_killed_two_rank_run_resumes_on_two_ranks_and_on_one(tmp_path, two_ranks) -> None:
    whole = two_ranks("fsg")[0]  # the uninterrupted run, 2 epochs
    _kill_mid_epoch(_torchrun([*_args("fsg"), "--out", "cut"], 2), tmp_path, tmp_path / "cut", 1)
    assert len(_metrics(tmp_path / "cut")) == 1 and checkpoint.load(tmp_path / "cut")["epoch"] == 1
    for ranks in (2, 1):
        run = tmp_path / f"resumed-{ranks}"
        shutil.copytree(tmp_path / "cut", run)
        _run(_torchrun(["--out", run.name, "--resume", "--no-progress"], ranks), tmp_path)
        expected, resumed = _metrics(whole), _metrics(run)
        assert len(resumed) == 2 and resumed[0] == expected[0]
        if ranks == 2:  # the same arithmetic: exactly the uninterrupted run
            assert resumed[1] == expected[1]
            assert _checkpoint_digest(run) == _checkpoint_digest(whole)
        else:  # one process adds the two halves' gradients in another order
            assert resumed[1]["train_loss"] == pytest.approx(expected[1]["train_loss"], rel=1e-4)
        assert _losses(run)[:20] == _losses(whole)[:20]


@pytest.mark.slow
def test_two_machines_with_a_c10d_rendezvous_on_localhost(tmp_path, two_ranks) -> None:
    """Two torchrun agents (``--nnodes 2``, one process each) meet at a c10d rendezvous on
    127.0.0.1, as two machines would; the run equals the one-machine 2-rank run."""
    args, single = _args(None), two_ranks(None)[0]
    port = free_port()
    node = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "signgrad-test",
            "-m", "signgrad", "train", *args, "--out", "nodes"]  # fmt: skip
    procs = [subprocess.Popen(node, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert _metrics(tmp_path / "nodes") == _metrics(single)
    assert _checkpoint_digest(tmp_path / "nodes") == _checkpoint_digest(single)


@pytest.mark.slow
def test_a_mistake_under_torchrun_is_one_line_on_every_rank_and_no_hang(
    cifar_root, tmp_path
) -> None:
    """A global batch that does not split over the ranks, and a run directory that rank 0
    alone inspects (here: it already holds a run): every rank stops with the same one
    line and exit status 2 instead of waiting for the other."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / checkpoint.CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    for args, message in (
        (["--batch-size", "255", "--out", "odd"], "does not split evenly over 2 ranks"),
        (["--out", "taken"], "already holds a run; continue it with --resume"),
    ):
        proc = subprocess.run(_torchrun([*args, "--model", "convnet"], 2), cwd=tmp_path,
                              env=_env(), capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("signgrad:")]
        assert len(errors) == 2 and all(
            line.count("signgrad: error:") == 1 and message in line for line in errors
        ), proc.stderr[-2000:]
        # torchrun prints its own summary; no frame of signgrad's code is in it
        assert not re.search(r'File ".*/signgrad/', proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "odd").exists()
    assert (tmp_path / "taken" / checkpoint.CHECKPOINT_NAME).read_bytes() == b"not a checkpoint"


_EXIT_PROBE = """
import atexit, sys
from signgrad import cli

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

keep = Finalized()  # a global: collected when the interpreter finalizes
atexit.register(lambda: print("atexit ran"))
print("buffered", end=" ")  # a pipe: block-buffered until flushed
sys.argv = ["signgrad", *sys.argv[1:]]
cli.entry()
"""


@pytest.mark.parametrize("world", ["2", "1", None])
@pytest.mark.parametrize("argv, code", [(["--version"], 0), (["no-such-command"], 2)])
def test_a_torchrun_rank_exits_without_finalizing_the_interpreter(world, argv, code) -> None:
    """Gloo's worker threads outlive the process group and may still release a tensor
    (which takes the GIL) while the main thread exits; in a finalizing interpreter that
    aborts a finished run. So a rank of a multi-rank run leaves without finalization,
    after the atexit handlers and with its output flushed; a single process exits as
    usual. Both keep ``main``'s exit status."""
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world is not None:
        env["WORLD_SIZE"] = world
    proc = subprocess.run([sys.executable, "-c", _EXIT_PROBE, *argv], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert "buffered" in proc.stdout and "atexit ran" in proc.stdout
    assert ("finalized" in proc.stdout) == (world != "2"), proc.stdout


@pytest.mark.slow
def test_a_streamed_image_folder_trains_on_two_ranks_as_on_one(pictures, tmp_path) -> None:
    """The streaming loader under torchrun: each rank decodes its part of every batch
    (one decoding worker each); the run is the single process's to float rounding."""
    args = ["--model", "convnet", "--data", f"imagefolder:{pictures}", "--data-mode", "stream",
            "--workers", "1", "--quantizer", "bnn", "--batch-size", "8", "--epochs", "2",
            "--sync-bn", "--diagnostics", "--no-progress"]  # fmt: skip
    _run(_torchrun([*args, "--out", "one"], 1), tmp_path)
    _run(_torchrun([*args, "--out", "two"], 2), tmp_path)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 2 * (24 // 8)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=0)
    ma, mb = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["test_acc"] for r in ma] == [r["test_acc"] for r in mb]
