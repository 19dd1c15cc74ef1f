"""``edgesplit bundle device``: one tarball that installs the device service on a Raspberry Pi.

``build_device_package(bundle, out, ...)`` writes ``out`` (a ``.tar.gz``, mode 0600: it
holds the device's broker password) with one folder inside::

    edgesplit-device-<id>/
      install.sh            sudo ./install.sh (or --local --prefix DIR for a test target)
      package.env           what install.sh needs to know (device, offline?, wheel platform)
      SHA256SUMS            every other file; install.sh checks it first
      package.json          the same, for tools (versions, sizes, what was asked)
      README.txt
      device.toml           the device config, with the installed paths
      bundle/               manifest.json, head.tflite, tail.tflite (verified again on the Pi)
      credentials/          password, ca.crt[, frame.key]  (from `edgesplit broker config`)
      systemd/edgesplit-device.service
      wheels/               edgesplit-<v>-py3-none-any.whl built from this checkout,
                            requirements.txt, constraints.txt, and with offline wheels
                            every dependency for the target (aarch64, Python 3.11 by default)

Offline wheels are fetched here, at package time, with ``pip download --only-binary=:all:
--platform ... --python-version ...`` into a cache (``$EDGESPLIT_CACHE/wheels``) that is
tried first without the network; the device never runs pip at run time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Sequence

from protocol.errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["DevicePackage", "build_device_package", "build_wheel", "download_wheels", "platform_tags",
           "INSTALL_PATHS"]

TEMPLATES = Path(__file__).parent / "templates"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
UNIT_NAME = "edgesplit-device.service"
#: where install.sh puts things on the device (device.toml refers to these)
INSTALL_PATHS = {"bundle": "/opt/edgesplit/bundle", "config": "/etc/edgesplit/device.toml",
                 "credentials": "/etc/edgesplit/credentials", "state_dir": "/var/lib/edgesplit",
                 "venv": "/opt/edgesplit/venv"}
INTERPRETER_PACKAGES = ("ai-edge-litert", "tflite-runtime")
#: the glibc of the Raspberry Pi OS that ships each Python (Bookworm 3.11, Trixie 3.13)
_GLIBC_FOR_PYTHON = {"3.11": 36, "3.13": 41}
#: apt's python3-numpy on that release: the venv sees it (--system-site-packages) and picamera2 is
#: built against it, so offline wheels are resolved against it (ml_dtypes 0.6 would want numpy 2)
APT_NUMPY = {"3.11": "1.24.2", "3.13": "2.2.4"}
_PROJECT_DIRS = ("protocol", "runtime", "device", "cloud", "converter", "auditor", "deploy", "edgesplit")
_PROJECT_FILES = ("setup.cfg", "pyproject.toml", "setup.py", "README.md", "LICENSE", "MANIFEST.in")


@dataclasses.dataclass(frozen=True)
class DevicePackage:
    """What ``build_device_package`` wrote; ``summary()`` is what the command prints."""

    path: Path
    folder: str                      # the one top-level folder inside the tarball
    device_id: str
    fleet: str
    broker_url: str
    bundle_id: str
    edgesplit_version: str
    files: dict[str, str]            # path inside the folder -> sha256
    credentials: tuple[str, ...]     # credential files shipped (names only)
    inputs: tuple[str, ...]
    camera: bool
    offline: bool
    wheel_platform: str | None       # None: only the edgesplit wheel is shipped (online install)
    python_version: str | None
    interpreter: str                 # "auto" or the package the wheels are for
    wheels: tuple[str, ...]          # every wheel file shipped
    bytes: int
    seconds: float

    def summary(self) -> str:
        dep_wheels = [w for w in self.wheels if not w.startswith("edgesplit-")]
        lines = [f"device package {self.path} ({self.bytes / 2**20:.1f} MiB, mode 0600: it holds credentials)",
                 f"  device   {self.device_id}  fleet {self.fleet}  broker {self.broker_url}",
                 f"  bundle   {self.bundle_id}   edgesplit {self.edgesplit_version} (wheel built from this checkout)",
                 f"  inputs   {', '.join(self.inputs)}" + ("  (camera: installs python3-picamera2)"
                                                            if self.camera else ""),
                 f"  secrets  {', '.join(self.credentials) if self.credentials else 'none (anonymous broker)'}"]
        if self.offline:
            lines.append(f"  install  offline: {len(dep_wheels)} wheels for {self.wheel_platform}, Python "
                         f"{self.python_version}, interpreter {self.interpreter}")
        else:
            lines.append("  install  online: pip fetches the dependencies on the device at install time "
                         "(--offline-wheels ships them)")
        lines += [f"  on the Pi: tar -xzf {self.path.name} && sudo ./{self.folder}/install.sh",
                  f"  or flash: edgesplit flash IMAGE.img --device-package {self.path}"]
        return "\n".join(lines)


# --------------------------------------------------------------------------- wheels

def build_wheel(out_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Build edgesplit's wheel from a checkout (this one by default) into ``out_dir``.

    The sources are copied to a temporary directory first so that the build
    leaves nothing (``build/``, ``*.egg-info``) in the checkout others work in.
    """
    src = Path(source) if source is not None else PROJECT_ROOT
    if not (src / "setup.cfg").is_file() and not (src / "pyproject.toml").is_file():
        raise UsageError(f"{src} is not an edgesplit checkout (no setup.cfg / pyproject.toml): the device package "
                         f"ships edgesplit as a wheel built from its source",
                         fix="run `edgesplit bundle device` from a git checkout of edgesplit installed with "
                             "pip install -e .")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")
    with tempfile.TemporaryDirectory(prefix="edgesplit-wheel-") as tmp:
        t = Path(tmp) / "src"
        t.mkdir()
        for name in _PROJECT_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, t / name)
        for name in _PROJECT_DIRS:
            if (src / name).is_dir():
                shutil.copytree(src / name, t / name, ignore=ignore)
        before = set(out.glob("edgesplit-*.whl"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-q", "-w", str(out), str(t)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UsageError(f"building the edgesplit wheel failed:\n{(proc.stderr or proc.stdout).strip()[-2000:]}",
                             fix="pip install setuptools wheel (the build runs without network and isolation)")
    made = sorted(set(out.glob("edgesplit-*.whl")) - before) or sorted(out.glob("edgesplit-*.whl"))
    if not made:
        raise UsageError("pip wheel reported success but wrote no edgesplit wheel", fix="run it by hand to see why")
    return made[-1]


def wheel_requirements(wheel: str | os.PathLike, extra: str = "device") -> tuple[list[str], list[str]]:
    """(requirements of the wheel + its ``extra``, without the interpreter; interpreter requirements)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8")
    reqs, interp = [], []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        spec, _, marker = req.partition(";")
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if m and m.group(1) != extra:
            continue
        # drop the extra clause; keep the rest of the marker (platform conditions)
        rest = re.sub(r"""(\band\s+)?extra\s*==\s*["'][^"']+["'](\s+and\b)?""", "", marker).strip()
        rest = re.sub(r"^\(\s*(.*?)\s*\)$", r"\1", rest)
        name = re.split(r"[\s<>=!~\[;(]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")
        full = spec.strip() + (f"; {rest}" if rest else "")
        (interp if name in INTERPRETER_PACKAGES else reqs).append(full)
    return sorted(set(reqs)), interp


def platform_tags(platform: str, python_version: str) -> list[str] | None:
    """pip ``--platform`` values for a target; None for ``native`` (this machine's own tags).

    pip does not widen ``manylinux_2_X`` to older glibc versions by itself, and
    ai-edge-litert's aarch64 wheels are ``manylinux_2_27``: every tag up to the
    target OS's glibc is listed.
    """
    if platform == "native":
        return None
    if platform in ("aarch64", "arm64", "x86_64"):
        arch = "aarch64" if platform in ("aarch64", "arm64") else "x86_64"
        top = _GLIBC_FOR_PYTHON.get(python_version, 36)
        return [f"manylinux_2_{m}_{arch}" for m in range(top, 16, -1)] + [f"manylinux2014_{arch}",
                                                                          f"linux_{arch}"]
    if re.fullmatch(r"[a-z0-9_]+", platform):
        return [platform]
    raise UsageError(f"unknown wheel platform {platform!r}",
                     fix="use aarch64 (64-bit Raspberry Pi OS), x86_64, native, or a pip platform tag such as "
                         "manylinux_2_36_aarch64")


def _arch_of(platform: str, tags: list[str] | None) -> str:
    if tags is None:
        import platform as _platform

        return _platform.machine()
    for arch in ("aarch64", "x86_64", "armv7l"):
        if any(t.endswith(arch) for t in tags):
            return arch
    return platform


def _cache_root() -> Path:
    base = os.environ.get("EDGESPLIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgesplit")
    return Path(base) / "wheels"


def _pip_download(requirements: Sequence[str], dest: Path, *, tags: list[str] | None, python_version: str,
                  cache: Path, constraints: Path | None, offline: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
           "-d", str(dest), "--find-links", str(cache)]
    if tags is not None:
        for t in tags:
            cmd += ["--platform", t]
        cmd += ["--python-version", python_version, "--implementation", "cp"]
    if offline:
        cmd.append("--no-index")
    if constraints is not None:
        cmd += ["-c", str(constraints)]
    cmd += list(requirements)
    log.debug("%s", shlex.join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True)


def download_wheels(requirements: Sequence[str], dest: str | os.PathLike, *, platform: str = "aarch64",
                    python_version: str = "3.11", constraints: str | os.PathLike | None = None,
                    cache: str | os.PathLike | None = None) -> list[Path]:
    """Every wheel ``requirements`` need on the target, into ``dest``; returns the files.

    The cache is tried first with ``--no-index`` (no network at all); only what it
    lacks is downloaded, and kept there for the next package.
    """
    tags = platform_tags(platform, python_version)
    if tags is None:
        python_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        key = f"native-{sysconfig.get_platform()}-py{python_version}"
    else:
        key = f"{_arch_of(platform, tags)}-py{python_version}"
    cache_dir = Path(cache) if cache is not None else _cache_root() / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgesplit-wheels-") as tmp:
        got = Path(tmp)
        cons = Path(constraints) if constraints else None
        proc = _pip_download(requirements, got, tags=tags, python_version=python_version, cache=cache_dir,
                             constraints=cons, offline=True)
        if proc.returncode != 0:
            log.info("fetching wheels for %s from the package index", key)
            for f in got.iterdir():
                f.unlink()
            proc = _pip_download(requirements, got, tags=tags, python_version=python_version, cache=cache_dir,
                                 constraints=cons, offline=False)
        if proc.returncode != 0:
            err = "\n".join(line for line in (proc.stderr or proc.stdout).splitlines()
                            if not line.startswith("WARNING: Location"))
            raise UsageError(f"pip could not fetch wheels of {', '.join(requirements)} for {platform} / Python "
                             f"{python_version}:\n{err.strip()[-1500:]}",
                             fix="check the network (PyPI), the --python-version of the target (3.11 Bookworm, "
                                 "3.13 Trixie), or try --interpreter tflite-runtime")
        files = sorted(got.glob("*.whl"))
        non_wheels = [f.name for f in got.iterdir() if f.suffix != ".whl"]
        if non_wheels:
            raise UsageError(f"pip fetched source archives ({', '.join(non_wheels)}), which a Pi would have to "
                             f"compile", fix="pin versions that have wheels for the target (--constraint)")
        out = []
        for f in files:
            if not (cache_dir / f.name).exists():
                shutil.copy2(f, cache_dir / f.name)
            shutil.copy2(f, dest / f.name)
            out.append(dest / f.name)
    return out


# --------------------------------------------------------------------------- rendering

def render_unit(*, password: bool, ca: bool, key: bool, inputs: Sequence[str],
                state_dir: str = INSTALL_PATHS["state_dir"], fleet_key: bool = False) -> str:
    """The device's systemd unit: LoadCredential= for what is shipped, write access for watched folders."""
    text = (TEMPLATES / UNIT_NAME).read_text()
    cdir = INSTALL_PATHS["credentials"]
    creds = []
    if password:
        creds.append(f"LoadCredential=broker-password:{cdir}/password")
    if ca:
        creds.append(f"LoadCredential=broker-ca:{cdir}/ca.crt")
    if key:
        creds.append(f"LoadCredential=frame-key:{cdir}/frame.key")
    if fleet_key:       # the fleet's public key: signed bundle updates (docs/fleet.md)
        creds.append(f"LoadCredential=fleet-key:{cdir}/fleet.pub")
    rw = []
    home = False
    for src in inputs:
        if src == "camera" or src.startswith("camera:"):
            continue
        folder = src
        if any(ch in src for ch in "*?["):
            folder = os.path.dirname(src.split("*")[0].split("?")[0].split("[")[0]) or "/"
        if folder == state_dir or folder.startswith(state_dir + "/"):
            continue
        rw.append(folder)
        home = home or folder.startswith(("/home/", "/root/", "/run/user/"))
    text = text.replace("@@LOAD_CREDENTIALS@@", "\n".join(creds) if creds else "# (no credentials: anonymous broker)")
    text = text.replace("@@PROTECT_HOME@@", "ProtectHome=no" if home else "ProtectHome=yes")
    text = text.replace("@@READ_WRITE_PATHS@@",
                        ("ReadWritePaths=" + " ".join(f"-{p}" for p in rw)) if rw else
                        "# (inputs are inside the state directory, which is writable)")
    return text


def _readme(pkg: dict) -> str:
    return f"""edgesplit device package for {pkg['device_id']} (fleet {pkg['fleet']})

Install on 64-bit Raspberry Pi OS (Bookworm or newer):

    tar -xzf {pkg['tarball']}
    sudo ./{pkg['folder']}/install.sh

or write it onto a Raspberry Pi OS image for first boot:

    edgesplit flash IMAGE.img --device-package {pkg['tarball']}

Then:  systemctl status edgesplit-device   journalctl -u edgesplit-device -f   sudo edgesplit doctor
Images dropped into /var/lib/edgesplit/inbox/ are sent; results go to /var/lib/edgesplit/results.jsonl.

A local test target (no apt, no user, no systemd; it says what it skipped):

    ./install.sh --local --prefix /tmp/target

This package holds the device's broker password: keep it private, delete it once installed.
"""


# --------------------------------------------------------------------------- the package

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes, mode: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = mtime
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def build_device_package(bundle: str | os.PathLike, out: str | os.PathLike, *, config: str | os.PathLike | None = None,
                         broker: str | None = None, device_id: str | None = None, fleet: str | None = None,
                         credentials: str | os.PathLike | None = None, key: str | os.PathLike | None = None,
                         inputs: Sequence[str] | None = None, offline_wheels: bool = False,
                         wheel_platform: str = "aarch64", python_version: str = "3.11", interpreter: str = "auto",
                         constraints: Sequence[str] = (), wheel_cache: str | os.PathLike | None = None
                         ) -> DevicePackage:
    """Write a device package for one device (see the module docstring); returns what was written.

    The device config comes from ``config`` (a file) and/or the keyword arguments,
    which win; broker URL, device id and fleet default to the ``broker.json`` of the
    ``credentials`` directory that ``edgesplit broker config`` wrote for the device.
    """
    t0 = time.monotonic()
    from device.config import dump_config, load_config, parse_config
    from device.credentials import find_device_dir, read_credentials
    from protocol import topics
    from protocol.manifest import MANIFEST_NAME, load_bundle

    out = Path(out)
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise UsageError(f"--out {out} should end in .tar.gz", fix=f"e.g. --out {out.stem or 'pi'}.tar.gz")
    if interpreter not in ("auto",) + INTERPRETER_PACKAGES:
        raise UsageError(f"unknown interpreter {interpreter!r}", fix="use auto, ai-edge-litert or tflite-runtime")
    if not re.fullmatch(r"3\.\d{1,2}", python_version):
        raise UsageError(f"--python-version {python_version!r} is not like 3.11", fix="3.11 (Bookworm), 3.13 (Trixie)")
    b = load_bundle(bundle)

    # --- the configuration: file, then credentials' broker.json, then flags
    raw: dict = {}
    if config is not None:
        base = load_config(config).to_dict()     # validates it
        raw = {k: v for k, v in base.items()}
    cdir = find_device_dir(credentials, device_id) if credentials is not None else None
    # the device's own reader: what the package ships is what the device would have read there
    found, info = read_credentials(cdir, error=UsageError) if cdir is not None else (None, {})
    broker_section = dict(raw.get("broker", {}))
    dev = device_id or raw.get("device_id") or info.get("device_id") or info.get("username")
    if info.get("device_id") and device_id and info["device_id"] != device_id:
        raise UsageError(f"--device-id {device_id} but the credentials in {cdir} are for {info['device_id']}",
                         fix=f"pass --credentials <out>/devices/{device_id}, or drop --device-id")
    if not dev:
        raise UsageError("no device id", fix="pass --device-id ID (or --credentials from `edgesplit broker config`)")
    topics.check_id(dev, "device id")
    fl = fleet or raw.get("fleet") or info.get("fleet") or "default"
    url = broker or broker_section.get("url") or info.get("broker_url")
    if not url:
        raise UsageError("no broker URL", fix="pass --broker mqtts://host:8883 (or --credentials from "
                                              "`edgesplit broker config`)")
    from protocol.mqtt.url import parse_url

    parsed = parse_url(url)
    url_password = parsed.password
    if url_password is not None or parsed.ca:
        # secrets and local file paths do not belong in a config every user can read: strip them
        url = str(dataclasses.replace(parsed, username=None, password=None))
        if parsed.protocol != "3.1.1":
            broker_section["protocol"] = parsed.protocol
    if parsed.username and not broker_section.get("username") and parsed.username != dev:
        broker_section["username"] = parsed.username
    if info.get("username") and info["username"] != dev:
        broker_section["username"] = info["username"]
    if info.get("client_id"):
        broker_section.setdefault("client_id", info["client_id"])
    broker_section["url"] = url

    secrets: dict[str, bytes] = {}
    if url_password is not None:
        secrets["password"] = url_password.encode()
    if found is not None:
        if found.password is not None:
            secrets["password"] = found.password.encode()
        if found.ca_path is not None:
            secrets["ca.crt"] = Path(found.ca_path).read_bytes()
        if (Path(cdir) / "fleet.pub").is_file():      # `edgesplit broker config` gives every device the fleet's key
            secrets["fleet.pub"] = (Path(cdir) / "fleet.pub").read_bytes()
    if parsed.ca:
        secrets["ca.crt"] = Path(parsed.ca).read_bytes()
    if key is not None:
        kp = Path(key)
        if not kp.is_file():
            raise UsageError(f"frame key file {kp} does not exist", fix="make one with protocol.signing.write_key")
        from protocol import signing

        signing.load_key(str(kp))                # a valid key?
        secrets["frame.key"] = kp.read_bytes()
    if url.startswith("mqtts://") and "ca.crt" not in secrets:
        log.info("no CA certificate for %s: the device trusts its system store", url)

    inputs_section = dict(raw.get("inputs", {}))
    if inputs is not None:
        inputs_section["sources"] = list(inputs)
    agent_section = dict(raw.get("agent", {}))
    agent_section["key_file"] = "frame.key" if "frame.key" in secrets else ""
    broker_section["credentials"] = INSTALL_PATHS["credentials"]
    broker_section["password_file"] = "password" if "password" in secrets else ""
    broker_section["ca_file"] = "ca.crt"
    # the unit's StateDirectory= and hardening assume the standard places
    final = {"device_id": dev, "fleet": fl, "bundle": INSTALL_PATHS["bundle"], "state_dir": INSTALL_PATHS["state_dir"],
             "broker": broker_section, "inputs": inputs_section, "agent": agent_section}
    final = {k: v for k, v in final.items() if v != {}}
    for s in inputs_section.get("sources") or ():
        if isinstance(s, str) and not (s == "camera" or s.startswith("camera:") or os.path.isabs(s)):
            raise UsageError(f"input {s!r} is a relative path; on the device it must be absolute",
                             fix="e.g. --inputs /var/lib/edgesplit/inbox or camera")
    cfg = parse_config(final, where="the device config", base_dir=Path("/"))
    srcs = list(cfg.inputs)
    camera = bool(cfg.cameras)

    folder = f"edgesplit-device-{dev}"
    with tempfile.TemporaryDirectory(prefix="edgesplit-pkg-") as tmp:
        wheels_dir = Path(tmp) / "wheels"
        whl = build_wheel(wheels_dir)
        version = whl.name.split("-")[1]
        reqs, interp_reqs = wheel_requirements(whl)
        cons_lines = [c.strip() for c in constraints if c.strip()]
        pi_target = offline_wheels and wheel_platform in ("aarch64", "arm64")
        if pi_target and python_version in APT_NUMPY and not any(
                re.match(r"numpy\b", c, re.IGNORECASE) for c in cons_lines):
            cons_lines.append(f"numpy=={APT_NUMPY[python_version]}")
        (wheels_dir / "requirements.txt").write_text(
            "# edgesplit's own and its device extra's requirements, without the TFLite interpreter\n"
            "# (install.sh installs ai-edge-litert, or tflite-runtime when it cannot)\n" + "\n".join(reqs) + "\n")
        (wheels_dir / "constraints.txt").write_text("# pip constraints for the device\n" + "".join(
            c + "\n" for c in cons_lines))
        shipped_interp = interpreter
        tags = None
        if offline_wheels:
            tags = platform_tags(wheel_platform, python_version)
            if tags is None:
                python_version = f"{sys.version_info[0]}.{sys.version_info[1]}"
            candidates = [interpreter] if interpreter != "auto" else list(INTERPRETER_PACKAGES)
            last: UsageError | None = None
            for cand in candidates:
                try:
                    download_wheels([*reqs, cand], wheels_dir, platform=wheel_platform, python_version=python_version,
                                    constraints=wheels_dir / "constraints.txt", cache=wheel_cache)
                    shipped_interp = cand
                    last = None
                    break
                except UsageError as exc:
                    log.warning("no wheels with %s for %s / Python %s%s", cand, wheel_platform, python_version,
                                "; trying the next interpreter" if cand != candidates[-1] else "")
                    last = exc
            if last is not None:
                raise last

        files: dict[str, bytes] = {}
        modes: dict[str, int] = {}

        def put(name: str, data: bytes, mode: int = 0o644) -> None:
            files[name] = data
            modes[name] = mode

        for name in sorted([MANIFEST_NAME, *b.manifest.files]):
            put(f"bundle/{name}", (b.root / name).read_bytes())
        for name, data in sorted(secrets.items()):
            put(f"credentials/{name}", data, 0o600 if name not in ("ca.crt", "fleet.pub") else 0o644)
        header = (f"edgesplit device configuration for {dev} (fleet {fl}), written by `edgesplit bundle device`.\n"
                  f"Installed as {INSTALL_PATHS['config']}; check it with: sudo edgesplit doctor\n"
                  "The password, CA and frame key are not here: they are in /etc/edgesplit/credentials (root only)\n"
                  "and reach the service through systemd's LoadCredential=.")
        put("device.toml", dump_config(cfg, header=header).encode())
        put(f"systemd/{UNIT_NAME}", render_unit(password="password" in secrets, ca="ca.crt" in secrets,
                                                key="frame.key" in secrets, inputs=srcs,
                                                fleet_key="fleet.pub" in secrets).encode())
        put("install.sh", (TEMPLATES / "install.sh").read_bytes(), 0o755)
        wheel_names = []
        for f in sorted(wheels_dir.iterdir()):
            put(f"wheels/{f.name}", f.read_bytes())
            if f.suffix == ".whl":
                wheel_names.append(f.name)
        arch = _arch_of(wheel_platform, tags) if offline_wheels else ""
        env = {"EDGESPLIT_PKG_FORMAT": "1", "EDGESPLIT_PKG_DEVICE_ID": dev, "EDGESPLIT_PKG_FLEET": fl,
               "EDGESPLIT_PKG_BUNDLE_ID": b.bundle_id, "EDGESPLIT_PKG_VERSION": version,
               "EDGESPLIT_PKG_OFFLINE": "1" if offline_wheels else "0",
               "EDGESPLIT_PKG_WHEEL_ARCH": arch, "EDGESPLIT_PKG_WHEEL_PYTHON": python_version if offline_wheels else "",
               "EDGESPLIT_PKG_INTERPRETER": shipped_interp, "EDGESPLIT_PKG_CAMERA": "1" if camera else "0"}
        put("package.env", ("# read by install.sh\n" + "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
                            ).encode())
        tarball = out.name
        put("README.txt", _readme({"device_id": dev, "fleet": fl, "tarball": tarball, "folder": folder}).encode())
        sums = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
        meta = {"format": 1, "device_id": dev, "fleet": fl, "broker_url": url, "bundle_id": b.bundle_id,
                "model": b.manifest.model, "cut": b.manifest.cut, "edgesplit_version": version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "offline": offline_wheels, "wheel_platform": wheel_platform if offline_wheels else None,
                "python_version": python_version if offline_wheels else None, "interpreter": shipped_interp,
                "inputs": srcs, "camera": camera, "credentials": sorted(secrets), "files": sums}
        put("package.json", (json.dumps(meta, indent=2) + "\n").encode())
        sums = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
        put("SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in sums.items()).encode())

        out.parent.mkdir(parents=True, exist_ok=True)
        mtime = int(os.environ.get("SOURCE_DATE_EPOCH") or time.time())
        fd, tmp_out = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as raw_f, tarfile.open(fileobj=raw_f, mode="w:gz", compresslevel=6,
                                                            format=tarfile.PAX_FORMAT) as tar:
                dirs = sorted({str(Path(n).parent) for n in files if "/" in n})
                _tar_add_dir(tar, folder, mtime)
                for d in dirs:
                    _tar_add_dir(tar, f"{folder}/{d}", mtime, 0o700 if d == "credentials" else 0o755)
                for name in sorted(files):
                    _tar_add(tar, f"{folder}/{name}", files[name], modes[name], mtime)
            os.replace(tmp_out, out)
        except BaseException:
            if os.path.exists(tmp_out):
                os.unlink(tmp_out)
            raise
    pkg = DevicePackage(path=out, folder=folder, device_id=dev, fleet=fl, broker_url=url, bundle_id=b.bundle_id,
                        edgesplit_version=version, files=sums, credentials=tuple(sorted(secrets)), inputs=tuple(srcs),
                        camera=camera, offline=offline_wheels,
                        wheel_platform=(wheel_platform if offline_wheels else None),
                        python_version=python_version if offline_wheels else None, interpreter=shipped_interp,
                        wheels=tuple(wheel_names), bytes=out.stat().st_size, seconds=time.monotonic() - t0)
    log.debug("wrote %s in %.1f s", out, pkg.seconds)
    return pkg


def _tar_add_dir(tar: tarfile.TarFile, name: str, mtime: int, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = mtime
    info.uname = info.gname = "root"
    tar.addfile(info)
