"""timm where torchvision cannot load: the one import shim the bench and scripts/real_models.py
use (never gradtap's server or client), and what it does and does not do.

timm 1.0 imports torchvision when it is imported (`timm.layers` takes
`torchvision.ops.misc.FrozenBatchNorm2d`; `timm.data` takes transforms, datasets and
`InterpolationMode`), though none of its models computes with torchvision code. torchvision
0.28, the release for torch 2.13, cannot load beside the CPU build of torch
(`operator torchvision::nms does not exist`). `import_timm()` imports timm with stand-ins
for those names, and only while timm imports:

- every `torchvision.*` module timm imports is a stand-in, and every name in it a stand-in
  class: timm may look at it, subclass it, put it in a dict or test `isinstance` against
  it (always False: there are no instances);
- calling a stand-in, or instantiating a stand-in or a subclass of one, raises
  `StandInUsed`, naming it. No model layer that computes is a stand-in, so a timm model whose
  construction or forward would use torchvision code fails loudly instead of computing
  something else (freezing batch norms, timm's transforms and datasets, and its FX feature
  extraction all raise);
- after timm has imported, the stand-ins are removed from `sys.modules` and the finder from
  `sys.meta_path`: nothing else (transformers checks for torchvision) can find them, and a
  later `import torchvision` fails as it would without the shim.

Where torchvision imports, timm is imported as it is, with no stand-in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, NoReturn


class StandInUsed(RuntimeError):
    """Code used a torchvision name that only a stand-in holds here."""


class _StandIn(type):
    """The type of every stand-in class: attributes are stand-ins, calls raise."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(f"{cls.__qualname__}.{name}", (), {"__module__": cls.__module__})

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise StandInUsed(
            f"{cls.__module__}.{cls.__qualname__} is, or is built on, a stand-in for "
            "torchvision (bench/timm_shim.py): "
            f"torchvision cannot load here ({_why or 'not tried'}), so timm's uses of "
            "torchvision code cannot run"
        )


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _StandIn(name, (), {"__module__": self.__name__})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `torchvision` and its submodules as stand-in modules."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


_why = ""
"""Why torchvision did not import, once tried."""


def torchvision_error() -> str:
    """Why torchvision cannot be imported here ("" when it can)."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # noqa: BLE001 - absent, or present but broken against this torch
        _forget_torchvision()
        return f"{type(e).__name__}: {e}"
    return ""


def import_timm() -> Any:
    """timm, imported; with stand-ins for torchvision where torchvision cannot load (see the
    module's docstring). Raises what timm's own import raises."""
    global _why
    if "timm" in sys.modules:
        return sys.modules["timm"]
    _why = torchvision_error()
    if not _why:
        import timm

        return timm
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        import timm
    finally:
        sys.meta_path.remove(finder)
        _forget_torchvision()
    return timm


def _forget_torchvision() -> None:
    for key in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
        del sys.modules[key]
