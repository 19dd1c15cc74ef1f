"""install.sh run for real, from the device package alone, offline, on a local target (a temp prefix).

The package is built with this machine's own wheels (``--wheel-platform native``; the
Pi's are aarch64), install.sh runs in local-target mode inside a network namespace with
no network at all (``unshare -n``) and an empty environment, then the installed venv's
doctor and service are run against a real Mosquitto and cloud worker.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.usefixtures("one_wheel_build")]


def _no_network_prefix() -> list[str]:
    """``unshare -n`` when this machine lets us make a network namespace (root does): proof of offline."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def _base_python() -> str:
    """The interpreter under this venv: a Pi builds its venv from /usr/bin/python3, not from another venv."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return base if os.path.exists(base) else shutil.which("python3")


def test_install_offline_from_the_tarball_alone_then_doctor_and_service_work(mosquitto_broker, tiny_bundle_dir,
                                                                              tmp_path):
    from cloud import Registry, Worker
    from deploy.device_package import build_device_package
    from PIL import Image

    pkg = build_device_package(tiny_bundle_dir, tmp_path / "pi.tar.gz", broker=mosquitto_broker.url,
                               device_id="pi-local", fleet="lab", offline_wheels=True, wheel_platform="native")
    assert pkg.offline and any(w.startswith("ai_edge_litert-") for w in pkg.wheels)
    assert any(w.startswith("numpy-") for w in pkg.wheels) and any(w.startswith("paho_mqtt-") for w in pkg.wheels)

    # only the tarball goes to the "device"
    device = tmp_path / "device"
    device.mkdir()
    with tarfile.open(pkg.path) as tar:
        tar.extractall(device, filter="data")
    installer = device / pkg.folder / "install.sh"
    prefix = tmp_path / "target"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
           "PIP_CONFIG_FILE": os.devnull}
    cmd = [*_no_network_prefix(), "bash", str(installer), "--local", "--prefix", str(prefix),
           "--python", _base_python(), "--no-system-site-packages"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    print(f"\ninstall.sh (offline, local target{', no network' if _no_network_prefix() else ''}): "
          f"{seconds:.1f} s", file=sys.stderr)
    (tmp_path / "install-seconds.json").write_text(json.dumps({"seconds": seconds}))

    # it says what it skipped, and that it installed offline
    assert "offline install" in out and "pip: offline" in out
    for skipped in ("apt-get install python3-venv", "creating the system user", "systemctl", "/usr/local/bin"):
        assert any(skipped in line and "skipped" in line for line in out.splitlines()), skipped
    assert "13 ok" in out or "0 FAIL" in out        # the installed doctor ran and passed

    venv_py = prefix / "opt/edgesplit/venv/bin/python"
    site = prefix / "opt/edgesplit/venv/lib"
    probe = subprocess.run([str(venv_py), "-c", "import numpy, paho.mqtt, PIL, ai_edge_litert, device.service; "
                                                "print(numpy.__file__); print(device.service.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    assert all(line.startswith(str(site)) for line in probe.stdout.split()), probe.stdout
    conf = prefix / "etc/edgesplit/device.toml"
    text = conf.read_text()
    assert str(prefix / "opt/edgesplit/bundle") in text and str(prefix / "var/lib/edgesplit") in text
    unit = (prefix / "etc/systemd/system/edgesplit-device.service").read_text()
    assert f"ExecStart={venv_py} -I -m edgesplit device serve --config {conf}" in unit

    # the installed doctor, now with the broker (the test's own network)
    doc = subprocess.run([str(venv_py), "-I", "-m", "device.doctor", "--config", str(conf)], capture_output=True,
                         text=True, timeout=120, env=env, cwd=tmp_path)
    assert doc.returncode == 0, doc.stdout + doc.stderr
    assert "MQTT connect accepted" in doc.stdout

    # the installed service answers images dropped into its inbox
    worker = Worker(Registry.load([tiny_bundle_dir]), mosquitto_broker.url, fleet="lab")
    assert worker.start(wait_connected=10)
    inbox = prefix / "var/lib/edgesplit/inbox"
    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(inbox / f".{i}.png")
        os.replace(inbox / f".{i}.png", inbox / f"{i}.png")
    results = prefix / "var/lib/edgesplit/results.jsonl"
    svc = subprocess.Popen([str(venv_py), "-I", "-m", "edgesplit", "device", "serve", "--config", str(conf)], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and svc.poll() is None:
            if results.exists() and len(results.read_text().splitlines()) >= 5:
                break
            time.sleep(0.1)
        lines = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
        assert len(lines) == 5 and all("error" not in r for r in lines), lines
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(60) == 0
    finally:
        if svc.poll() is None:
            svc.kill()
        worker.stop(drain_timeout=2)

    # running it again is an upgrade: the venv is kept, the config and bundle replaced, still offline
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "-m venv" not in proc.stdout and "offline install" in proc.stdout


def test_install_refuses_a_damaged_package_and_wheels_for_another_python(tiny_bundle_dir, tmp_path):
    from deploy.device_package import build_device_package

    pkg = build_device_package(tiny_bundle_dir, tmp_path / "pi.tar.gz", broker="mqtts://broker.example.org:8883",
                               device_id="pi-x")
    with tarfile.open(pkg.path) as tar:
        tar.extractall(tmp_path / "d", filter="data")
    top = tmp_path / "d" / pkg.folder
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    (top / "bundle" / "head.tflite").write_bytes(b"tampered")
    proc = subprocess.run(["bash", str(top / "install.sh"), "--local", "--prefix", str(tmp_path / "t")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "SHA256SUMS" in proc.stderr and "fix:" in proc.stderr
    assert not (tmp_path / "t").exists()

    # an offline package whose wheels are for the Pi's Python/arch is refused on another, with the command to use
    shutil.rmtree(tmp_path / "d")
    with tarfile.open(pkg.path) as tar:
        tar.extractall(tmp_path / "d", filter="data")
    env_file = top / "package.env"
    text = env_file.read_text().replace("EDGESPLIT_PKG_OFFLINE=0", "EDGESPLIT_PKG_OFFLINE=1")
    text = text.replace("EDGESPLIT_PKG_WHEEL_ARCH=''", "EDGESPLIT_PKG_WHEEL_ARCH=aarch64")
    text = text.replace("EDGESPLIT_PKG_WHEEL_PYTHON=''", "EDGESPLIT_PKG_WHEEL_PYTHON=3.11")
    env_file.write_text(text)
    sums = subprocess.run(["sha256sum", *sorted(p.relative_to(top).as_posix() for p in top.rglob("*")
                                                if p.is_file() and p.name != "SHA256SUMS")],
                          cwd=top, capture_output=True, text=True, check=True).stdout
    (top / "SHA256SUMS").write_text(sums)
    proc = subprocess.run(["bash", str(top / "install.sh"), "--local", "--prefix", str(tmp_path / "t"),
                           "--python", _base_python()], env=env, capture_output=True, text=True, timeout=60)
    if sysconfig.get_platform().endswith("aarch64"):
        pytest.skip("this machine is aarch64: the wheels would fit")
    assert proc.returncode == 1, proc.stdout
    assert "wheels in this package are for Python 3.11 on aarch64" in proc.stderr and "--online" in proc.stderr


def test_pi_package_ships_aarch64_wheels_that_resolve_offline_with_apts_numpy(tiny_bundle_dir, tmp_path):
    """The real target: 64-bit Raspberry Pi OS Bookworm, Python 3.11. No Pi here, so pip itself checks that the
    shipped wheelhouse alone satisfies everything for that platform, with apt's numpy pinned."""
    from deploy.device_package import APT_NUMPY, build_device_package, platform_tags

    pkg = build_device_package(tiny_bundle_dir, tmp_path / "pi.tar.gz", broker="mqtts://broker.example.org:8883",
                               device_id="pi-arm", offline_wheels=True)          # aarch64, 3.11: the defaults
    assert (pkg.wheel_platform, pkg.python_version, pkg.interpreter) == ("aarch64", "3.11", "ai-edge-litert")
    deps = [w for w in pkg.wheels if not w.startswith("edgesplit-")]
    assert any(w.startswith("ai_edge_litert-") and w.endswith("_aarch64.whl") for w in deps), deps
    assert f"numpy-{APT_NUMPY['3.11']}-cp311" in " ".join(deps), deps
    assert all("aarch64" in w for w in deps if not w.endswith("-none-any.whl")), deps
    with tarfile.open(pkg.path) as tar:
        tar.extractall(tmp_path / "d", filter="data")
    top = tmp_path / "d" / pkg.folder
    assert "EDGESPLIT_PKG_WHEEL_ARCH=aarch64" in (top / "package.env").read_text()
    whl = next((top / "wheels").glob("edgesplit-*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
           "--target", str(tmp_path / "t"), "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", "--no-index", "--find-links", str(top / "wheels"),
           "-c", str(top / "wheels" / "constraints.txt"), "-r", str(top / "wheels" / "requirements.txt"),
           str(whl), "ai-edge-litert"]
    for t in platform_tags("aarch64", "3.11"):
        cmd[cmd.index("--python-version"):cmd.index("--python-version")] = ["--platform", t]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=""))
    assert proc.returncode == 0, proc.stdout + proc.stderr
