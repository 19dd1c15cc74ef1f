"""The contract every role shares: wire frames, topic names, signing, errors, the bundle manifest, the device profile.

Public names are listed here; everything else is private to its module.

Only the errors are imported with the package.  The other names load their
module on first use (PEP 562), so ``import protocol.errors`` needs neither
numpy nor msgspec: a device that lacks them still reaches ``edgesplit doctor``,
which then says what is missing.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from protocol.errors import (BundleError, CheckFailed, ConfigError, EdgesplitError, FrameError, Reason,
                             TopicError, UsageError)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below imports these on first use
    from protocol import manifest, mqtt, profile, stats, tensors, topics
    from protocol.manifest import SCHEMA_VERSION, Bundle, Manifest, load_bundle
    from protocol.frame import Frame, FrameLimits, decode_frame, encode_frame, header_size
    from protocol.signing import ReplayWindow, generate_key, load_key, load_keys, write_key

__all__ = [
    # errors, and the closed list of reasons a frame is refused for
    "EdgesplitError", "UsageError", "BundleError", "ConfigError", "CheckFailed", "FrameError", "TopicError",
    "Reason",
    # wire frames (protocol.frame)
    "Frame", "FrameLimits", "encode_frame", "decode_frame", "header_size",
    # signing (protocol.signing)
    "ReplayWindow", "generate_key", "load_key", "load_keys", "write_key",
    # topic names (protocol.topics)
    "topics",
    # bundles (protocol.manifest) and quantization arithmetic (protocol.tensors)
    "manifest", "tensors", "load_bundle", "Manifest", "Bundle", "SCHEMA_VERSION",
    # the one MQTT adapter (protocol.mqtt)
    "mqtt",
    # the device profile contract, edgesplit.profile/1 (protocol.profile), and percentiles (protocol.stats)
    "profile", "stats",
]

# public name -> the module that defines it (a module's own name: the module itself)
_LAZY = {
    "Frame": "protocol.frame", "FrameLimits": "protocol.frame", "encode_frame": "protocol.frame",
    "decode_frame": "protocol.frame", "header_size": "protocol.frame",
    "ReplayWindow": "protocol.signing", "generate_key": "protocol.signing", "load_key": "protocol.signing",
    "load_keys": "protocol.signing", "write_key": "protocol.signing",
    "topics": "protocol.topics",
    "manifest": "protocol.manifest", "tensors": "protocol.tensors", "mqtt": "protocol.mqtt",
    "profile": "protocol.profile", "stats": "protocol.stats",
    "load_bundle": "protocol.manifest", "Manifest": "protocol.manifest", "Bundle": "protocol.manifest",
    "SCHEMA_VERSION": "protocol.manifest",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        # AttributeError (not ImportError) lets `from protocol import manifest` fall back to the submodule
        raise AttributeError(f"module 'protocol' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"{__name__}.{name}" else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
