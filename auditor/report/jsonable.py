"""A result as strict JSON: what report.json and iplane.json hold (no NaN, no numpy types).

Its own module so that every report writer can use it without importing the package that
imports them.
"""
from __future__ import annotations

import json
import math


def to_json(result) -> dict:
    """``result.to_dict()`` made strictly JSON (no NaN / numpy types)."""
    from protocol.tensors import json_default

    text = json.dumps(result.to_dict(), default=json_default)
    return _clean(json.loads(text))


def _clean(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o
