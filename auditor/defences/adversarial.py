"""Adversarial training against a decoder trained alongside (after Li et al., DeepObfuscator, 2019).

A decoder (``auditor.invert.build_decoder``, the query attacker's architecture) learns to
reconstruct the images from the sent features, one step per batch; the head and tail learn
the task and to defeat it: the loss adds ``strength * max(0, m0 - MSE(decoder(f), x))``, with
m0 the mean squared error of the label-only guess (each training image against its class's
mean image).  The cap matters: pushed beyond what the label alone gives, the head would make
the decoder's error large by *anti*-correlating (still invertible by a fresh decoder), not by
forgetting.  Nothing runs on the device: the head's weights are the defence.
"""
from __future__ import annotations

from auditor.defences.base import Defence, Strength
from auditor.defences.registry import register

DECODER_LR = 1e-3


@register
class Adversarial(Defence):
    name = "adversarial"
    title = "adversarial training against a decoder"
    reference = "Li et al., DeepObfuscator (2019); adversarial learning against an inverse network"
    strength = Strength(0.0, 100.0, "the weight of the decoder's error (capped at the label-only error) "
                                    "in the loss", example=1.0)
    sweep = (0.3, 1.0, 3.0, 10.0)
    default = 1.0
    trains = ("head", "tail")

    def __init__(self, value, *, reference, **options):
        super().__init__(value, reference=reference, **options)
        import keras

        from auditor.invert import build_decoder

        self.decoder = build_decoder(reference.feature_shape, reference.input_shape, name="adversary")
        self.decoder_opt = keras.optimizers.Adam(DECODER_LR)
        self._step = None

    def prepare(self, clean_features) -> None:
        self.decoder.get_layer("feature_norm").adapt(clean_features)

    def _mse(self, x, sent):
        import keras

        rec = self.decoder(sent, training=True)
        return keras.ops.mean(keras.ops.square(rec - x))

    def before_step(self, batch_x, sent) -> None:
        import tensorflow as tf

        if self._step is None:
            @tf.function(reduce_retracing=True)
            def step(x, s):
                with tf.GradientTape() as tape:
                    loss = self._mse(x, s)
                variables = self.decoder.trainable_variables
                self.decoder_opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
                return loss

            self._step = step
        self._step(batch_x, tf.stop_gradient(sent))

    def penalty(self, batch):
        import keras

        target = float(self.ref.label_mse)
        return self.value * keras.ops.relu(target - self._mse(batch.x, batch.sent))
