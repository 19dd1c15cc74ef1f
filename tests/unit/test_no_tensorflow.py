"""The device role, and the runtime and protocol under it, run where TensorFlow does not exist (a Raspberry Pi).

Each check runs a fresh interpreter in which importing ``tensorflow`` or
``keras`` raises ImportError (a meta-path finder installed before anything
else), and which records every attempt, so an import hidden behind
``try/except ImportError`` is caught too.
"""
from __future__ import annotations

import json
import sys

import pytest

from fixtures_core import require
from fixtures_models import run_blocked


DEVICE_IMPORTS = """
    import json, sys
    import protocol, protocol.errors, protocol.manifest, protocol.frame, protocol.topics, protocol.mqtt
    import protocol.signing, protocol.tensors
    import runtime, runtime.interpreter, runtime.preprocess
    import device, device.sources, device.agent, device.outbox
    import edgesplit.cli
    import importlib, pkgutil
    # every module of the three roles, including ones added after this test was written
    for pkg in (protocol, runtime, device):
        for m in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{m.name}")
    from runtime.interpreter import pick_backend
    from device.agent import DeviceAgent
    b = pick_backend()
    print(json.dumps({"backend": b.name, "module": b.module,
                      "tf_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")),
                      "attempts": _block_tf.ATTEMPTS}))
"""


def test_device_runtime_and_protocol_import_without_tensorflow(tmp_path):
    proc = run_blocked(tmp_path, DEVICE_IMPORTS)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["attempts"] == [], f"device/runtime/protocol tried to import {out['attempts']}"
    assert out["tf_loaded"] == []
    assert out["backend"] != "tensorflow"
    assert out["module"] != "tensorflow.lite"


def test_device_command_parses_without_tensorflow(tmp_path):
    proc = run_blocked(tmp_path, """
        import sys
        from edgesplit.cli import main
        code = main(sys.argv[1:])
        sys.exit(code)
    """, args=["device", "run", "--bundle", str(tmp_path / "nowhere"), "--broker", "mqtt://127.0.0.1:1",
               "--device-id", "pi-01", str(tmp_path / "missing.png")])
    # the missing input is reported (exit 2) before anything else, and nothing tried TensorFlow
    assert proc.returncode == 2, proc.stderr
    assert "missing.png does not exist" in proc.stderr
    assert "tensorflow" not in proc.stderr.lower()


@pytest.mark.slow
def test_interpreter_falls_back_to_tensorflow_only_when_litert_is_missing(tmp_path):
    require("tensorflow")
    proc = run_blocked(tmp_path, """
        from runtime.interpreter import pick_backend
        print(pick_backend().name)
    """, block="ai_edge_litert,tflite_runtime", env_extra={"TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "tensorflow"


def test_no_interpreter_at_all_says_what_to_install(tmp_path):
    proc = run_blocked(tmp_path, """
        from runtime.interpreter import pick_backend
        from protocol.errors import ConfigError
        try:
            pick_backend()
        except ConfigError as e:
            print("CONFIG", e.exit_code, e.fix)
    """, block="ai_edge_litert,tflite_runtime,tensorflow,keras")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("CONFIG 78")
    assert "pip install ai-edge-litert" in line and "tflite-runtime" in line
