"""`edgesplit bundle device`: what is inside the tarball a user copies to a Raspberry Pi."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from protocol.errors import UsageError

from fixtures_models import unit_keys

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_wheel_build")]


@pytest.fixture(scope="module")
def broker_cfg(tmp_path_factory):
    from deploy.broker_config import write_broker_config

    out = tmp_path_factory.mktemp("broker-cfg")
    return write_broker_config(out, ["pi-001", "pi-002"], fleet="lab", hostnames=["broker.example.org"])


def _extract(tarball: Path, dest: Path) -> Path:
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        tops = {n.split("/")[0] for n in names}
        assert len(tops) == 1, f"one top-level folder expected, got {tops}"
        for m in tar.getmembers():
            assert not m.name.startswith("/") and ".." not in m.name.split("/")
            assert m.isfile() or m.isdir(), f"{m.name} is neither a file nor a folder"
        tar.extractall(dest, filter="data")
    return dest / tops.pop()


def test_package_holds_a_verifiable_bundle_config_credentials_unit_and_installer(tiny_bundle_dir, broker_cfg, tmp_path):
    from deploy.device_package import build_device_package
    from device.config import load_config
    from protocol.manifest import load_bundle

    creds = broker_cfg.credentials_dir("pi-001")
    out = tmp_path / "pi-001.tar.gz"
    pkg = build_device_package(tiny_bundle_dir, out, credentials=creds)
    assert pkg.device_id == "pi-001" and pkg.fleet == "lab" and pkg.broker_url == broker_cfg.broker_url
    assert stat.S_IMODE(out.stat().st_mode) == 0o600, "the package holds a password: only its owner may read it"
    assert "pi-001" in pkg.summary() and "install.sh" in pkg.summary()

    top = _extract(out, tmp_path / "x")
    assert top.name == "edgesplit-device-pi-001"
    # install.sh sits at the top of the folder, executable: what `edgesplit flash`'s first boot runs
    assert os.access(top / "install.sh", os.X_OK)
    from deploy.flash import _check_package
    _check_package(out)

    # every file matches SHA256SUMS, checked with the same tool install.sh uses
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=top, check=True)
    # the bundle's own sha256s verify after extraction
    b = load_bundle(top / "bundle")
    assert b.bundle_id == load_bundle(tiny_bundle_dir).bundle_id

    # credentials: exactly what `edgesplit broker config` wrote for this device, private
    assert (top / "credentials" / "password").read_bytes().strip() == broker_cfg.password("pi-001").encode()
    assert stat.S_IMODE((top / "credentials" / "password").stat().st_mode) == 0o600
    assert (top / "credentials" / "ca.crt").read_bytes() == (creds / "ca.crt").read_bytes()

    # the config is valid, points at the installed places, and holds no secret
    cfg = load_config(top / "device.toml")
    assert (cfg.device_id, cfg.fleet, cfg.broker_url) == ("pi-001", "lab", broker_cfg.broker_url)
    assert str(cfg.bundle) == "/opt/edgesplit/bundle" and str(cfg.credentials) == "/etc/edgesplit/credentials"
    assert cfg.client_id == "edgesplit-lab-pi-001"
    assert broker_cfg.password("pi-001") not in (top / "device.toml").read_text()

    # the systemd unit
    unit = (top / "systemd" / "edgesplit-device.service").read_text()
    k = unit_keys(unit)
    assert k["Service.Type"] == ["notify"]
    assert int(k["Service.WatchdogSec"][0]) > 0
    assert k["Service.Restart"] == ["on-failure"]
    assert k["Service.RestartPreventExitStatus"] == ["78"]
    assert sorted(k["Service.LoadCredential"]) == ["broker-ca:/etc/edgesplit/credentials/ca.crt",
                                                   "broker-password:/etc/edgesplit/credentials/password",
                                                   # the fleet's public key: signed bundle updates
                                                   "fleet-key:/etc/edgesplit/credentials/fleet.pub"]
    assert k["Service.User"] == ["edgesplit"]
    assert k["Service.ProtectSystem"] == ["strict"] and k["Service.NoNewPrivileges"] == ["yes"]
    assert "edgesplit device serve" in k["Service.ExecStart"][0] and "/etc/edgesplit/device.toml" in k["Service.ExecStart"][0]
    assert "@@" not in unit
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify", str(top / "systemd" / "edgesplit-device.service")],
                              capture_output=True, text=True)
        # the venv does not exist on this machine; anything else systemd dislikes is a bug
        complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                      if line.strip() and "is not executable" not in line]
        assert not complaints, complaints

    # install.sh parses, and shellcheck finds nothing
    subprocess.run(["bash", "-n", str(top / "install.sh")], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(top / "install.sh")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout

    # the edgesplit wheel is built from this checkout and carries the device service
    whl = next((top / "wheels").glob("edgesplit-*-py3-none-any.whl"))
    names = zipfile.ZipFile(whl).namelist()
    assert "device/service.py" in names and "device/doctor.py" in names and "protocol/manifest.py" in names
    reqs = "\n".join(line for line in (top / "wheels" / "requirements.txt").read_text().splitlines()
                     if not line.startswith("#"))
    assert "paho-mqtt" in reqs and "pillow" in reqs and "ai-edge-litert" not in reqs
    env = (top / "package.env").read_text()
    assert "EDGESPLIT_PKG_OFFLINE=0" in env and "EDGESPLIT_PKG_DEVICE_ID=pi-001" in env


def test_password_in_the_url_goes_to_the_credentials_not_the_config(tiny_bundle_dir, tmp_path):
    from deploy.device_package import build_device_package

    out = tmp_path / "p.tar.gz"
    pkg = build_device_package(tiny_bundle_dir, out, broker="mqtt://cam-7:s3cret-pw@10.0.0.5:1883", device_id="cam-7",
                               inputs=["/srv/images", "/var/lib/edgesplit/inbox"])
    top = _extract(out, tmp_path / "x")
    assert pkg.broker_url == "mqtt://10.0.0.5:1883"
    assert "s3cret-pw" not in (top / "device.toml").read_text()
    assert (top / "credentials" / "password").read_text() == "s3cret-pw"
    k = unit_keys((top / "systemd" / "edgesplit-device.service").read_text())
    assert k["Service.LoadCredential"] == ["broker-password:/etc/edgesplit/credentials/password"]
    # a watched folder outside the state directory must stay writable under ProtectSystem=strict
    assert k["Service.ReadWritePaths"] == ["-/srv/images"]


def test_camera_input_asks_for_picamera2(tiny_bundle_dir, tmp_path):
    from deploy.device_package import build_device_package

    pkg = build_device_package(tiny_bundle_dir, tmp_path / "c.tar.gz", broker="mqtt://broker:1883", device_id="cam-1",
                               inputs=["camera"])
    top = _extract(tmp_path / "c.tar.gz", tmp_path / "x")
    assert pkg.camera and "EDGESPLIT_PKG_CAMERA=1" in (top / "package.env").read_text()


@pytest.mark.parametrize("kwargs, words", [
    (dict(broker="mqtt://b:1883"), "no device id"),
    (dict(device_id="pi-1"), "no broker URL"),
    (dict(broker="http://b", device_id="pi-1"), "scheme"),
    (dict(broker="mqtt://b:1883", device_id="bad/id"), "device id"),
    (dict(broker="mqtt://b:1883", device_id="pi-1", inputs=["images"]), "relative"),
])
def test_bad_requests_are_refused_with_a_fix(tiny_bundle_dir, tmp_path, kwargs, words):
    from deploy.device_package import build_device_package
    from protocol.errors import EdgesplitError

    with pytest.raises(EdgesplitError) as e:
        build_device_package(tiny_bundle_dir, tmp_path / "p.tar.gz", **kwargs)
    assert words in str(e.value) and e.value.fix
    assert not (tmp_path / "p.tar.gz").exists()


def test_credentials_of_another_device_are_refused(tiny_bundle_dir, broker_cfg, tmp_path):
    from deploy.device_package import build_device_package

    with pytest.raises(UsageError, match="pi-002"):
        build_device_package(tiny_bundle_dir, tmp_path / "p.tar.gz", credentials=broker_cfg.credentials_dir("pi-002"),
                             device_id="pi-001")
    # the broker config's --out directory plus a device id finds the device's folder
    pkg = build_device_package(tiny_bundle_dir, tmp_path / "p.tar.gz", credentials=broker_cfg.out_dir,
                               device_id="pi-002")
    assert pkg.credentials == ("ca.crt", "fleet.pub", "password")


def test_a_config_file_is_validated_and_kept(tiny_bundle_dir, tmp_path):
    from deploy.device_package import build_device_package
    from device.config import load_config

    conf = tmp_path / "device.toml"
    conf.write_text('device_id = "pi-9"\nfleet = "yard"\nbundle = "b"\n[broker]\nurl = "mqtt://b:1883"\n'
                    '[agent]\nbatch = 4\nmax_in_flight = 8\n')
    build_device_package(tiny_bundle_dir, tmp_path / "p.tar.gz", config=conf)
    cfg = load_config(_extract(tmp_path / "p.tar.gz", tmp_path / "x") / "device.toml")
    assert (cfg.device_id, cfg.fleet, cfg.batch, cfg.max_in_flight) == ("pi-9", "yard", 4, 8)
    assert str(cfg.bundle) == "/opt/edgesplit/bundle"

    conf.write_text('device_id = "pi-9"\nbundle = "b"\n[broker]\nurl = "mqtt://b:1883"\nusrname = "x"\n')
    with pytest.raises(Exception) as e:
        build_device_package(tiny_bundle_dir, tmp_path / "q.tar.gz", config=conf)
    assert "broker.usrname" in str(e.value) and "did you mean `broker.username`" in str(e.value)


def test_the_command_line(tiny_bundle_dir, broker_cfg, tmp_path):
    out = tmp_path / "cli.tar.gz"
    proc = subprocess.run([sys.executable, "-m", "edgesplit", "bundle", "device", "--bundle", str(tiny_bundle_dir),
                           "--out", str(out), "--credentials", str(broker_cfg.credentials_dir("pi-002"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "device package" in proc.stdout and "pi-002" in proc.stdout and out.is_file()
    proc = subprocess.run([sys.executable, "-m", "edgesplit", "bundle", "device", "--bundle", str(tiny_bundle_dir),
                           "--out", str(tmp_path / "x.tar.gz"), "--broker", "mqtt://b:1883"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no device id" in proc.stderr and "fix:" in proc.stderr


def test_offline_wheel_platforms_reach_ai_edge_litert_wheels():
    """ai-edge-litert's aarch64 wheels are manylinux_2_27: a bare manylinux2014 tag would never find them."""
    from deploy.device_package import platform_tags

    bookworm = platform_tags("aarch64", "3.11")
    assert "manylinux_2_27_aarch64" in bookworm and "manylinux2014_aarch64" in bookworm
    assert "manylinux_2_36_aarch64" in bookworm and "manylinux_2_37_aarch64" not in bookworm
    assert "manylinux_2_41_aarch64" in platform_tags("aarch64", "3.13")
    assert platform_tags("native", "3.11") is None
    with pytest.raises(UsageError):
        platform_tags("windows 95", "3.11")
