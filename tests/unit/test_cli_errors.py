"""The one error printer of every entry point: one message, one fix, the exit code; a traceback only with -v."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgesplit.cli import report_error
from protocol.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parents[2]


def test_each_kind_of_error_is_one_message_with_its_exit_code(capsys):
    assert report_error("edgesplit device", UsageError("no broker given", fix="pass --broker URL")) == 2
    assert capsys.readouterr().err == "edgesplit device: error: no broker given\n  fix: pass --broker URL\n"
    assert report_error("edgesplit device", ConfigError("the broker refused the connection")) == 78
    assert report_error("edgesplit device", PermissionError(13, "Permission denied", "/x")) == 2
    assert report_error("edgesplit device", RuntimeError("surprise")) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: surprise" in err and "run again with -v" in err and "Traceback" not in err


def test_tracebacks_only_with_verbose(tmp_path):
    conf = tmp_path / "device.toml"
    conf.write_text('device_id = "pi-1"\nbundl = "/b"\n')
    for argv, traceback in ((["device", "serve", "--config", str(conf)], False),
                            (["device", "serve", "-v", "--config", str(conf)], True)):
        proc = subprocess.run([sys.executable, "-m", "edgesplit", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 78
        assert proc.stderr.count("error: ") == 1 and "did you mean `bundle`" in proc.stderr
        assert ("Traceback" in proc.stderr) is traceback
