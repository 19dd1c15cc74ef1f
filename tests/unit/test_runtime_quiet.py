"""runtime.quiet: the libraries' notices leave the terminal for the debug log, nothing else does.

What native code prints is written here with ``os.write(2, ...)``, as TensorFlow's and LiteRT's C++
do (past Python's ``sys.stderr``).  The lines are the ones TensorFlow 2.21 and LiteRT 2.x print.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from runtime.quiet import quiet_first_import, quiet_native_stderr

ROOT = Path(__file__).resolve().parents[2]

NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796683763.620142   13110 port.cc:153] oneDNN custom operations are on. You may see "
    b"slightly different numerical results due to floating-point round-off errors.\n"
    b"W0000 00:00:1796683766.154350   13110 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.\n"
    b"2025-01-02 10:11:12.131415: I tensorflow/core/util/port.cc:113] oneDNN custom operations are on.\n"
    b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
NEWS = (b"E0000 00:00:1796683766.154350   13110 op_kernel.cc:1830] OP_REQUIRES failed: out of memory\n"
        b"Traceback (most recent call last):\n")


def test_notices_go_to_the_debug_log_and_everything_else_still_reaches_stderr(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="runtime.quiet")
    notices, news = NOTICES.splitlines(keepends=True), NEWS.splitlines(keepends=True)
    with quiet_native_stderr():
        os.write(2, b"".join(notices[:2]))
        os.write(2, news[0])      # interleaved, as another thread would write
        os.write(2, b"".join(notices[2:]))
        os.write(2, b"a log line of ours\n")
        os.write(2, news[1])
    err = capfd.readouterr().err
    assert err == news[0].decode() + "a log line of ours\n" + news[1].decode()
    assert "oneDNN" not in err and "XNNPACK" not in err and "absl::InitializeLog" not in err
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "oneDNN custom operations are on" in said and "XNNPACK delegate" in said


def test_nested_blocks_hold_stderr_once(capfd):
    with quiet_native_stderr():
        with quiet_native_stderr():
            os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\ninner\n")
        os.write(2, b"outer\n")
    assert capfd.readouterr().err == "inner\nouter\n"
    os.write(2, b"after\n")  # fd 2 is the terminal's again
    assert capfd.readouterr().err == "after\n"


def test_the_first_import_of_a_noisy_library_is_quiet_and_its_errors_are_not(tmp_path, monkeypatch, capfd):
    pkg = tmp_path / "noisylib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os\nos.write(2, %r)\nfrom . import part\nVALUE = part.VALUE\n" % NOTICES)
    (pkg / "part.py").write_text("import os\nos.write(2, b'E0000 00:00:1.0 1 part.cc:1] a real error\\n')\nVALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    quiet_first_import("noisylib")
    import noisylib

    assert noisylib.VALUE == 7
    assert noisylib.__spec__.loader is noisylib.__loader__ and type(noisylib.__loader__).__name__ == "SourceFileLoader"
    assert capfd.readouterr().err == "E0000 00:00:1.0 1 part.cc:1] a real error\n"
    assert not any(type(f).__name__ == "_QuietImport" for f in sys.meta_path)  # one import, then gone


def test_the_command_setting_hides_library_warnings_unless_verbose(tmp_path):
    (tmp_path / "libwarn.py").write_text("import warnings\ndef go():\n    warnings.warn('tf.lite.Interpreter is "
                                         "deprecated', UserWarning)\n")
    prog = textwrap.dedent("""
        import logging, sys
        verbose = sys.argv[1] == "-v"
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
        from runtime.quiet import quiet_libraries
        quiet_libraries(verbose=verbose)
        import libwarn
        libwarn.go()
        logging.getLogger("absl").warning("absl says so")
        logging.getLogger("edgesplit").info("our own line")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    quiet, verbose = (subprocess.run([sys.executable, "-c", prog, flag], env=env, capture_output=True, text=True,
                                     timeout=60) for flag in ("-q", "-v"))
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert quiet.stderr == "our own line\n"
    assert "deprecated" in verbose.stderr and "absl says so" in verbose.stderr and "our own line" in verbose.stderr
