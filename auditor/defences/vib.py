"""A variational information bottleneck at the cut (Alemi et al., ICLR 2017; Tuor et al. Section 5).

The sent tensor is a sample z = mu(x) + sigma * eps, eps ~ N(0, 1) drawn on the device for
every input: mu is the head's output at the cut and sigma a learned standard deviation per
element (a homoscedastic encoder: sigma does not depend on x, so the device only needs the
manifest's scales).  Fine-tuning minimises cross-entropy + strength * KL(q(z|x) || N(0, 1)),
the KL summed over the tensor's elements and averaged over the batch (nats per image): a bound
on I(X; Z) that the head cannot escape by scaling its features up, since the prior fixes the
scale; an element the task does not need goes to mu = 0, sigma = 1 and costs nothing.  The KL
weight is annealed in over the first steps, and sigma starts at a quarter of the clean
features' RMS, so fine-tuning starts from the trained model rather than from noise it cannot read.
"""
from __future__ import annotations

from auditor.defences.base import Defence, Strength
from auditor.defences.registry import register

#: the standard deviation of every element starts here (the prior's is 1), in units of the features' RMS
INITIAL_SIGMA = 0.25
#: the KL weight grows linearly from 0 to beta over this share of the steps (KL annealing, as for VAEs)
WARMUP = 0.3


@register
class VIB(Defence):
    name = "vib"
    title = "variational information bottleneck"
    reference = "Alemi, Fischer, Dillon & Murphy, Deep Variational Information Bottleneck (ICLR 2017)"
    strength = Strength(0.0, 1.0, "beta, the weight of KL(q(z|x) || N(0, 1)) in nats per image", example=1e-2)
    sweep = (1e-3, 3e-3, 1e-2, 3e-2)
    default = 1e-2
    trains = ("head", "tail", "defence")

    def layer(self, cut: str):
        from converter.defended import CutDefence, layer_name

        return CutDefence(self.name, self.value, op="noise", distribution="gaussian",
                          scale=INITIAL_SIGMA * self.ref.rms, learned=True, cut=cut, name=layer_name(cut))

    def penalty(self, batch):
        import keras

        ops = keras.ops
        mu = batch.clean
        log_sigma = batch.layer.log_scale     # one per element
        # KL(N(mu, sigma^2) || N(0, 1)) per element = (mu^2 + sigma^2 - 1) / 2 - log sigma
        kl = 0.5 * (mu * mu + ops.exp(2.0 * log_sigma) - 1.0) - log_sigma
        ramp = ops.minimum(1.0, batch.progress / WARMUP)
        return ramp * self.value * ops.mean(ops.sum(ops.reshape(kl, (ops.shape(kl)[0], -1)), axis=1))
