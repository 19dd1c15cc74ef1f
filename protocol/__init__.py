"""The contract every role shares: wire frames, topic names, signing, errors (and the bundle manifest).

Public names are listed here; everything else is private to its module.
"""
from protocol.errors import (BundleError, CheckFailed, ConfigError, EdgesplitError, FrameError, TopicError,
                             UsageError)
from protocol.frame import Frame, FrameLimits, decode_frame, encode_frame, header_size
from protocol.signing import ReplayWindow, generate_key, load_key, load_keys, write_key
from protocol import topics

__all__ = [
    # errors
    "EdgesplitError", "UsageError", "BundleError", "ConfigError", "CheckFailed", "FrameError", "TopicError",
    # wire frames (protocol.frame)
    "Frame", "FrameLimits", "encode_frame", "decode_frame", "header_size",
    # signing (protocol.signing)
    "ReplayWindow", "generate_key", "load_key", "load_keys", "write_key",
    # topic names (protocol.topics)
    "topics",
    # manifest (protocol.manifest, helper B): add its names below
]
