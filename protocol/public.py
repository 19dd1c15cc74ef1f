"""The one way a role's ``__init__.py`` lists its public names: each imported on first use (PEP 562).

    from protocol.public import public_names

    __all__, __getattr__, __dir__ = public_names(__name__, {
        "Model": "runtime.interpreter",    # a name, and the module that defines it
        "topics": "protocol.topics",       # a module of the package, by its own name
    })

So ``import role`` imports nothing more, ``from role import Name`` imports only Name's module
(the device never loads TensorFlow, the cloud runs a tail without Pillow), and ``dir(role)`` and
``role.__all__`` say what is public.  Everything else is private to its module.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def public_names(package: str, names: dict[str, str]) -> tuple[list[str], Callable, Callable]:
    """``(__all__, __getattr__, __dir__)`` for ``package`` whose public ``names`` map to their modules."""

    def __getattr__(name: str):
        module_name = names.get(name)
        if module_name is None:
            # AttributeError (not ImportError) lets `from package import submodule` fall back to the submodule
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(module_name)
        value = module if module_name == f"{package}.{name}" else getattr(module, name)
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(names))

    return sorted(names), __getattr__, __dir__
