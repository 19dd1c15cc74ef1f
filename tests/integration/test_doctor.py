"""`edgesplit doctor` as a user runs it: a real Mosquitto, a real bundle, a real LiteRT interpreter."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)

_CONVERT = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from converter import bundle, datasets, zoo
x, y = datasets.synthetic_images(200, seed=1)
xt, yt = datasets.synthetic_images(100, seed=2)
bundle.convert(zoo.build_tiny_cnn(), "pool2", "int8", calibration=50, out=sys.argv[1], parity_n=50,
               data=datasets.Mnist(x, y, xt, yt), progress=False, min_agreement=0.0)
"""


@pytest.fixture(scope="module")
def bundle(request) -> Path:
    """A tiny CNN cut at pool2 by the real converter (in a subprocess: no TensorFlow here), cached on disk."""
    from protocol.manifest import load_bundle

    cache = Path(request.config.cache.mkdir("edgesplit-tiny-bundle"))
    h = hashlib.sha256()
    for f in sorted((ROOT / "converter").glob("*.py")) + [ROOT / "protocol" / "manifest.py"]:
        h.update(f.read_bytes())
    root = cache / f"tiny-pool2-{h.hexdigest()[:12]}"
    try:
        load_bundle(root)
        return root
    except Exception:
        pass
    tmp = cache / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-c", _CONVERT, str(tmp / "b")], cwd=ROOT, check=True, timeout=900)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp / "b", root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def doctor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesplit", "doctor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def line(out: str, check: str) -> str:
    """The report line of one check (and its fix line, if any)."""
    lines = out.splitlines()
    for i, text in enumerate(lines):
        parts = text.split()
        if len(parts) >= 2 and parts[1] == check:
            nxt = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].strip().startswith("fix:") else ""
            return text + "\n" + nxt
    raise AssertionError(f"no {check!r} line in:\n{out}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_passes_against_a_real_broker_with_a_good_bundle(mosquitto_broker, bundle):
    proc = doctor("--bundle", str(bundle), "--broker", mosquitto_broker.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for check in ("python", "architecture", "numpy", "Pillow", "paho-mqtt", "interpreter", "bundle", "head", "broker"):
        assert line(out, check).split()[0] == "ok", line(out, check)
    assert "ai_edge_litert" in line(out, "interpreter")
    assert "MQTT connect accepted" in line(out, "broker")
    assert "0 FAIL" in out and "ready" in out


def test_a_closed_port_fails_with_the_fix(bundle):
    port = free_port()
    proc = doctor("--bundle", str(bundle), "--broker", f"mqtt://127.0.0.1:{port}")
    assert proc.returncode == 1
    b = line(proc.stdout, "broker")
    assert b.startswith("  FAIL") and "connection refused" in b and "fix:" in b and "start the broker" in b
    assert line(proc.stdout, "bundle").split()[0] == "ok"       # the rest is still checked
    assert "NOT ready" in proc.stdout


def test_a_tampered_bundle_fails_naming_the_file(bundle, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(bundle, bad)
    data = bytearray((bad / "head.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "head.tflite").write_bytes(bytes(data))
    proc = doctor("--bundle", str(bad), "--skip", "broker")
    assert proc.returncode == 1
    b = line(proc.stdout, "bundle")
    assert b.startswith("  FAIL") and "head.tflite" in b and "sha256" in b and "fix:" in b
    assert line(proc.stdout, "head").split()[0] == "skip"


def test_refused_credentials_are_told_apart_from_an_unreachable_broker(make_mosquitto, bundle, tmp_path):
    from deploy.broker_config import hash_password
    from device.service import dump_config

    passwd = tmp_path / "passwd"
    passwd.write_text(f"pi-001:{hash_password('right-password')}\n")
    passwd.chmod(0o600)
    broker = make_mosquitto(f"password_file {passwd}", anonymous=False)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "password").write_text("wrong-password")
    conf = tmp_path / "device.toml"
    conf.write_text(dump_config({"device_id": "pi-001", "bundle": str(bundle), "state_dir": str(tmp_path / "state"),
                                 "broker": {"url": broker.url, "credentials": str(creds)}}))

    proc = doctor("--config", str(conf))
    assert proc.returncode == 1
    b = line(proc.stdout, "broker")
    # Mosquitto answers a wrong password over MQTT 3.1.1 with CONNACK 5 "not authorised"
    assert b.startswith("  FAIL") and "refused the connection" in b
    assert "not authorised" in b or "bad user name or password" in b
    assert "connection refused" not in b and "fix:" in b and "password" in b.split("fix:")[1]
    assert line(proc.stdout, "credentials").split()[0] == "ok"

    (creds / "password").write_text("right-password")
    proc = doctor("--config", str(conf))
    assert proc.returncode == 0, proc.stdout
    assert "accepted as 'pi-001'" in line(proc.stdout, "broker")
    assert line(proc.stdout, "config").split()[0] == "ok"


def test_a_missing_password_file_fails_the_credentials_check(bundle, tmp_path):
    from device.service import dump_config

    conf = tmp_path / "device.toml"
    (tmp_path / "creds").mkdir()
    conf.write_text(dump_config({"device_id": "pi-001", "bundle": str(bundle),
                                 "broker": {"url": "mqtt://127.0.0.1:1", "credentials": str(tmp_path / "creds")}}))
    proc = doctor("--config", str(conf), "--skip", "broker")
    assert proc.returncode == 1
    c = line(proc.stdout, "credentials")
    assert c.startswith("  FAIL") and "password file" in c and "fix:" in c


def test_a_bad_config_fails_with_did_you_mean(tmp_path):
    conf = tmp_path / "device.toml"
    conf.write_text('device_id = "pi-1"\nbundle = "/b"\n[broker]\nurl = "mqtt://h:1883"\nusernme = "x"\n')
    proc = doctor("--config", str(conf))
    assert proc.returncode == 1
    c = line(proc.stdout, "config")
    assert c.startswith("  FAIL") and "broker.usernme" in c and "did you mean `broker.username`" in c


def test_json_output_and_the_module_entry_point(mosquitto_broker, bundle):
    import json

    proc = doctor("--bundle", str(bundle), "--broker", mosquitto_broker.url, "--json")
    report = json.loads(proc.stdout)
    assert report["ok"] and {c["name"] for c in report["checks"]} >= {"interpreter", "bundle", "head", "broker"}
    # `python -m device.doctor` needs nothing but device/ and protocol/
    proc = subprocess.run([sys.executable, "-m", "device.doctor", "--bundle", str(bundle), "--skip", "broker"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_generated_tls_broker_and_device_credentials_pass_and_a_wrong_ca_fails(bundle, tmp_path):
    """The production path: `edgesplit broker config` (TLS only, passwords, ACL) and a device's credentials."""
    from deploy.broker import mosquitto_binary, start_mosquitto
    from deploy.broker_config import write_broker_config
    from device.service import dump_config

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    import tempfile

    port = free_port()
    # started as root, Mosquitto drops to its own user: the files must be where it can reach them
    open_dir = Path(tempfile.mkdtemp(prefix="edgesplit-doctor-"))
    open_dir.chmod(0o755)
    cfg = write_broker_config(open_dir / "bc", ["pi-001"], fleet="lab", hostnames=["localhost"], port=port)
    broker = start_mosquitto("127.0.0.1", port, config_path=cfg.conf_path, workdir=tmp_path / "mq")
    try:
        conf = tmp_path / "device.toml"
        conf.write_text(dump_config({"device_id": "pi-001", "fleet": "lab", "bundle": str(bundle),
                                     "broker": {"url": cfg.broker_url,
                                                "credentials": str(cfg.credentials_dir("pi-001"))}}))
        proc = doctor("--config", str(conf))
        assert proc.returncode == 0, proc.stdout
        assert "over TLS" in line(proc.stdout, "broker") and "CA " in line(proc.stdout, "credentials")

        # a CA that did not sign the broker's certificate: TLS verification fails, and the doctor says so
        other = write_broker_config(tmp_path / "other", ["pi-001"], hostnames=["localhost"])
        shutil.copy(other.credentials_dir("pi-001") / "ca.crt", cfg.credentials_dir("pi-001") / "ca.crt")
        proc = doctor("--config", str(conf))
        assert proc.returncode == 1
        b = line(proc.stdout, "broker")
        assert b.startswith("  FAIL") and "TLS verification" in b and "fix:" in b
    finally:
        broker.cleanup()
        shutil.rmtree(open_dir, ignore_errors=True)
