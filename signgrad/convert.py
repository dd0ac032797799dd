"""The conversion of an existing network into a binary one: :func:`binarize`.

It swaps ``nn.Conv2d`` / ``nn.Linear`` layers for the binary layers of
:mod:`signgrad.layers` or the hyper layers of :mod:`signgrad.hyper`; it sits above both
(the layers do not know about their conversion), so the package has no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from signgrad import quantizers
from signgrad.errors import SigngradError
from signgrad.hyper import HyperConv2d, HyperLinear
from signgrad.layers import (
    BINARY_LAYERS,
    SCALINGS,
    BinaryConv2d,
    BinaryLinear,
    QuantizerSpec,
    make_input_quantizer,
    make_weight_quantizer,
)
from signgrad.registry import Registry

HYPER_PARAMS = ("z_dim", "generator", "hidden")

#: Which layers :func:`binarize` keeps full precision, by name: functions of the names of
#: the convertible layers (in module registration order) giving the names kept.
KEEP_POLICIES: Registry[Callable[[list[str]], set[str]]] = Registry("keep policy")


@KEEP_POLICIES.register("first_last")
def _first_last(names: list[str]) -> set[str]:
    """The stem and the classifier (the usual protocol for 1W1A networks)."""
    return {names[0], names[-1]}


@KEEP_POLICIES.register("first_last_shortcuts")
def _first_last_shortcuts(names: list[str]) -> set[str]:
    """The stem, the classifier and every 1x1 projection shortcut (Bi-Real Net's and
    ReActNet's papers)."""
    shortcuts = {n for n in names if n.startswith("shortcut.") or ".shortcut." in n}
    return {names[0], names[-1], *shortcuts}


@KEEP_POLICIES.register("first")
def _first(names: list[str]) -> set[str]:
    """The stem only."""
    return {names[0]}


@KEEP_POLICIES.register("last")
def _last(names: list[str]) -> set[str]:
    """The classifier only."""
    return {names[-1]}


@KEEP_POLICIES.register("none")
def _none(names: list[str]) -> set[str]:
    """No layer: every one binary (the MetaQuant/FSG protocol)."""
    return set()


def _hyper_copy(layer: nn.Module, hyper_params: dict[str, Any], **binary: Any) -> nn.Module:
    """A hyper layer in place of ``layer``, generating its weights when it can (carry)."""
    w = layer.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise SigngradError(f"hyper layers support zero padding given as numbers: {layer}")
        new: nn.Module = HyperConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            **hyper_params,
            **binary,
            **factory,
        )
    else:
        new = HyperLinear(
            layer.in_features,
            layer.out_features,
            layer.bias is not None,
            **hyper_params,
            **binary,
            **factory,
        )
    new.carry(w.detach())
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def _binary_copy(layer: nn.Module, **binary: Any) -> nn.Module:
    """A binary layer with the hyper-parameters and the (shared) parameters of ``layer``."""
    w = layer.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Conv2d):
        new: nn.Module = BinaryConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
            **binary,
            **factory,
        )
    else:
        new = BinaryLinear(
            layer.in_features, layer.out_features, layer.bias is not None, **binary, **factory
        )
    # The trained (or pretrained) values carry over as the latent weights.
    new.weight = layer.weight
    if layer.bias is not None:
        new.bias = layer.bias
    new.train(layer.training)
    return new


def binarize(
    model: nn.Module,
    weight_quantizer: QuantizerSpec = "bnn",
    input_quantizer: QuantizerSpec = None,
    *,
    scaling: str = "none",
    keep: str = "first_last",
    weight_params: dict[str, Any] | None = None,
    input_params: dict[str, Any] | None = None,
    hyper: bool = False,
    hyper_params: dict[str, Any] | None = None,
) -> nn.Module:
    """Replace the ``nn.Conv2d`` and ``nn.Linear`` layers of ``model`` (in place) by
    binary ones and return it.

    ``hyper=True`` makes them Hyper-BinaryNet layers (:mod:`signgrad.hyper`), built with
    ``hyper_params`` (``z_dim``, ``generator``, ``hidden``); their generated weights start
    equal to the old weights when the generator can be the identity (``linear`` with
    ``z_dim`` = kernel size, the default for 3 x 3 kernels), else from a fresh embedding.

    ``keep`` says which layers stay full precision: ``"first_last"`` (the usual protocol
    for 1W1A networks: the stem sees raw pixels, the classifier produces logits),
    ``"first"``, ``"last"``, or ``"none"`` (the MetaQuant/FSG protocol binarizes every
    layer). First and last are taken in module registration order. Each binary layer gets
    its own quantizer objects. Parameters are shared with the old layers, so a
    full-precision network's values become the latent weights.
    """
    kept_of = KEEP_POLICIES.get(keep)
    scaling = SCALINGS.canonical(scaling)
    if isinstance(weight_quantizer, quantizers.Quantizer) or isinstance(
        input_quantizer, quantizers.Quantizer
    ):
        raise SigngradError("binarize takes quantizer names (one object per layer is built)")
    unknown = sorted(set(hyper_params or {}) - set(HYPER_PARAMS))
    if unknown:
        raise SigngradError(f"unknown hyper_params {unknown}; valid: {', '.join(HYPER_PARAMS)}")
    # Build one quantizer now so a bad name fails before the model is touched.
    make_weight_quantizer(weight_quantizer, weight_params)
    make_input_quantizer(input_quantizer, input_params)

    names = [
        n
        for n, m in model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) and not isinstance(m, BINARY_LAYERS)
    ]
    if not names:
        raise SigngradError("binarize found no nn.Conv2d or nn.Linear layer in the model")
    kept = kept_of(names)
    for name in names:
        if name in kept:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        binary = {
            "weight_quantizer": weight_quantizer,
            "input_quantizer": input_quantizer,
            "scaling": scaling,
            "weight_params": weight_params,
            "input_params": input_params,
        }
        old = getattr(parent, child)
        new = (
            _hyper_copy(old, hyper_params or {}, **binary) if hyper else _binary_copy(old, **binary)
        )
        setattr(parent, child, new)
    return model
