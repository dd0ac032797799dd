"""Names to components: the one registry idiom behind everything signgrad builds by name.

Quantizers, learned estimators (and their presets), models, data sets, activations,
hyper-layer generators, optimizers, learning-rate and sharpness schedules, recipes,
weight scalings, keep policies and export formats each have one :class:`Registry`::

    ACTIVATIONS = Registry("activation")

    @ACTIVATIONS.register("relu")
    def relu(channels: int) -> nn.Module:
        "max(x, 0)."
        return nn.ReLU()

    ACTIVATIONS.names()            # ['relu']
    ACTIVATIONS.canonical("ReLU")  # 'relu'
    ACTIVATIONS.build("relu", 16)  # keyword parameters are checked against the builder

Spelling: a name matches without regard to case, and ``-`` and ``_`` are the same
character (``vgg_small`` is ``vgg-small``), in Python and on the command line alike;
what signgrad stores (``config.json``, checkpoints) is always the registered spelling.
An unknown name, or a keyword parameter its builder does not take, is a
:class:`~signgrad.errors.SigngradError` that lists the valid ones.

This module imports nothing heavy (no PyTorch), so the command line can use it while it
reads its flags.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from signgrad.errors import SigngradError

T = TypeVar("T")

#: What :meth:`Registry.parameters` gives for a parameter that has no default.
REQUIRED = inspect.Parameter.empty


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered name: the object, the defaults a preset puts over the object's own,
    the parameters not offered to users, and a one-line summary."""

    name: str
    obj: T
    defaults: Mapping[str, Any] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    summary: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)  # the builder's own, read once


class Registry(Generic[T]):
    """Names of one ``kind`` of component (``"quantizer"``, ``"model"``, ...).

    ``inputs`` names the leading positional arguments of every builder (an estimator's
    ``model``, an activation's ``channels``): they are what the component is built *for*,
    and :meth:`parameters` lists only the settings after them.
    """

    def __init__(self, kind: str, *, inputs: Sequence[str] = ()) -> None:
        self.kind = kind
        self.inputs = tuple(inputs)
        self._entries: dict[str, Entry[T]] = {}
        self._keys: dict[str, str] = {}  # spelling-free key -> registered name

    # -- registering ----------------------------------------------------------------

    def register(
        self,
        name: str,
        obj: T | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
        exclude: Sequence[str] = (),
        summary: str | None = None,
    ) -> Any:
        """Register ``obj`` as ``name``; without ``obj``, a decorator that does so.

        ``defaults`` (a preset) override the builder's own defaults; ``exclude`` hides
        builder parameters from users; ``summary`` defaults to the first line of the
        object's docstring."""
        if obj is None:

            def add(target: T) -> T:
                self.register(name, target, defaults=defaults, exclude=exclude, summary=summary)
                return target

            return add
        key = _key(name)
        if key in self._keys:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        if summary is None:
            doc = inspect.getdoc(obj) if callable(obj) else None
            summary = doc.strip().splitlines()[0] if doc else ""
        settings = self._settings(obj, exclude) if callable(obj) else {}
        entry = Entry(name, obj, dict(defaults or {}), tuple(exclude), summary, settings)
        self._check_keys(entry, settings, entry.defaults)  # a preset: only settings it takes
        self._entries[name] = entry
        self._keys[key] = name
        return obj

    # -- looking up -----------------------------------------------------------------

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _key(name) in self._keys

    def canonical(self, name: str, *, also: Sequence[str] = ()) -> str:
        """The registered spelling of ``name``; unknown names are an error listing the
        valid ones (and ``also``: forms the caller accepts besides, e.g. ``hyper-MODEL``)."""
        if isinstance(name, str) and _key(name) in self._keys:
            return self._keys[_key(name)]
        valid = ", ".join([*self._entries, *also])
        raise SigngradError(f"unknown {self.kind} {name!r}; valid: {valid}")

    def entry(self, name: str) -> Entry[T]:
        """The :class:`Entry` registered as ``name`` (any spelling)."""
        return self._entries[self.canonical(name)]

    def get(self, name: str) -> T:
        """The object registered as ``name`` (any spelling)."""
        return self.entry(name).obj

    __getitem__ = get

    # -- building -------------------------------------------------------------------

    def parameters(self, name: str) -> dict[str, Any]:
        """The keyword parameters the builder of ``name`` takes after its inputs, with their
        defaults (a preset's applied; :data:`REQUIRED` where there is none)."""
        entry = self.entry(name)
        return {**entry.settings, **entry.defaults}

    def build(self, name: str, *inputs: Any, **params: Any) -> Any:
        """Call the builder of ``name`` with ``inputs`` and ``params`` over its defaults;
        a parameter it does not take is an error that lists those it takes."""
        entry = self.entry(name)
        self._check_keys(entry, self.parameters(name), params)
        return entry.obj(*inputs, **{**entry.defaults, **params})  # type: ignore[operator]

    def _settings(self, obj: Any, exclude: Sequence[str]) -> dict[str, Any]:
        """The builder's own parameters after its inputs, with their defaults."""
        sig = inspect.signature(obj)  # a class: the parameters of its __init__
        named = [
            p
            for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)
        ]
        return {p.name: p.default for p in named[len(self.inputs) :] if p.name not in exclude}

    def _check_keys(
        self, entry: Entry[T], accepted: Mapping[str, Any], params: Mapping[str, Any]
    ) -> None:
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise SigngradError(
                f"{self.kind} '{entry.name}' takes no parameter {', '.join(unknown)}; "
                f"it takes: {', '.join(accepted) or 'nothing'}"
            )

    # -- describing -----------------------------------------------------------------

    def help(self, default: str | None = None, *, also: Sequence[str] = ()) -> str:
        """``"a, b, c (b)"``: the names (and ``also``) for a command line's help text, with
        the default in brackets."""
        text = ", ".join([*self._entries, *also])
        return f"{text} ({default})" if default is not None else text

    def summaries(self) -> list[tuple[str, str]]:
        """(name, one-line summary) of every entry, for listings."""
        return [(e.name, e.summary) for e in self._entries.values()]

    def cli_type(self) -> Callable[[str], str]:
        """An argparse ``type=`` that gives the registered spelling (see :func:`cli_type`)."""
        return cli_type(self.canonical, self.kind)


def cli_type(canonical: Callable[[str], str], kind: str) -> Callable[[str], str]:
    """An argparse ``type=`` from a ``canonical`` spelling function: its SigngradError
    becomes argparse's error for the flag, so a bad name fails while the command line is
    read, before anything is loaded."""

    def convert(text: str) -> str:
        try:
            return canonical(text)
        except SigngradError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = kind  # argparse names the type in some of its messages
    return convert
