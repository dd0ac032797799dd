"""Learned gradient estimators, built by name.

    est = signgrad.estimators.build("fsg", model, beta=0.5)

``names()`` lists the registered estimators and ``parameters(name)`` the settings each
accepts with their defaults; unknown names and settings are errors that list the valid
ones. The contract every estimator follows is in :mod:`signgrad.estimators.base`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from signgrad.errors import SigngradError
from signgrad.estimators.base import GradientHistory, LearnedEstimator, weight_count
from signgrad.estimators.fsg import FSG, PAPER
from signgrad.estimators.fsg import REFERENCE as FSG_REFERENCE
from signgrad.estimators.metaquant import LSTMFC, FCGrad, MultiFC
from signgrad.estimators.metaquant import REFERENCE as MQ_REFERENCE
from signgrad.registry import Registry

__all__ = [
    "ESTIMATORS",
    "FSG",
    "LSTMFC",
    "PAPER",
    "FCGrad",
    "GradientHistory",
    "LearnedEstimator",
    "MultiFC",
    "build",
    "names",
    "parameters",
    "check",
    "parse_params",
]

#: Every learned estimator by name; a preset is a class with other default settings.
ESTIMATORS: Registry[type[LearnedEstimator]] = Registry("estimator", inputs=("model",))
ESTIMATORS.register("fsg", FSG, summary="FSG: fast-net + Mamba slow-net over the gradient history")
ESTIMATORS.register(
    "fsg-paper",
    FSG,
    defaults=PAPER,
    summary="FSG as its paper describes it, with the sizes of the authors' code",
)
ESTIMATORS.register("metaquant-fc", FCGrad)
ESTIMATORS.register("metaquant-multifc", MultiFC)
ESTIMATORS.register("metaquant-lstm", LSTMFC)
# The authors' code, as closely as it can run here (docs/estimators.md: what departs).
ESTIMATORS.register(
    "fsg-ref", FSG, defaults=FSG_REFERENCE, summary="FSG as the authors' code computes it"
)
for _name, _cls in (("metaquant-fc", FCGrad), ("metaquant-multifc", MultiFC),
                    ("metaquant-lstm", LSTMFC)):  # fmt: skip
    ESTIMATORS.register(
        f"{_name}-ref", _cls, defaults=MQ_REFERENCE[_name],
        summary=f"{_cls.__doc__.splitlines()[0].split(':')[0]} as the authors' code computes it",
    )  # fmt: skip


def names() -> list[str]:
    """Names accepted by :func:`build`."""
    return ESTIMATORS.names()


def parameters(name: str) -> dict[str, Any]:
    """The settings estimator ``name`` accepts, with their defaults (preset applied)."""
    return ESTIMATORS.parameters(name)


def build(name: str, model: nn.Module, **params: Any) -> LearnedEstimator:
    """The estimator ``name`` for the binarized layers of ``model``."""
    return ESTIMATORS.build(name, model, **params)


def _convert(key: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SigngradError(f"estimator setting {key}={text}: expected true or false")
    if isinstance(default, int | float) or default is None:
        # None defaults are optional sizes (e.g. chunk_size): integers or "none".
        if default is None and text.lower() == "none":
            return None
        kind = float if isinstance(default, float) else int
        try:
            return kind(text)
        except ValueError:
            raise SigngradError(
                f"estimator setting {key}={text}: not a number ({kind.__name__} expected)"
            ) from None
    return text


def parse_params(items: list[str], name: str) -> dict[str, Any]:
    """``["beta=0.5", "slow=lstm"]`` -> typed settings of estimator ``name``."""
    accepted = parameters(name)
    params: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SigngradError(f"--estimator-param '{item}': expected KEY=VALUE")
        if key not in accepted:
            raise SigngradError(
                f"estimator '{name}' takes no parameter {key}; it takes: {', '.join(accepted)}"
            )
        params[key] = _convert(key, text.strip(), accepted[key])
    # Ranges too, so that a bad value fails before any data or model is read.
    ESTIMATORS.get(name).validate({**accepted, **params})
    return params


def check(name: str, model: nn.Module, params: dict[str, Any], device: Any = "cpu") -> None:
    """Refuse settings of estimator ``name`` that are out of range or whose memory for the
    binarized layers of ``model`` (which may be a stand-in built only to count them)
    cannot fit on ``device``, without building the estimator."""
    cls = ESTIMATORS.get(name)
    settings = {**parameters(name), **params}
    cls.validate(settings)
    cls.check_fits(weight_count(model), settings, device, name)
