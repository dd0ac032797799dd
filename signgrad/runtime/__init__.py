"""Inference of packed binary networks (``signgrad export --format packed``) on the CPU.

Needs numpy and safetensors only: not PyTorch, not the training code. See
``docs/export.md``::

    from signgrad.runtime import load

    model = load("model-packed.safetensors")
    probs = model.predict(images)  # uint8 N x C x H x W -> class probabilities
"""

from signgrad.runtime.model import BACKENDS, PackedModel, build, load

__all__ = ["BACKENDS", "PackedModel", "build", "load"]
