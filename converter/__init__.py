"""The converter role (workstation): datasets, reference models, cut analysis, split, quantize, bundles.

Public names are imported lazily, so ``import converter.datasets`` stays
TensorFlow-free and fast; ``converter.load_model`` etc. pull Keras in on first use.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "Mnist": "converter.datasets",
    "load_mnist": "converter.datasets",
    "synthetic_images": "converter.datasets",
    "cache_dir": "converter.datasets",
    "ZOO": "converter.zoo",
    "ZooEntry": "converter.zoo",
    "TrainResult": "converter.zoo",
    "train": "converter.zoo",
    "load_model": "converter.zoo",
    "Cut": "converter.cuts",
    "list_cuts": "converter.cuts",
    "find_cut": "converter.cuts",
    "format_table": "converter.cuts",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'converter' has no attribute {name!r}")
