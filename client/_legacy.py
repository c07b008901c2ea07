"""Deprecated spellings, kept working for one release with a DeprecationWarning.

Every old form of the 0.1 API lives here and nowhere else: the keywords and positions the
calls took before docs/concepts.md settled the vocabulary, metadata keys that moved, and
attribute()'s old bare-array return. Removing this module (and its few uses) removes them.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

P = ParamSpec("P")
R = TypeVar("R")
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


class GradtapDeprecationWarning(DeprecationWarning):
    """A spelling of gradtap's API that goes away in the next release; the test suite makes
    it an error, so that gradtap's own code and tests use the current words only."""


_SKIPPED = (str(Path(__file__).resolve().parent), str(Path(np.__file__).resolve().parent))
"""The client's own frames, and numpy's (np.allclose(result, ...) reaches __array__ there)."""


def warn(message: str) -> None:
    """A DeprecationWarning pointing at the caller's line: the first frame outside the
    client (and numpy)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: warn()'s caller
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    warnings.warn(message, GradtapDeprecationWarning, stacklevel=level)


def rename(kwargs: dict[str, Any], old: str, new: str, call: str) -> None:
    """Moves keyword `old` to `new`, with a warning; both at once is a TypeError."""
    if old not in kwargs:
        return
    if new in kwargs:
        raise TypeError(f"{call}() got both {old}= and {new}=; {old}= is the deprecated name")
    warn(f"{call}(): {old}= is deprecated; use {new}= (docs/concepts.md)")
    kwargs[new] = kwargs.pop(old)


def accepts(adapt: Callable[[Arguments], Arguments]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Lets a call builder take deprecated forms: `adapt` rewrites them (with a warning) before
    the builder binds its arguments. help() and mypy see the builder's own signature."""

    def decorate(builder: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(builder)
        def adapted(*args: P.args, **kwargs: P.kwargs) -> R:
            new_args, new_kwargs = adapt((args, dict(kwargs)))
            return builder(*new_args, **new_kwargs)

        adapted.__signature__ = inspect.signature(builder)  # type: ignore[attr-defined]
        return adapted

    return decorate


def renamed(call: str, **renames: str) -> Callable[[Arguments], Arguments]:
    """An adapter for keywords that were renamed: old=new."""

    def adapt(arguments: Arguments) -> Arguments:
        args, kwargs = arguments
        for old, new in renames.items():
            rename(kwargs, old, new, call)
        return args, kwargs

    return adapt


def attribute_arguments(arguments: Arguments) -> Arguments:
    """attribute(model, inputs, method, target, layer, method=RULE): the class index and the
    node were positional or named target= and layer=, and method= was the integration rule."""
    args, kwargs = arguments
    if len(args) > 5:
        raise TypeError(f"attribute() takes 3 positional arguments but {len(args)} were given")
    if len(args) > 3:
        for name, old, value in zip(("index", "node"), ("target", "layer"), args[3:]):
            if name in kwargs or old in kwargs:
                raise TypeError(f"attribute() got multiple values for argument {name!r}")
            kwargs[name] = value
        warn(
            "attribute(): the class index and the node by position are deprecated; "
            "use index= and node="
        )
        args = args[:3]
    rename(kwargs, "target", "index", "attribute")
    rename(kwargs, "layer", "node", "attribute")
    if len(args) == 3 and "method" in kwargs:
        # The attribution method came by position, so method= is Captum's integration rule.
        rename(kwargs, "method", "integration_method", "attribute")
    return args, kwargs


def perturb_arguments(arguments: Arguments) -> Arguments:
    """perturb(model, inputs, objective=..., ...): method defaulted to "fgsm"."""
    args, kwargs = arguments
    if len(args) < 3 and "method" not in kwargs and "objective" in kwargs:
        warn("perturb(): the method is required; pass method='fgsm' (it was the default)")
        kwargs["method"] = "fgsm"
    return args, kwargs


def mse_arguments(arguments: Arguments) -> Arguments:
    """Objective.mse(target, node=None, output=0): the array was target= and the node came
    second. A string passed by position (or None) where the output now stands, or an int
    where the node does, is the old order; an output named by keyword (output="logits") is
    the new one."""
    args, kwargs = arguments
    rename(kwargs, "target", "expected", "Objective.mse")
    bound = dict(zip(("cls", "expected", "output", "node", "reduction"), args))
    for name in kwargs.keys() & bound.keys():
        raise TypeError(f"Objective.mse() got multiple values for argument {name!r}")
    bound.update(kwargs)
    output, node = bound.get("output", 0), bound.get("node")
    number = isinstance(node, int) and not isinstance(node, bool)
    positional = isinstance(output, str) and len(args) >= 3
    if positional or number or (output is None and "output" in bound):
        warn(
            "Objective.mse(expected, node, output) is deprecated: the order is now "
            "mse(expected, output=0, node=None), as in every Objective; name node="
        )
        bound["output"], bound["node"] = (0 if node is None else node), output
    return (bound.pop("cls"),), bound


class Metadata(dict[str, Any]):
    """A result's metadata; keys that moved still answer at their old place, with a warning.

    `MOVED` maps an old key to its path now, e.g. "total_ms" -> ("timings", "total_ms").
    """

    MOVED: dict[str, tuple[str, ...]] = {}

    def __missing__(self, key: str) -> Any:
        path = self.MOVED.get(key)
        if path is None:
            raise KeyError(key)
        warn(f'metadata["{key}"] is deprecated; use metadata{"".join(f"[{p!r}]" for p in path)}')
        value: Any = self
        for part in path:
            value = value[part]
        return value

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.keys() or key not in self.MOVED:
            return super().get(key, default)
        return self[key]

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or (key in self.MOVED and self[key] is not None)


class PerturbMetadata(Metadata):
    """PerturbResult.metadata: total_ms moved under timings, as in Result.metadata."""

    MOVED = {"total_ms": ("timings", "total_ms")}


_ARRAY_ATTRIBUTES = frozenset(name for name in dir(np.ndarray) if not name.startswith("_"))
_AS_ARRAY = (
    "attribute() returns an AttributionResult now; take the array from its .attribution "
    "(using the result as an array is deprecated)"
)


class ArrayResult(NDArrayOperatorsMixin):
    """Lets an AttributionResult stand in for the bare array attribute() used to return:
    np.asarray, indexing, arithmetic and the array's attributes work, with a warning."""

    attribution: np.ndarray

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        warn(_AS_ARRAY)
        array = self.attribution if dtype is None else self.attribution.astype(dtype)
        return array.copy() if copy else array

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        warn(_AS_ARRAY)
        inputs = tuple(x.attribution if isinstance(x, ArrayResult) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(
                x.attribution if isinstance(x, ArrayResult) else x for x in kwargs["out"]
            )
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name not in _ARRAY_ATTRIBUTES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warn(_AS_ARRAY)
        return getattr(self.attribution, name)

    def __getitem__(self, key: Any) -> Any:
        warn(_AS_ARRAY)
        return self.attribution[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        warn(_AS_ARRAY)
        self.attribution[key] = value

    def __len__(self) -> int:
        warn(_AS_ARRAY)
        return len(self.attribution)

    def __iter__(self) -> Iterator[Any]:
        warn(_AS_ARRAY)
        return iter(self.attribution)
