"""TensorFlow's, absl's and LiteRT's own notices off the terminal; the debug log keeps them.

Setting ``TF_CPP_MIN_LOG_LEVEL`` is not enough.  TensorFlow 2.21 logs its oneDNN notice
(``port.cc] oneDNN custom operations are on``) through absl while its shared libraries load,
before absl is initialised and whatever that variable says, and absl prefaces it with "All log
messages before absl::InitializeLog() ...": two lines per library, four per ``import
tensorflow``.  ``TF_ENABLE_ONEDNN_OPTS=0`` silences the notice only by turning oneDNN off, which
changes speed and numerics, so it is not the cure.  LiteRT prints "INFO: Created TensorFlow Lite
XNNPACK delegate for CPU." with C ``fprintf`` on its first ``allocate_tensors``.  Neither goes
through Python, so :func:`quiet_native_stderr` holds file descriptor 2 while such code runs and
passes on everything but those notices afterwards: an error from a library (absl ``E``/``F``
lines), a traceback or another thread's log line still reaches the terminal, only later.

:func:`quiet_libraries` is what the command calls once: TensorFlow's import through
:func:`quiet_native_stderr`, and TensorFlow's, absl's and Keras' Python loggers and warnings
below ``-v``.  Nothing here imports TensorFlow.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import logging
import os
import re
import sys
import tempfile
import threading

log = logging.getLogger(__name__)

#: Lines that are notices, not news: absl's preface, absl/glog INFO and WARNING records (both
#: the absl "I0000 00:00:..." and TensorFlow's older dated layout), the CPU-feature notice's
#: second line, and the TFLite runtime's "INFO: ..." lines.
NOTICE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] \S+:\d+\] "
    rb"|To enable the following instructions: .*rebuild TensorFlow"
    rb"|INFO: )")

_lock = threading.RLock()   # fd 2 is the process's: one holder at a time, re-entrant for nesting
_depth = 0


@contextlib.contextmanager
def quiet_native_stderr():
    """Hold what is written to stderr (fd 2) inside the block; afterwards re-emit it minus :data:`NOTICE`."""
    global _depth
    with _lock:
        if _depth:  # an outer block already holds fd 2
            _depth += 1
            try:
                yield
            finally:
                _depth -= 1
            return
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            sink = tempfile.TemporaryFile()
        except (OSError, ValueError, AttributeError):  # no usable stderr or temp dir: leave it alone
            yield
            return
        _depth = 1
        try:
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            _depth = 0
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held = sink.read()
            sink.close()
            _pass_on(held)


def _pass_on(held: bytes) -> None:
    kept, notices = [], []
    for line in held.splitlines(keepends=True):
        (notices if NOTICE.match(line) else kept).append(line)
    if notices:
        log.debug("native libraries said:\n%s", b"".join(notices).decode("utf-8", "replace").rstrip())
    if kept:
        data = b"".join(kept)
        while data:
            data = data[os.write(2, data):]


class _QuietImport(importlib.abc.MetaPathFinder):
    """Runs the first import of each named top-level module inside :func:`quiet_native_stderr`."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        if not self.names:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # the module should look as if imported plainly (reload, resources)
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        with quiet_native_stderr():
            self.loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def quiet_first_import(name: str = "tensorflow") -> None:
    """Run the process's first ``import name`` (also one made by another package, as ``import keras``
    imports TensorFlow) inside :func:`quiet_native_stderr`."""
    if name in sys.modules or any(isinstance(f, _QuietImport) and name in f.names for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietImport([name]))


def quiet_libraries(verbose: bool = False) -> None:
    """The command's setting: TensorFlow, absl and Keras say nothing on stderr unless ``verbose``.

    Native notices go to the debug log (shown with ``-v``); Python warnings go through logging
    (``py.warnings``) and, with the ``tensorflow`` and ``absl`` loggers, show only with ``-v``.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow loads: before any import
    quiet_first_import("tensorflow")
    logging.captureWarnings(True)
    level = logging.NOTSET if verbose else logging.ERROR
    for name in ("py.warnings", "tensorflow", "absl"):
        logging.getLogger(name).setLevel(level)
