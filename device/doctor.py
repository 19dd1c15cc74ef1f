"""``edgesplit doctor``: is this machine ready to run the device?  Each check says ok, FAIL, warn or skip.

Runs on the device itself (a Raspberry Pi): it imports nothing but the standard
library at module level, and every package it checks is imported inside its own
check, so a missing numpy or paho is reported, not a traceback.  Checks:

python, architecture, system, numpy, Pillow, paho-mqtt, msgspec, zstandard, the
TFLite interpreter, the camera (picamera2), the device config, the bundle (every
sha256) and that the interpreter loads and runs ``head.tflite``, the credentials,
and the broker: a TCP connect (unreachable is told apart from refused) and then a
real MQTT CONNECT with a timeout (wrong credentials are told apart from a broker
that is down).  A failed check prints the command that fixes it.  Exit code 0 when
nothing failed, 1 otherwise.

Without arguments on a device it checks the installed ``/etc/edgesplit/device.toml``.
``python -m device.doctor`` runs ``edgesplit doctor`` where the ``edgesplit`` script is not on the PATH.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import platform
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

__all__ = ["Check", "DoctorReport", "run_doctor", "OK", "FAIL", "WARN", "SKIP"]

# WARN: works, but slower or weaker than it should be; it does not make the machine "NOT ready"
OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
MIN_PYTHON = (3, 10)
VENV_PIP = "/opt/edgesplit/venv/bin/pip"
CHECK_NAMES = ("python", "architecture", "system", "numpy", "pillow", "paho-mqtt", "msgspec", "zstandard", "config",
               "interpreter", "camera", "bundle", "credentials", "broker")


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str               # "ok" | "FAIL" | "warn" | "skip"
    detail: str
    fix: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class DoctorReport:
    """Every check in order; ``summary()`` is what the command prints."""

    checks: list[Check]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [c.to_dict() for c in self.checks], "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        width = max((len(c.name) for c in self.checks), default=8)
        lines = ["edgesplit doctor"]
        for c in self.checks:
            lines.append(f"  {c.status:<4}  {c.name:<{width}}  {c.detail}")
            if c.fix and c.status in (FAIL, WARN):
                lines.append(f"  {'':<4}  {'':<{width}}  fix: {c.fix}")
        counts = {s: sum(c.status == s for c in self.checks) for s in (OK, FAIL, WARN, SKIP)}
        verdict = "ready" if self.ok else "NOT ready"
        lines.append(f"{counts[OK]} ok, {counts[FAIL]} FAIL, {f'{counts[WARN]} warn, ' if counts[WARN] else ''}"
                     f"{counts[SKIP]} skip: {verdict} ({self.seconds:.1f} s)")
        return "\n".join(lines)


def _version(module: Any, dist: str | None = None) -> str:
    v = getattr(module, "__version__", None)
    if v:
        return str(v)
    try:
        from importlib import metadata

        return metadata.version(dist or module.__name__)
    except Exception:
        return "unknown"


def _pip(package: str) -> str:
    """The install command for a package, for this interpreter (the venv's pip when in one)."""
    if sys.prefix != sys.base_prefix:
        return f"{Path(sys.prefix) / 'bin' / 'pip'} install '{package}'"
    return f"{VENV_PIP} install '{package}'   (or: python3 -m pip install '{package}')"


class _Doctor:
    def __init__(self, bundle: str | None, broker: str | None, config: str | None, timeout: float,
                 camera: bool | None, env: dict, skip: tuple[str, ...] = ()):
        self.skip = skip
        self.bundle_arg, self.broker_arg, self.config_arg = bundle, broker, config
        self.timeout = timeout
        self.camera = camera
        self.env = env
        self.checks: list[Check] = []
        self.cfg = None
        self.creds = None
        self.bundle = None
        self.backend = None

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> Check:
        c = Check(name, status, detail, fix)
        self.checks.append(c)
        return c

    def guarded(self, name: str, fn: Callable[[], None]) -> None:
        """Run one check; an unexpected exception becomes a FAIL line, never a traceback."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the doctor reports whatever went wrong
            msg = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            self.add(name, FAIL, msg.splitlines()[0] if msg else type(exc).__name__, getattr(exc, "fix", None))

    # ------------------------------------------------------------- the machine
    def python(self) -> None:
        v = sys.version_info
        where = sys.executable + (" (venv)" if sys.prefix != sys.base_prefix else "")
        if (v.major, v.minor) < MIN_PYTHON:
            self.add("python", FAIL, f"{platform.python_version()} at {where}; edgesplit needs 3.10 or newer",
                     "use Raspberry Pi OS Bookworm or newer (Python 3.11+) and re-run install.sh")
        else:
            self.add("python", OK, f"{platform.python_version()} at {where}")

    def architecture(self) -> None:
        m = platform.machine()
        bits = 64 if sys.maxsize > 2 ** 32 else 32
        if m in ("aarch64", "arm64", "x86_64", "AMD64") and bits == 64:
            self.add("architecture", OK, f"{m} ({bits}-bit)")
        elif m.startswith("arm") or bits == 32:
            self.add("architecture", FAIL, f"{m} ({bits}-bit): ai-edge-litert has no 32-bit wheels",
                     "flash the 64-bit Raspberry Pi OS (Bookworm or newer); a Pi 3, 4, 5 or Zero 2 W runs it")
        else:
            self.add("architecture", FAIL, f"{m} ({bits}-bit): no TFLite interpreter wheels for it",
                     "use a 64-bit ARM (aarch64) or x86_64 machine")

    def system(self) -> None:
        parts = []
        try:
            info = {}
            for line in Path("/etc/os-release").read_text().splitlines():
                k, _, v = line.partition("=")
                info[k] = v.strip().strip('"')
            parts.append(info.get("PRETTY_NAME", "unknown OS"))
        except OSError:
            parts.append(f"{platform.system()} {platform.release()}")
        try:
            model = Path("/proc/device-tree/model").read_bytes().rstrip(b"\0").decode("utf-8", "replace")
            parts.append(model)
        except OSError:
            pass
        self.add("system", OK, "; ".join(parts))

    def package(self, name: str, module: str, fix: str, minimum: tuple[int, ...] | None = None,
                dist: str | None = None) -> None:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            self.add(name, FAIL, f"not importable ({exc})", fix)
            return
        version = _version(mod, dist)
        where = Path(getattr(mod, "__file__", "") or "?").parent
        if minimum is not None:
            nums = []
            for part in version.split(".")[:len(minimum)]:
                digits = "".join(ch for ch in part if ch.isdigit())
                nums.append(int(digits) if digits else 0)
            if tuple(nums) < minimum:
                self.add(name, FAIL, f"{version} at {where}; edgesplit needs {'.'.join(map(str, minimum))}+", fix)
                return
        self.add(name, OK, f"{version} ({where})")

    def interpreter(self) -> None:
        from importlib.util import find_spec

        found = []
        for name, module in (("ai_edge_litert", "ai_edge_litert"), ("tflite_runtime", "tflite_runtime"),
                             ("tensorflow", "tensorflow")):
            try:
                if find_spec(module) is not None:
                    found.append(name)
            except (ImportError, ValueError):
                continue
        forced = self.env.get("EDGESPLIT_INTERPRETER") or (self.cfg.interpreter if self.cfg else "") or None
        fix = (f"{_pip('ai-edge-litert')}   (fallback: {_pip('tflite-runtime')}); "
               "or re-run install.sh from the device package")
        if not found:
            self.add("interpreter", FAIL, "no TFLite interpreter: neither ai_edge_litert, tflite_runtime nor "
                                          "tensorflow is installed", fix)
            return
        if forced is None and found[0] == "tensorflow":
            # Importing TensorFlow only to say it is there would take seconds; a Pi never has it.
            self.add("interpreter", OK, "tensorflow.lite only (last resort: slow to start, large)",
                     None)
            return
        try:
            from runtime.interpreter import pick_backend

            self.backend = pick_backend(forced)
        except Exception as exc:  # noqa: BLE001
            self.add("interpreter", FAIL, getattr(exc, "message", str(exc)), fix)
            return
        others = [f for f in found if f != self.backend.name]
        self.add("interpreter", OK, f"{self.backend.name} {self.backend.version}"
                 + (f" (also installed: {', '.join(others)})" if others else ""))

    def camera_check(self) -> None:
        wanted = self.camera
        if wanted is None:
            wanted = bool(self.cfg is not None and self.cfg.cameras)
        try:
            picamera2 = importlib.import_module("picamera2")
        except Exception as exc:  # ImportError, or libcamera errors on a machine without one
            if wanted:
                self.add("camera", FAIL, f"picamera2 is not importable ({exc}) but a camera input is configured",
                         "sudo apt install -y python3-picamera2, and a venv made with --system-site-packages "
                         "(install.sh does both when the package has a camera input)")
            else:
                self.add("camera", SKIP, "picamera2 not installed (no camera input configured)")
            return
        try:
            cams = picamera2.Picamera2.global_camera_info()
        except Exception as exc:  # noqa: BLE001
            cams = None
            detail = f"picamera2 {_version(picamera2)}; cannot list cameras ({exc})"
        else:
            detail = f"picamera2 {_version(picamera2)}; {len(cams)} camera(s)" + (
                f": {', '.join(str(c.get('Model', '?')) for c in cams)}" if cams else "")
        if wanted and not cams:
            self.add("camera", FAIL, detail, "connect the camera ribbon cable with the Pi off, then check "
                                             "`rpicam-hello --list-cameras`")
        else:
            self.add("camera", OK, detail)

    # ------------------------------------------------------------- the deployment
    def config(self) -> None:
        path = self.config_arg
        if path is None and self.bundle_arg is None and self.broker_arg is None:
            from device.config import DEFAULT_CONFIG

            if Path(DEFAULT_CONFIG).is_file():
                path = DEFAULT_CONFIG
        if path is None:
            self.add("config", SKIP, "no device config given (--config FILE)")
            return
        from device.config import load_config

        try:
            self.cfg = load_config(path)
        except Exception as exc:  # noqa: BLE001
            msg = getattr(exc, "message", str(exc))
            self.add("config", FAIL, msg.replace("\n    ", "; "), getattr(exc, "fix", None))
            return
        self.add("config", OK, f"{path}: device {self.cfg.device_id}, fleet {self.cfg.fleet}, "
                               f"inputs {', '.join(self.cfg.inputs)}")

    def bundle_check(self) -> None:
        path = self.bundle_arg or (str(self.cfg.bundle) if self.cfg else None)
        if path is None:
            self.add("bundle", SKIP, "no bundle given (--bundle DIR_OR_TAR_GZ)")
            self.add("head", SKIP, "no bundle to load")
            return
        from protocol.manifest import load_bundle

        try:
            self.bundle = load_bundle(path)
        except Exception as exc:  # noqa: BLE001
            self.add("bundle", FAIL, getattr(exc, "message", str(exc)),
                     getattr(exc, "fix", None) or "copy the bundle again, or rebuild the device package")
            self.add("head", SKIP, "the bundle did not verify")
            return
        m = self.bundle.manifest
        self.add("bundle", OK, f"{self.bundle.bundle_id} at {path}: {m.model} cut {m.cut} ({m.quant}), "
                               f"{len(m.files)} file(s) match their sha256")
        if self.backend is None:
            self.add("head", SKIP, "no usable TFLite interpreter (see above)")
            return
        import numpy as np
        from runtime.split import Head

        t0 = time.perf_counter()
        try:
            head = Head(self.bundle, backend=self.backend)   # checked against the manifest, as the agent does
            model = head.model
            x = np.zeros((1, *model.sample_shape), dtype=np.float32)
            y = head.features(x)
        except Exception as exc:  # noqa: BLE001
            self.add("head", FAIL, f"{self.backend.name} cannot run head.tflite: "
                                   f"{getattr(exc, 'message', exc)}",
                     "rebuild the bundle with `edgesplit convert` (an interpreter older than the converter "
                     "may lack an operator: upgrade ai-edge-litert)")
            return
        ms = (time.perf_counter() - t0) * 1000
        self.add("head", OK, f"head.tflite loads and runs on {self.backend.name}: input "
                             f"{list(model.sample_shape)} -> {list(y.shape[1:])} {y.dtype} ({ms:.0f} ms)")

    def credentials(self) -> None:
        if self.cfg is None:
            self.add("credentials", SKIP, "no device config (credentials come from it)")
            return
        from device.credentials import resolve_credentials

        try:
            self.creds = resolve_credentials(self.cfg, self.env)
        except Exception as exc:  # noqa: BLE001
            self.add("credentials", FAIL, getattr(exc, "message", str(exc)),
                     getattr(exc, "fix", None) or "re-run install.sh")
            return
        c = self.creds
        what = [f"user {c.username!r}" if c.username else "anonymous",
                "password" if c.password else "no password"]
        if self.cfg.broker_url.startswith("mqtts://"):
            what.append(f"CA {c.ca_path}" if c.ca_path else "CA: system trust store")
        if c.key:
            what.append("frame key")
        self.add("credentials", OK, ", ".join(what) + f" (from {c.source})")

    def broker(self) -> None:
        url = self.broker_arg or (self.cfg.broker_url if self.cfg else None)
        if url is None:
            self.add("broker", SKIP, "no broker given (--broker URL)")
            return
        try:
            from protocol.mqtt import MqttClient, parse_url
        except ImportError as exc:
            self.add("broker", FAIL, f"cannot check: {exc}", _pip("paho-mqtt>=2,<2.3"))
            return
        creds = self.creds
        kw = {}
        if creds is not None and not self.broker_arg:
            kw = dict(username=creds.username, password=creds.password, tls_ca=creds.ca_path)
        try:
            b = parse_url(url, **kw)
        except Exception as exc:  # noqa: BLE001
            self.add("broker", FAIL, getattr(exc, "message", str(exc)), getattr(exc, "fix", None))
            return
        # 1. can we reach the port at all?
        t0 = time.perf_counter()
        try:
            with socket.create_connection((b.host, b.port), timeout=self.timeout):
                pass
        except socket.gaierror as exc:
            self.add("broker", FAIL, f"{b.host} does not resolve ({exc.strerror or exc})",
                     "check the host name in the broker URL, and DNS (`getent hosts HOST`)")
            return
        except ConnectionRefusedError:
            self.add("broker", FAIL, f"{b.host}:{b.port} is unreachable: connection refused (nothing listens "
                                     f"there)", f"start the broker (edgesplit broker --mosquitto --config DIR, or "
                                                f"systemctl start mosquitto) and check the port in {b}")
            return
        except (socket.timeout, TimeoutError):
            self.add("broker", FAIL, f"{b.host}:{b.port} is unreachable: no answer within {self.timeout:g} s",
                     "check the network, the host and port, and any firewall between (port "
                     f"{b.port}/tcp must be open)")
            return
        except OSError as exc:
            self.add("broker", FAIL, f"{b.host}:{b.port} is unreachable: {exc.strerror or exc}",
                     "check the network and the broker URL")
            return
        tcp_ms = (time.perf_counter() - t0) * 1000
        # 2. a real MQTT CONNECT, with a client id of its own so the running service is not kicked off
        dev = self.cfg.device_id if self.cfg else "doctor"
        client = MqttClient(url, client_id=f"edgesplit-doctor-{dev}-{uuid.uuid4().hex[:6]}", **kw)
        try:
            connected = client.start(wait_connected=self.timeout)
        except Exception as exc:  # noqa: BLE001 - ConfigError: refused credentials, TLS verification
            self.add("broker", FAIL, getattr(exc, "message", str(exc)),
                     "the broker refused this device's credentials: check the password file matches the broker's "
                     "passwd (re-run `edgesplit broker config` and rebuild the device package), the user name "
                     "and the ACL" if "refused" in str(exc) else getattr(exc, "fix", None))
            return
        finally:
            client.stop(timeout=1.0)
        if not connected:
            self.add("broker", FAIL, f"{b} accepts TCP but gave no MQTT answer within {self.timeout:g} s",
                     "check it is an MQTT broker on that port, and mqtts:// for a TLS port (8883) or mqtt:// "
                     "for plain (1883)")
            return
        auth = f"as {b.username!r}" if b.username else "anonymously"
        self.add("broker", OK, f"{b}: MQTT connect accepted {auth}"
                               f"{' over TLS' if b.tls else ''} (TCP {tcp_ms:.0f} ms)")
        # 3. one message through the broker and back, one at a time: Nagle's algorithm shows here
        from protocol.mqtt.probe import nagle_advice, round_trip_ms

        rtts = round_trip_ms(url, timeout=self.timeout, client_id=f"edgesplit-doctor-{dev}-{uuid.uuid4().hex[:6]}",
                             **kw)
        if not rtts:
            self.add("round trip", SKIP, "could not measure: no probe message came back (the broker's ACL keeps "
                                         "edgesplit/v1/_probe/... out)")
            return
        advice = nagle_advice(rtts, b.host)
        med = sorted(rtts)[len(rtts) // 2]
        if advice:
            # a warning: the device works, only slower, and a link that really delays looks the same
            self.add("round trip", WARN, advice.split(". Fix: ")[0], advice.split(". Fix: ")[1])
        else:
            self.add("round trip", OK, f"a message through the broker and back: {med:.1f} ms (median of {len(rtts)})")

    def run(self) -> DoctorReport:
        t0 = time.monotonic()
        # the checks say what they found; the roles' own info logs would only interleave with the report
        quiet = {name: logging.getLogger(name).level for name in ("protocol", "device")}
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            for name in quiet:
                logging.getLogger(name).setLevel(logging.ERROR)
        try:
            self._run_all()
        finally:
            for name, level in quiet.items():
                logging.getLogger(name).setLevel(level)
        return DoctorReport(self.checks, time.monotonic() - t0)

    def _run_all(self) -> None:
        apt = "sudo apt install -y {}   (venv: --system-site-packages)  or: {}"
        steps: list[tuple[str, Callable[[], None]]] = [
            ("python", self.python),
            ("architecture", self.architecture),
            ("system", self.system),
            ("numpy", lambda: self.package("numpy", "numpy", apt.format("python3-numpy", _pip("numpy")), (1, 23))),
            ("Pillow", lambda: self.package("Pillow", "PIL", _pip("pillow>=10"), (10,), dist="pillow")),
            ("paho-mqtt", lambda: self.package("paho-mqtt", "paho.mqtt", _pip("paho-mqtt>=2,<2.3"), (2,),
                                               dist="paho-mqtt")),
            ("msgspec", lambda: self.package("msgspec", "msgspec", _pip("msgspec>=0.18,<1"))),
            ("zstandard", lambda: self.package("zstandard", "zstandard", _pip("zstandard>=0.22,<1"))),
            ("config", self.config),
            ("interpreter", self.interpreter),
            ("camera", self.camera_check),
            ("bundle", self.bundle_check),
            ("credentials", self.credentials),
            ("broker", self.broker),
        ]
        for name, fn in steps:
            if name.lower() in self.skip:
                self.add(name, SKIP, "skipped (--skip)")
                if name == "bundle":
                    self.add("head", SKIP, "skipped (--skip bundle)")
                continue
            self.guarded(name, fn)


def run_doctor(bundle: str | None = None, broker: str | None = None, config: str | None = None, *,
               timeout: float = 5.0, camera: bool | None = None, skip: tuple[str, ...] | list[str] = (),
               env: dict | None = None) -> DoctorReport:
    """Run every check; ``--config`` supplies bundle, broker and credentials unless given explicitly.

    ``camera``: True requires a working camera, False never, None when the config has a camera input.
    ``skip``: names of checks not to run (e.g. ``("broker",)`` while the network is not up yet).
    """
    unknown = [n for n in skip if n.lower() not in CHECK_NAMES]
    if unknown:
        from protocol.errors import UsageError

        import difflib

        near = difflib.get_close_matches(unknown[0].lower(), CHECK_NAMES, n=1)
        raise UsageError(f"unknown check {unknown[0]!r} to skip",
                         fix=(f"did you mean {near[0]!r}? " if near else "") + f"checks: {', '.join(CHECK_NAMES)}")
    return _Doctor(bundle, broker, config, timeout, camera, dict(os.environ if env is None else env),
                   tuple(n.lower() for n in skip)).run()


def main(argv: list[str] | None = None) -> None:
    """``python -m device.doctor ...``: runs ``edgesplit doctor ...`` (same options, output and exit code)."""
    import runpy

    # run the command rather than import it: the command sits above the roles, never below them
    sys.argv = [sys.argv[0], "doctor", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("edgesplit", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
