"""The defences by name: one registry that the command, the sweep and the report read."""
from __future__ import annotations

import difflib

from protocol.defence import METHODS
from protocol.errors import UsageError

#: name -> Defence class, in the order of ``protocol.defence.METHODS``
REGISTRY: dict = {}


def register(cls):
    """Class decorator: put a defence in :data:`REGISTRY` under its ``name``."""
    if cls.name not in METHODS:
        raise ValueError(f"defence {cls.name!r} is not one of protocol.defence.METHODS")
    REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    # Importing the modules registers their classes (by name: each module imports this one).
    import importlib

    for name in METHODS:
        importlib.import_module(f"auditor.defences.{name}")


def get(name: str):
    """The Defence class called ``name``; UsageError naming the known ones (and a close match)."""
    _load()
    if name not in REGISTRY:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown defence method {name!r}{hint}",
                         fix=f"use --method with one of: {', '.join(METHODS)}")
    return REGISTRY[name]


def methods() -> dict:
    """name -> Defence class, every method."""
    _load()
    return {name: REGISTRY[name] for name in METHODS if name in REGISTRY}
