"""The command is quiet: TensorFlow, absl and oneDNN say nothing on stderr unless ``-v``.

A real ``python -m edgesplit`` process, with none of the variables a user would not set
(``TF_CPP_MIN_LOG_LEVEL``, ``TF_ENABLE_ONEDNN_OPTS``) in its environment: the command must quiet
the libraries itself, before they load.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def edgesplit(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "edgesplit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cuts_paper_cnn_writes_nothing_on_stderr(paper_model):
    # With -v the notices are in the debug log: tests/unit/test_runtime_quiet.py (a second process
    # here would cost another TensorFlow import).
    done = edgesplit("cuts", "paper-cnn")   # paper_model: the trained model is in the cache
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "pool2" in done.stdout and "dense2" in done.stdout
