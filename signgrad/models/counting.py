"""Multiply-accumulates of a model's forward pass, counted on a real forward pass."""

from dataclasses import dataclass

import torch
from torch import nn

from signgrad.models.transformers import Attention

__all__ = ["Macs", "macs"]


@dataclass
class Macs:
    """MACs for one input image, by where they happen."""

    layers: dict[str, int]  # each nn.Conv2d / nn.Linear (binary ones included), by name
    attention: int  # the attention's two matrix products (activations times activations)

    @property
    def total(self) -> int:
        return sum(self.layers.values()) + self.attention

    def of(self, names: set[str] | list[str]) -> int:
        """The MACs of the layers ``names``."""
        return sum(self.layers[n] for n in names)


def macs(model: nn.Module, input_shape: tuple[int, int, int]) -> Macs:
    """Count the MACs of ``model`` on one input of shape (C, H, W): a convolution does
    ``C_in / groups * k_h * k_w`` per output value, a linear layer ``in_features`` per
    output value, an attention ``2 * tokens**2 * width`` (scores and weighted values).
    Runs one forward pass in eval mode without gradients; the mode is restored."""
    layers: dict[str, int] = {}
    attention = 0

    def layer_hook(name: str):
        def hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if isinstance(m, nn.Conv2d):
                per = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            else:
                per = m.in_features
            layers[name] = layers.get(name, 0) + per * out[0].numel()

        return hook

    def attention_hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        nonlocal attention
        _, n, d = inputs[0].shape
        attention += 2 * n * n * d

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(layer_hook(name)))
        elif isinstance(m, Attention):
            handles.append(m.register_forward_hook(attention_hook))
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return Macs(layers, attention)
