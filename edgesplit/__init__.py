"""The one command, ``edgesplit <verb>``: parses arguments, calls the role that owns the verb, reports.

Public name (imported on first use): ``main(argv) -> exit code`` (``edgesplit.cli``).
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    "main": "edgesplit.cli",
})
