"""The converter role (workstation): datasets, reference models, cut analysis, split, quantize, bundles.

Public names are imported on first use, so ``import converter.datasets`` stays
TensorFlow-free and fast; ``converter.load_model`` etc. pull Keras in when called for.
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    "Mnist": "converter.datasets",
    "load_mnist": "converter.datasets",
    "synthetic_images": "converter.datasets",
    "cache_dir": "converter.datasets",
    "load_data": "converter.userdata",       # the user's --data images (folders, labels.csv, .npz)
    "ImageData": "converter.userdata",
    "DataError": "converter.userdata",
    "ZOO": "converter.zoo",
    "ZooEntry": "converter.zoo",
    "TrainResult": "converter.zoo",
    "train": "converter.zoo",
    "load_model": "converter.zoo",
    "Cut": "converter.cuts",
    "list_cuts": "converter.cuts",
    "find_cut": "converter.cuts",
    "format_table": "converter.cuts",
})
