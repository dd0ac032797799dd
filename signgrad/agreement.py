"""How an export's logits compare with PyTorch's on the same inputs.

Every export format (:mod:`signgrad.export`, :mod:`signgrad.onnx_export`) is checked the
same way: run the engine and the PyTorch model on the check inputs a chunk at a time (so
memory stays bounded for thousands of images), then report the largest logit difference
and the share of inputs whose predicted class agrees.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

#: the engines and PyTorch run this many inputs at a time
CHUNK = 64


def in_chunks(run: Callable[[torch.Tensor], np.ndarray], x: torch.Tensor) -> np.ndarray:
    """``run`` over ``x`` split into :data:`CHUNK` inputs, outputs concatenated (an empty
    ``x`` is run once, so the output keeps its shape)."""
    chunks = x.split(CHUNK) if len(x) else [x]
    return np.concatenate([run(c) for c in chunks])


def torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``model``'s float32 outputs for ``x`` in eval mode without autograd, leaving the
    caller's model in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return in_chunks(lambda c: model(c).detach().to("cpu", torch.float32).numpy(), x)
    finally:
        model.train(was_training)


def compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(largest |got - ref|, share of rows whose argmax agrees); (0, 1) for no rows."""
    if ref.size == 0:
        return 0.0, 1.0
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    agree = got.reshape(len(got), -1).argmax(1) == ref.reshape(len(ref), -1).argmax(1)
    return diff, float(np.mean(agree))
