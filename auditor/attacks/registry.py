"""The attack registry: name -> :class:`~auditor.attacks.base.Attack` class (re-exported by ``auditor.attacks``)."""
from __future__ import annotations

from auditor.attacks.base import Attack

#: name -> Attack class, in the order the report shows them
REGISTRY: dict[str, type[Attack]] = {}
#: the four attacks (not the baselines), strongest knowledge first
ATTACKS = ("whitebox", "decoder", "architecture", "queryfree")
#: the label-only baselines
BASELINES = ("label_mean", "label_decoder")


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: put an attack in :data:`REGISTRY` under its ``name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two attacks are called {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str, **settings) -> Attack:
    """A configured attack by registry name (ValueError naming the known ones)."""
    _load()
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name](**settings)


def threat_models() -> dict:
    """name -> the threat model of every registered attack and baseline (as dicts)."""
    _load()
    return {name: cls.threat_model.to_dict() for name, cls in REGISTRY.items()}


def _load() -> None:
    # Importing the modules registers their classes; they import TensorFlow only when run.
    import importlib

    for module in ("whitebox", "decoder", "architecture", "queryfree", "label"):  # the report's order
        importlib.import_module(f"auditor.attacks.{module}")
