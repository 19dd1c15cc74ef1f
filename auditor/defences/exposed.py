"""A hardened bundle as an attacker faces it: attacks-19's ``DeployedHead`` with the defence inside.

``send`` is the deployed head (``runtime.split.Head``: the clean ``head.tflite``, then the
manifest's defence drawn afresh for every input, then the wire); ``keras_head`` is the Keras head
with the defence layer active; ``clean_head`` the same head without it; ``keras_tail`` the part
after the defence; ``architecture`` an untrained copy of the defended head.  Every attack that
takes this object is adaptive by construction.
"""
from __future__ import annotations

import dataclasses
import os

from protocol.errors import BundleError


def deployed_head(bundle, model, *, depth: float = 0.0, head_runtime=None, tail_runtime=None, name: str | None = None):
    """The head of ``bundle`` (a Bundle or its path) as deployed, with ``model`` (keras.Model or .keras path)
    for what the stronger attackers know.  BundleError when the model and the manifest disagree about the
    defence (see ``converter.defended.check_matches``)."""
    import keras

    from auditor.attacks import heads
    from converter import defended, zoo
    from protocol.manifest import load_bundle

    if isinstance(bundle, (str, os.PathLike)):
        bundle = load_bundle(bundle)
    if isinstance(model, (str, os.PathLike)):
        model = zoo.load_model(model)
    defended.check_matches(bundle.manifest, model)
    spec = bundle.manifest.defence
    base = heads.from_bundle(bundle, model, depth=depth, head_runtime=head_runtime, tail_runtime=tail_runtime,
                             name=name or (f"{spec.method} {spec.strength:g}" if spec else "unhardened"),
                             defence=_declaration(spec))
    if spec is None:
        return base
    clean_head, layer, defended_head, tail = defended.defended_split(model, bundle.manifest.cut)
    if tuple(defended_head.output_shape[1:]) != tuple(bundle.feature.shape):
        raise BundleError(f"the Keras model's defended head outputs {list(defended_head.output_shape[1:])} but the "
                          f"bundle sends {list(bundle.feature.shape)}",
                          fix="give the .keras the bundle was converted from")
    return dataclasses.replace(base, keras_head=defended_head, clean_head=clean_head, keras_tail=tail,
                               architecture=lambda: keras.models.clone_model(defended_head))


def _declaration(spec) -> dict | None:
    """The manifest's defence as the attacks read it (dropout entries are scaled by 1 / (1 - rate))."""
    if spec is None:
        return None
    d = spec.to_dict()
    d["scaled"] = spec.op == "dropout"
    return d
