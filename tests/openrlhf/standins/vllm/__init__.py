"""Test stand-in for the `vllm` import (see ../README.md): every attribute and every submodule is
a MagicMock. vLLM is never called on the CPU paths the tests exercise."""
import importlib.abc
import importlib.machinery
import sys
import types
from unittest.mock import MagicMock

__version__ = "0.29.0"


class _StandinModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("vllm."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StandinModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    value = MagicMock(name=f"vllm.{name}")
    globals()[name] = value
    return value
