"""Device targets for the hardware-in-the-loop suite.

A target is a machine the device role is installed on and run on, driven from
here.  Two kinds:

* :class:`LocalTarget` — a Pi-like target on this machine: the device package's own
  ``install.sh --local`` builds a venv from the package's wheels alone (Raspberry Pi
  OS's dependency set: ``numpy<2``, ``tflite-runtime`` 2.14, no TensorFlow) inside a
  network namespace that can reach nothing but the harness (so the install is
  provably offline), and the device process runs there on one CPU (``taskset -c 0``).
  Its disk is ``$EDGESPLIT_CACHE/hil-venv/<hash of the install inputs>/target``: like a
  real Pi that is reinstalled, a second install reuses the venv (:func:`claim_cache`).
* :class:`SshTarget` — ``ssh://user@host[:port]?dir=D&identity=KEY`` (a real Raspberry
  Pi): the package is copied over SSH, installed with the same script in local mode
  under ``D`` (default ``~/edgesplit-hil``), the device run there, results collected.

Both give the same surface: ``platform()``, ``install(package)``, ``start_device()``
(a :class:`DeviceProcess`: ``pid``, ``kill(sig)``, ``wait()``, ``peak_rss_kb()``),
``drop_images(paths)`` (all at once: a folder renamed into the inbox), ``results()``,
``python(code)``, ``doctor()``, ``close()``, and ``harness_address``: the address of this machine as the target sees it (the
relay to the broker listens there).
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import platform as _platform
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RESULTS = "results.jsonl"


def target_url() -> str:
    """``EDGESPLIT_HIL_TARGET``: ``local`` (default) or ``ssh://user@host[:port]?dir=D&identity=KEY``."""
    return os.environ.get("EDGESPLIT_HIL_TARGET", "local").strip() or "local"


def need_netns() -> None:
    """Skip (with the reason) where a network namespace cannot be made: not root, no iproute2."""
    import pytest

    from bench.netlink import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"HIL: {reason}")


def cache_root() -> Path:
    return Path(os.environ.get("EDGESPLIT_CACHE") or Path.home() / ".cache" / "edgesplit")


# --------------------------------------------------------------------------- install results

@dataclasses.dataclass
class InstallResult:
    """What ``install.sh`` did on a target (its output parsed)."""

    seconds: float
    returncode: int
    output: str
    cold: bool                         # the venv was made anew (False: an earlier install's venv was reused)
    offline: bool                      # the script said it installed offline, from the package's wheels
    skipped: list[str]                 # Pi-only steps the script said it skipped
    interpreter: str                   # e.g. "tflite_runtime 2.14.0"
    where: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @classmethod
    def parse(cls, output: str, returncode: int, seconds: float, cold: bool, where: str = "") -> "InstallResult":
        skipped = re.findall(r"^install\.sh: skipped \(local target\): (.+)$", output, flags=re.M)
        m = re.search(r"^install\.sh: interpreter: (.+)$", output, flags=re.M)
        done = re.search(r"^install\.sh: done in .*?, (online|offline) install$", output, flags=re.M)
        return cls(seconds=seconds, returncode=returncode, output=output, cold=cold,
                   offline=bool(done and done.group(1) == "offline"), skipped=skipped,
                   interpreter=m.group(1).strip() if m else "", where=where)


def install_key(package: Path, python_version: str, arch: str) -> str:
    """Hash of what decides the venv's content: the dependency wheels, requirements, pins, Python, arch."""
    h = hashlib.sha256(f"{python_version} {arch}\n".encode())
    with tarfile.open(package, "r:gz") as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            name = m.name.split("/", 1)[-1]
            if name.startswith("wheels/") and not name.startswith("wheels/edgesplit-"):
                h.update(f"{name} {m.size}\n".encode())
                if name.endswith(".txt"):
                    h.update(tar.extractfile(m).read())
            elif name == "package.env":
                env = tar.extractfile(m).read().decode()
                h.update("".join(line for line in env.splitlines(keepends=True)
                                 if line.startswith(("EDGESPLIT_PKG_INTERPRETER", "EDGESPLIT_PKG_WHEEL"))).encode())
    return h.hexdigest()[:16]


def claim_cache(key: str, fallback: Path):
    """``$EDGESPLIT_CACHE/hil-venv/<key>`` (a target's disk whose venv outlives a run), locked for this run.

    Returns (directory, the lock's file object); (``fallback``, None) when another run
    holds it.  A disk whose last install never finished is wiped first.
    """
    root = cache_root() / "hil-venv"
    root.mkdir(parents=True, exist_ok=True)
    fh = open(root / f"{key}.lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        log.warning("the cached target disk %s is in use by another run: using a private one", key)
        return Path(fallback), None
    disk = root / key
    if disk.exists() and not (disk / ".installed").is_file():
        shutil.rmtree(disk)
    disk.mkdir(parents=True, exist_ok=True)
    return disk, fh


def mark_installed(disk: Path) -> None:
    """Record that an install on this cached disk finished (its venv is whole)."""
    (Path(disk) / ".installed").write_text(json.dumps({"installed": time.time()}) + "\n")


def package_folder(package: Path) -> str:
    with tarfile.open(package, "r:gz") as tar:
        first = tar.next()
        return first.name.split("/", 1)[0]


# --------------------------------------------------------------------------- device processes

class DeviceProcess:
    """A device service process on a target; ``peak_rss_kb`` remembers the highest VmHWM read."""

    pid: int
    peak_kb: int = 0

    def alive(self) -> bool:
        raise NotImplementedError

    def kill(self, sig: int = signal.SIGKILL) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it still runs after ``timeout`` s."""
        raise NotImplementedError

    def _status(self) -> str:
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        raise NotImplementedError

    def peak_rss_kb(self) -> int:
        """VmHWM (peak resident set) from /proc/<pid>/status while it runs; the highest value seen so far."""
        try:
            text = self._status()
        except (OSError, subprocess.SubprocessError):
            text = ""
        m = re.search(r"^VmHWM:\s+(\d+)\s+kB", text, flags=re.M)
        if m:
            self.peak_kb = max(self.peak_kb, int(m.group(1)))
        return self.peak_kb


class _LocalProcess(DeviceProcess):
    def __init__(self, popen: subprocess.Popen, log_path: Path):
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        self.peak_kb = 0

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _status(self) -> str:
        return Path(f"/proc/{self.pid}/status").read_text()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --------------------------------------------------------------------------- the targets

class Target:
    kind = "?"
    harness_address = ""
    description = ""
    prefix: str = ""                  # the install prefix on the target

    @property
    def state_dir(self) -> str:
        return f"{self.prefix}/var/lib/edgesplit"

    @property
    def config_path(self) -> str:
        return f"{self.prefix}/etc/edgesplit/device.toml"

    @property
    def venv_python(self) -> str:
        return f"{self.prefix}/opt/edgesplit/venv/bin/python"

    def platform(self) -> tuple[str, str]:
        """(machine, "X.Y" of the target's python3)."""
        raise NotImplementedError

    def install(self, package: Path) -> InstallResult:
        raise NotImplementedError

    def start_device(self) -> DeviceProcess:
        raise NotImplementedError

    def drop_images(self, paths: Sequence[Path]) -> None:
        raise NotImplementedError

    def _read_results(self) -> str:
        raise NotImplementedError

    def results(self) -> list[dict]:
        """Every row of the device's result log (rotated part first)."""
        # the device may be writing right now: a last line without its newline is not whole yet
        lines = self._read_results().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def python(self, code: str) -> str:
        """Run ``code`` with the target venv's Python; its stdout."""
        raise NotImplementedError

    def doctor(self) -> tuple[int, str]:
        """``python -m device.doctor --config <installed config>`` on the target: (exit code, output)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalTarget(Target):
    """The Pi-like target in a network namespace of ``link`` (a :class:`bench.netlink.ShapedLink`)."""

    kind = "local"

    def __init__(self, link, workdir: Path, *, cpus: str = "0", python: str = "/usr/bin/python3"):
        self.link = link
        self.workdir = Path(workdir)
        self.cpus = cpus
        self.python3 = python
        self.harness_address = link.host_addr
        self.description = (f"local Pi-like target: namespace {link.name} ({link.ns_addr}), CPU {cpus}, "
                            f"{python}")
        self.prefix = ""
        self._lock_fh = None
        self._procs: list[_LocalProcess] = []
        self._n = 0
        self._home = self.workdir / "home"
        self._home.mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict:
        # what a fresh login on a Pi has: no PYTHONPATH to this checkout, no pip index settings
        return {"PATH": CLEAN_PATH, "HOME": str(self._home), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
                "PIP_CONFIG_FILE": "/dev/null", "TMPDIR": str(self._home)}

    def platform(self) -> tuple[str, str]:
        out = subprocess.run([self.python3, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return _platform.machine(), out

    def install(self, package: Path) -> InstallResult:
        arch, pyver = self.platform()
        disk, self._lock_fh = claim_cache(install_key(package, pyver, arch), self.workdir / "disk")
        prefix = disk / "target"
        # a fresh "disk" apart from the venv: last run's state, bundle and config go
        for sub in ("var", "etc"):
            shutil.rmtree(prefix / sub, ignore_errors=True)
        cold = not (prefix / "opt/edgesplit/venv/bin/python").exists()
        self.prefix = str(prefix)
        unpacked = self.workdir / f"unpacked-{self._n}"
        self._n += 1
        unpacked.mkdir(parents=True)
        # unpack and install the way a user does on the Pi, inside the namespace (no route out)
        self.link.run(["tar", "-xzf", str(package), "-C", str(unpacked)])
        script = unpacked / package_folder(package) / "install.sh"
        t0 = time.monotonic()
        proc = self.link.run(["env", "-i", *[f"{k}={v}" for k, v in self._env().items()], "bash", str(script),
                              "--local", "--prefix", self.prefix, "--offline"],
                             cpus=self.cpus, check=False, timeout=900, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - t0
        result = InstallResult.parse(proc.stdout, proc.returncode, seconds, cold,
                                     where=f"{self.prefix} (in namespace {self.link.name}, CPU {self.cpus})")
        if result.ok and self._lock_fh is not None:
            mark_installed(disk)
        return result

    def start_device(self) -> _LocalProcess:
        log_path = self.workdir / f"device-{len(self._procs)}.log"
        fh = open(log_path, "wb")
        # cwd: the target's own tree, so nothing of this checkout is importable
        p = self.link.popen([self.venv_python, "-m", "edgesplit", "device", "serve", "--config", self.config_path],
                            cpus=self.cpus, cwd=self.prefix, env=self._env(), stdout=fh, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
        fh.close()
        proc = _LocalProcess(p, log_path)
        self._procs.append(proc)
        return proc

    def drop_images(self, paths: Sequence[Path]) -> None:
        inbox = Path(self.state_dir) / "inbox"
        stamp = time.monotonic_ns()
        incoming = inbox / f".incoming-{stamp}"       # hidden: the device's scanner skips it
        incoming.mkdir(parents=True)
        for p in paths:
            shutil.copy2(p, incoming / Path(p).name)
        os.rename(incoming, inbox / f"drop-{stamp}")   # the whole set appears at once, in one scan

    def _read_results(self) -> str:
        text = ""
        for name in (RESULTS + ".1", RESULTS):
            try:
                text += (Path(self.state_dir) / name).read_text()
            except FileNotFoundError:
                pass
        return text

    def python(self, code: str) -> str:
        return self.link.run([self.venv_python, "-c", code], cwd=self.prefix, env=self._env(), cpus=self.cpus).stdout

    def doctor(self) -> tuple[int, str]:
        proc = self.link.run([self.venv_python, "-m", "device.doctor", "--config", self.config_path],
                             cwd=self.prefix, env=self._env(), cpus=self.cpus, check=False, stderr=subprocess.STDOUT)
        return proc.returncode, proc.stdout

    def close(self) -> None:
        for p in self._procs:
            if p.alive():
                p.kill(signal.SIGKILL)
                p.wait(10)
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None


@dataclasses.dataclass(frozen=True)
class SshUrl:
    user: str
    host: str
    port: int
    dir: str
    identity: str | None

    @classmethod
    def parse(cls, url: str) -> "SshUrl":
        u = urllib.parse.urlsplit(url)
        if u.scheme != "ssh" or not u.hostname:
            raise ValueError(f"HIL target {url!r} is not like ssh://user@host[:port][?dir=D&identity=KEY]")
        q = dict(urllib.parse.parse_qsl(u.query))
        unknown = set(q) - {"dir", "identity"}
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} in {url!r}: known are dir, identity")
        return cls(user=urllib.parse.unquote(u.username or os.environ.get("USER", "pi")), host=u.hostname,
                   port=u.port or 22, dir=q.get("dir") or "edgesplit-hil",
                   identity=q.get("identity") or os.environ.get("EDGESPLIT_HIL_SSH_KEY"))

    def __str__(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


class _SshProcess(DeviceProcess):
    def __init__(self, target: "SshTarget", pid: int, log_path: str, rc_path: str):
        self.target = target
        self.pid = pid
        self.log_path = log_path
        self.rc_path = rc_path
        self.peak_kb = 0

    def alive(self) -> bool:
        return self.target.sh(f"kill -0 {self.pid} 2>/dev/null", check=False).returncode == 0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.target.sh(f"kill -{int(sig)} {self.pid} 2>/dev/null || true")

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.target.sh(f"cat {shlex.quote(self.rc_path)} 2>/dev/null || true").stdout.strip()
            if out.lstrip("-").isdigit():
                return int(out)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)

    def _status(self) -> str:
        return self.target.sh(f"cat /proc/{self.pid}/status 2>/dev/null || true").stdout

    def log_tail(self, lines: int = 40) -> str:
        return self.target.sh(f"tail -n {lines} {shlex.quote(self.log_path)} 2>/dev/null || true").stdout


class SshTarget(Target):
    """A device reached over SSH (a real Raspberry Pi); see the module docstring."""

    kind = "ssh"

    def __init__(self, url: str, workdir: Path):
        self.url = SshUrl.parse(url)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.known_hosts = self.workdir / "known_hosts"
        # one SSH connection reused by every command (a poll costs a round trip, not a handshake);
        # a short directory: a unix socket path must stay under ~100 characters
        self._control_dir = tempfile.mkdtemp(prefix="es-ssh-", dir="/tmp")
        self._procs: list[_SshProcess] = []
        self.description = f"{self.url} (dir {self.url.dir})"
        home_dir = self.sh(f"mkdir -p {self._q(self.url.dir)} && cd {self._q(self.url.dir)} && pwd").stdout.strip()
        self.dir = home_dir
        self.prefix = f"{home_dir}/target"
        # the address of this machine as the target sees it: where the relay must listen
        conn = self.sh("echo $SSH_CONNECTION").stdout.split()
        if not conn:
            raise RuntimeError(f"{self.url} did not report $SSH_CONNECTION: cannot tell which address of this "
                               f"machine it reaches")
        self.harness_address = conn[0]

    @staticmethod
    def _q(path: str) -> str:
        # keep a leading ~/ expandable by the remote shell
        if path.startswith("~/"):
            return "~/" + shlex.quote(path[2:])
        return shlex.quote(path)

    def ssh_argv(self) -> list[str]:
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "ConnectTimeout=15",
                "-o", "ServerAliveInterval=15", "-o", "LogLevel=ERROR", "-o", "ControlMaster=auto",
                "-o", f"ControlPath={self._control_dir}/%C", "-o", "ControlPersist=120", "-p", str(self.url.port)]
        if self.url.identity:
            argv += ["-i", self.url.identity, "-o", "IdentitiesOnly=yes"]
        return argv + [f"{self.url.user}@{self.url.host}"]

    def sh(self, command: str, *, check: bool = True, timeout: float = 120.0, stdin=None,
           input: bytes | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command on the target."""
        kw = {"input": input} if input is not None else {"stdin": stdin if stdin is not None else subprocess.DEVNULL}
        proc = subprocess.run(self.ssh_argv() + ["--", command], capture_output=True, timeout=timeout,
                              text=text if input is None else False, **kw)
        if check and proc.returncode != 0:
            err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
            raise RuntimeError(f"on {self.url}: `{command[:200]}` failed (exit {proc.returncode}): "
                               f"{err.strip()[-2000:]}")
        return proc

    def platform(self) -> tuple[str, str]:
        out = self.sh("uname -m; python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'").stdout.split()
        return out[0], out[1]

    def install(self, package: Path) -> InstallResult:
        d = shlex.quote(self.dir)
        cold = self.sh(f"test -x {shlex.quote(self.venv_python)}", check=False).returncode != 0
        with open(package, "rb") as fh:
            self.sh(f"cat > {d}/package.tar.gz", stdin=fh, timeout=600)
        folder = package_folder(package)
        t0 = time.monotonic()
        # last run's state goes; the venv stays (a reinstall, as on a Pi in the field)
        proc = self.sh(f"cd {d} && rm -rf unpacked target/var target/etc && mkdir unpacked && "
                       f"tar -xzf package.tar.gz -C unpacked && "
                       f"bash unpacked/{shlex.quote(folder)}/install.sh --local --prefix {shlex.quote(self.prefix)} "
                       f"--offline 2>&1", check=False, timeout=1800)
        return InstallResult.parse(proc.stdout, proc.returncode, time.monotonic() - t0, cold,
                                   where=f"{self.url}:{self.prefix}")

    def start_device(self) -> _SshProcess:
        n = len(self._procs)
        log_path, rc_path, pid_path = (f"{self.dir}/device-{n}.{x}" for x in ("log", "rc", "pid"))
        inner = (f"{shlex.quote(self.venv_python)} -m edgesplit device serve --config {shlex.quote(self.config_path)} "
                 f"& echo $! > {shlex.quote(pid_path)}; wait $!; echo $? > {shlex.quote(rc_path)}")
        # only the detached command may run on: nothing may hold the ssh session's output open
        self.sh(f"rm -f {shlex.quote(rc_path)} {shlex.quote(pid_path)}; cd {shlex.quote(self.prefix)} || exit 1; "
                f"nohup sh -c {shlex.quote(inner)} > {shlex.quote(log_path)} 2>&1 < /dev/null &")
        deadline = time.monotonic() + 30
        while True:
            out = self.sh(f"cat {shlex.quote(pid_path)} 2>/dev/null || true").stdout.strip()
            if out.isdigit():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the device did not start on {self.url}: see {log_path} there")
            time.sleep(0.2)
        proc = _SshProcess(self, int(out), log_path, rc_path)
        self._procs.append(proc)
        return proc

    def drop_images(self, paths: Sequence[Path]) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for p in paths:
                tar.add(str(p), arcname=Path(p).name)
        inbox = f"{self.state_dir}/inbox"
        stamp = time.monotonic_ns()
        incoming = f"{inbox}/.incoming-{stamp}"
        q = shlex.quote
        # unpacked out of sight, then the whole set appears at once, in one scan
        self.sh(f"mkdir -p {q(incoming)} && tar -xf - -C {q(incoming)} && mv {q(incoming)} "
                f"{q(f'{inbox}/drop-{stamp}')}", input=buf.getvalue(), timeout=300)

    def _read_results(self) -> str:
        s = shlex.quote(self.state_dir)
        return self.sh(f"cat {s}/{RESULTS}.1 {s}/{RESULTS} 2>/dev/null || true").stdout

    def python(self, code: str) -> str:
        return self.sh(f"cd {shlex.quote(self.prefix)} && {shlex.quote(self.venv_python)} -c {shlex.quote(code)}"
                       ).stdout

    def doctor(self) -> tuple[int, str]:
        proc = self.sh(f"cd {shlex.quote(self.prefix)} && {shlex.quote(self.venv_python)} -m device.doctor "
                       f"--config {shlex.quote(self.config_path)} 2>&1", check=False)
        return proc.returncode, proc.stdout

    def close(self) -> None:
        for p in self._procs:
            try:
                if p.alive():
                    p.kill(signal.SIGKILL)
            except (RuntimeError, subprocess.SubprocessError):
                log.warning("could not end pid %d on %s", p.pid, self.url)
        # end the shared connection (its master process is ours) and its socket directory
        subprocess.run(self.ssh_argv()[:-1] + ["-O", "exit", f"{self.url.user}@{self.url.host}"],
                       capture_output=True, timeout=30)
        shutil.rmtree(self._control_dir, ignore_errors=True)


def make_ssh_key(directory: Path) -> Path:
    """A fresh ed25519 key pair (no passphrase) in ``directory``; returns the private key's path."""
    key = Path(directory) / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgesplit-hil", "-f", str(key)],
                   check=True, capture_output=True)
    return key


def sshd_binary() -> str | None:
    return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/sbin/sshd") if os.access(p, os.X_OK)),
                                        None)


def start_sshd(link, workdir: Path, authorized_key: Path) -> tuple[object, int]:
    """Run ``sshd -D`` inside ``link``'s namespace on its address, port 22, with a host key made here.

    Only our key is accepted (public-key authentication, no passwords, no PAM).
    Returns (the Popen, port).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = workdir / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True,
                   capture_output=True)
    auth = workdir / "authorized_keys"
    shutil.copy(Path(str(authorized_key) + ".pub"), auth)
    auth.chmod(0o600)
    cfg = workdir / "sshd_config"
    port = 22
    cfg.write_text("\n".join([
        f"ListenAddress {link.ns_addr}", f"Port {port}", f"HostKey {host_key}", f"PidFile {workdir}/sshd.pid",
        f"AuthorizedKeysFile {auth}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "PermitRootLogin prohibit-password",
        "StrictModes no", "X11Forwarding no", "AllowTcpForwarding no", "PrintMotd no", "LogLevel INFO",
        "Subsystem sftp internal-sftp", ""]))
    os.makedirs("/run/sshd", exist_ok=True)       # sshd's privilege-separation directory
    log_fh = open(workdir / "sshd.log", "wb")
    proc = link.popen([sshd_binary(), "-D", "-e", "-f", str(cfg)], stdout=log_fh, stderr=subprocess.STDOUT)
    log_fh.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {(workdir / 'sshd.log').read_text()[-2000:]}")
        probe = link.run(["bash", "-c", f"exec 3<>/dev/tcp/{link.ns_addr}/{port}"], check=False)
        if probe.returncode == 0:
            return proc, port
        time.sleep(0.1)
    raise RuntimeError(f"sshd did not listen on {link.ns_addr}:{port} within 20 s")
