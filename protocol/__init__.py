"""The contract every role shares: wire frames, topic names, signing, errors, the bundle manifest, the device profile.

Public names are listed here (:mod:`protocol.public`: each loads its module on first use, as in
every role); everything else is private to its module.  So ``import protocol.errors`` needs
neither numpy nor msgspec: a device that lacks them still reaches ``edgesplit doctor``, which
then says what is missing.
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    # errors (protocol.errors), and the closed list of reasons a frame is refused for
    "errors": "protocol.errors",
    "EdgesplitError": "protocol.errors", "UsageError": "protocol.errors", "BundleError": "protocol.errors",
    "ConfigError": "protocol.errors", "CheckFailed": "protocol.errors", "FrameError": "protocol.errors",
    "TopicError": "protocol.errors", "Reason": "protocol.errors",
    # wire frames (protocol.frame)
    "Frame": "protocol.frame", "FrameLimits": "protocol.frame", "encode_frame": "protocol.frame",
    "decode_frame": "protocol.frame", "header_size": "protocol.frame",
    # signing (protocol.signing)
    "ReplayWindow": "protocol.signing", "generate_key": "protocol.signing", "load_key": "protocol.signing",
    "load_keys": "protocol.signing", "write_key": "protocol.signing",
    # topic names (protocol.topics)
    "topics": "protocol.topics",
    # bundles (protocol.manifest) and quantization arithmetic (protocol.tensors)
    "manifest": "protocol.manifest", "tensors": "protocol.tensors", "load_bundle": "protocol.manifest",
    "Manifest": "protocol.manifest", "Bundle": "protocol.manifest", "SCHEMA_VERSION": "protocol.manifest",
    # the image a head takes: preprocessing steps and input (protocol.image)
    "InputSpec": "protocol.image", "Preprocess": "protocol.image",
    # the one MQTT adapter (protocol.mqtt)
    "mqtt": "protocol.mqtt",
    # the device profile contract, edgesplit.profile/1 (protocol.profile), and percentiles (protocol.stats)
    "profile": "protocol.profile", "stats": "protocol.stats",
})
