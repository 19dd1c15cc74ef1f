"""Make a :class:`~auditor.attacks.base.DeployedHead` from a bundle (what is really sent) or a Keras model."""
from __future__ import annotations

import logging

import numpy as np

from auditor.attacks.base import DeployedHead

log = logging.getLogger(__name__)


def from_bundle(bundle, model, *, depth: float = 0.0, head_runtime=None, tail_runtime=None,
                name: str = "unhardened", defence: dict | None = None) -> DeployedHead:
    """The head of ``bundle`` as deployed: LiteRT head -> wire frame -> dequantized (``auditor.features``).

    ``model`` is the Keras model the bundle was cut from: it gives the white-box head, the tail the
    cloud runs and the architecture.  ``head_runtime`` / ``tail_runtime`` may be a ready
    ``runtime.split.Head`` / ``Tail`` of the bundle.
    """
    import keras

    from auditor import features
    from converter.split import split_model
    from runtime.split import Head, Tail

    cut = bundle.manifest.cut
    split = split_model(model, cut)
    head_rt = head_runtime or Head(bundle)
    tail_rt = tail_runtime or Tail(bundle)
    pre = bundle.manifest.input.preprocess

    def send(x):
        return features.sent_features(bundle, x, head=head_rt).values

    def tail(sent):
        # float features (dequantized, or made by an attack): the tail's own interpreter, as after dequantizing
        return np.asarray(tail_rt.model.run(np.asarray(sent, np.float32)))

    return DeployedHead(cut=cut, input_shape=tuple(int(d) for d in split.head.input_shape[1:]),
                        feature_shape=tuple(int(d) for d in bundle.feature.shape), send=send,
                        keras_head=split.head, keras_tail=split.tail,
                        architecture=lambda: keras.models.clone_model(split.head), tail=tail,
                        defence=defence, pixel_mean=pre.mean, pixel_std=pre.std, name=name, depth=depth)


def from_model(model, cut: str, *, depth: float = 0.0, name: str = "float") -> DeployedHead:
    """A float head straight from Keras (no int8, no wire): for experiments and unit tests."""
    import keras

    from converter.split import split_model

    split = split_model(model, cut)

    def send(x):
        return np.asarray(split.head.predict(np.asarray(x, np.float32), batch_size=256, verbose=0), np.float32)

    def tail(sent):
        return np.asarray(split.tail.predict(np.asarray(sent, np.float32), batch_size=256, verbose=0))

    return DeployedHead(cut=cut, input_shape=tuple(int(d) for d in split.head.input_shape[1:]),
                        feature_shape=tuple(split.feature_shape), send=send, keras_head=split.head,
                        keras_tail=split.tail, architecture=lambda: keras.models.clone_model(split.head),
                        tail=tail, pixel_mean=0.0, pixel_std=255.0, name=name, depth=depth)
