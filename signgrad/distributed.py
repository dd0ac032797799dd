"""Data-parallel training across processes and machines (``torchrun``), and what it shares.

``torchrun --nproc_per_node N -m signgrad train ...`` starts N copies of the trainer; each
reads its rank from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
joins one process group (NCCL on CUDA, Gloo on the CPU) and trains its shard of every
batch. What this module holds:

- :class:`Context`: this process's place in the run (``Context()`` is the single-process
  run; every collective below is then a no-op);
- :func:`shard_range`: which part of a global batch a rank takes;
- the reductions: :func:`all_reduce_mean_` (gradients, in place) and :func:`all_reduce_sum`
  (metrics);
- :class:`GlooSyncBatchNorm` and :func:`convert_sync_batchnorm`: batch statistics over the
  whole global batch, on CUDA through PyTorch's ``SyncBatchNorm``, on the CPU (which
  PyTorch's does not serve) through a differentiable all-reduce;
- :func:`state_digest` and :func:`check_identical`: the proof, once per epoch, that every
  rank holds the same model, optimizer and estimator state;
- :func:`exit_process`: how a rank's process ends (without finalizing the interpreter).

``--batch-size`` is the global batch: each of W ranks trains B / W images per step, so
the learning rate and the number of steps per epoch do not depend on W, and a run may
resume on another number of ranks.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from signgrad.errors import SigngradError

__all__ = [
    "Context",
    "GlooSyncBatchNorm",
    "all_reduce_mean_",
    "all_reduce_sum",
    "broadcast_buffers",
    "broadcast_outcome",
    "check_shard",
    "check_identical",
    "convert_sync_batchnorm",
    "exit_process",
    "from_environment",
    "shard_range",
    "state_digest",
]

#: How long a rank waits for the others at a collective before giving up.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Context:
    """This process's place in a data-parallel run; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes metrics, curves, diagnostics and checkpoints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """``device`` for this rank: CUDA device ``LOCAL_RANK`` unless one was named."""
        if device.type == "cuda" and device.index is None and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SigngradError(f"the environment's {name}={value!r} is not an integer") from None


def from_environment() -> Context:
    """The context torchrun's environment describes (a single process without one)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise SigngradError(f"inconsistent RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Context(rank, world, local)


def setup(ctx: Context, device: torch.device) -> bool:
    """Join the process group of ``ctx`` (NCCL for CUDA, Gloo otherwise) unless one is
    already up; True if this call created it (and its caller should tear it down)."""
    if not ctx.enabled or dist.is_initialized():
        return False
    if not dist.is_available():
        raise SigngradError("this PyTorch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(ctx.device(device))
    dist.init_process_group(backend, timeout=TIMEOUT)
    if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
        raise SigngradError("the process group disagrees with RANK / WORLD_SIZE")
    return True


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a rank's process with exit status ``code``: run the ``atexit`` handlers, flush
    stdout and stderr, and exit without finalizing the interpreter.

    Why: Gloo's worker threads outlive :func:`teardown` (a DistributedDataParallel model
    keeps its process group alive), and one may still be releasing the tensors of the last
    collective when the main thread returns. Releasing a tensor that Python has seen takes
    the GIL; in a finalizing interpreter that aborts the process, so a finished run could
    end with SIGABRT and torchrun would report it failed. A process has nothing left for
    finalization to do once its files are closed, as signgrad's are by then; a script of
    your own that trains under torchrun can end with this call too.
    """
    atexit._run_exitfuncs()  # logging's flush, and whatever a library registered
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shard_range(lo: int, hi: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s part [a, b) of the items [lo, hi): contiguous chunks, the first
    (hi - lo) % world of them one longer (``torch.tensor_split``'s rule)."""
    n = hi - lo
    size, extra = divmod(n, world)
    a = lo + rank * size + min(rank, extra)
    return a, a + size + (rank < extra)


def check_shard(shard: tuple[int, int], batch_size: int, train: bool) -> None:
    """A loader's ``shard=(rank, world)``: a valid rank; in training, a global batch that
    the ranks split evenly (so every rank's loss is the mean over as many images)."""
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise SigngradError(f"shard needs 0 <= rank < world, got {shard}")
    if train and batch_size % world:
        raise SigngradError(
            f"the batch size {batch_size} (the global batch) does not split evenly over "
            f"{world} ranks; give a multiple of {world}"
        )


def all_reduce_mean_(ctx: Context, tensors: Iterable[Tensor]) -> None:
    """Replace every tensor by its mean over the ranks, in place, in one collective."""
    tensors = list(tensors)
    if not ctx.enabled or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat.div_(ctx.world_size)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_sum(ctx: Context, values: Tensor) -> Tensor:
    """``values`` summed over the ranks (a new tensor; ``values`` itself without ranks)."""
    if not ctx.enabled:
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out


def broadcast_buffers(ctx: Context, model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch norm's running statistics), as
    DistributedDataParallel does before each forward pass: after an epoch's last step
    each rank's own shard has moved its copy, and evaluation and the checkpoint need one."""
    if not ctx.enabled:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_outcome(ctx: Context, value: Any = None, error: str | None = None) -> Any:
    """Rank 0's result of a step only it performs: its ``value`` on every rank, or its
    ``error`` raised as the same one-line SigngradError on every rank, so that no rank
    waits for one that failed. Other ranks' arguments are ignored."""
    if ctx.enabled:
        box = [(value, error)]
        dist.broadcast_object_list(box, src=0)
        value, error = box[0]
    if error is not None:
        raise SigngradError(error)
    return value


def _tensors(obj: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """The leaves of a nested state (dicts in key order, lists in order) with their paths."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def state_digest(*states: Any) -> str:
    """A SHA-256 of nested states (state_dicts, lists, numbers, tensors), exact to the bit:
    equal digests mean equal values, dtypes and shapes."""
    h = hashlib.sha256()
    for state in states:
        for path, leaf in _tensors(state):
            h.update(path.encode())
            if isinstance(leaf, Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()


def check_identical(ctx: Context, digest: str, what: str) -> None:
    """Raise on every rank unless all ranks computed the same ``digest`` of ``what``."""
    if not ctx.enabled:
        return
    digests: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise SigngradError(
            f"the ranks' {what} differ (ranks {differ} against rank 0); the run stops "
            "rather than train diverged copies"
        )


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the incoming gradient: the
    gradient of a sum over ranks reaches every rank's input."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """Batch norm whose training statistics are those of the global batch, for process
    groups on the CPU (PyTorch's ``SyncBatchNorm`` takes GPU tensors only).

    The per-channel sums of x and x^2 and the count are summed over the ranks with a
    differentiable all-reduce; the output, the gradients and the running statistics (with
    the unbiased variance of the global batch, as ``nn.BatchNorm2d``) are then those of
    one process holding the whole batch, up to the order of float additions. Outside a
    process group, or in eval mode, it is ``nn.BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input, got {x.dim()}-D")
        c = x.shape[1]
        xf = x.float()
        local = torch.cat(
            [
                xf.sum(dim=(0, 2, 3)),
                (xf * xf).sum(dim=(0, 2, 3)),
                torch.full((1,), x.numel() // c, dtype=torch.float32, device=x.device),
            ]
        )
        total = _SumAcrossRanks.apply(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var.detach() * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every ``BatchNorm2d`` of ``model`` made to use global-batch statistics: PyTorch's
    ``SyncBatchNorm`` on CUDA, :class:`GlooSyncBatchNorm` elsewhere. Parameters and
    buffers are kept (same names: checkpoints load either way)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_bn(model)


def _replace_bn(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(module.buffers(), torch.empty(0)).device)
    for name, child in module.named_children():
        setattr(module, name, _replace_bn(child))
    return module


def wrap(model: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when ``ctx`` has several ranks, else itself.
    Buffers (batch norm's running statistics) are broadcast from rank 0 at every forward
    pass, so every rank holds rank 0's."""
    if not ctx.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
