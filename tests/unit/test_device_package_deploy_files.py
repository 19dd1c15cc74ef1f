"""The server-side deployment files: compose file (YAML, checked with PyYAML: Docker does not run here)
and the systemd units of the cloud workers and the broker."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures_models import unit_keys

yaml = pytest.importorskip("yaml")
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_file_runs_mosquitto_with_the_generated_config_and_the_cloud_workers():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"mosquitto", "cloud"}
    m = services["mosquitto"]
    assert m["image"].startswith("eclipse-mosquitto:2")
    assert m["command"][-1] == "/mosquitto/config/mosquitto.conf"
    assert any(v.endswith("/broker:/mosquitto/config") for v in m["volumes"])
    assert any(str(p).endswith(":8883") for p in m["ports"])
    c = services["cloud"]
    cmd = " ".join(c["command"])
    assert "edgesplit cloud" in cmd and "--bundle" in cmd and "mqtts://" in cmd and "@mosquitto:8883" in cmd
    assert "--password-file /run/secrets/broker_password" in cmd and "?ca=/run/secrets/broker_ca" in cmd
    assert "cat " not in cmd, "the password must not be put on the worker's command line"
    assert "password" not in str(c.get("environment", {})).lower()
    assert set(c["secrets"]) == {"broker_password", "broker_ca"}
    assert c["depends_on"] == ["mosquitto"] and c["stop_signal"] == "SIGTERM"
    assert "pip install" in c["build"]["dockerfile_inline"] and "[cloud]" in c["build"]["dockerfile_inline"]
    for name, secret in doc["secrets"].items():
        assert "/cloud/" in secret["file"], name       # the cloud user's files from `edgesplit broker config`
    # every ${VAR} has a default, so `docker compose config` works without an .env file
    import re
    text = (DEPLOY / "compose.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for var in re.findall(r"(?<!\$)\$\{([^}]*)\}", body):
        assert ":-" in var, var


@pytest.mark.parametrize("name", ["edgesplit-cloud.service", "mosquitto.service", "edgesplit-device.service"])
def test_units_have_what_systemd_needs(name):
    text = (DEPLOY / "templates" / name).read_text()
    k = unit_keys(text)
    assert k["Service.Restart"] == ["on-failure"]
    assert k["Service.NoNewPrivileges"] == ["yes"] and k["Service.ProtectSystem"] == ["strict"]
    assert k["Install.WantedBy"] == ["multi-user.target"]
    if name == "edgesplit-cloud.service":
        assert k["Service.RestartPreventExitStatus"] == ["78"]
        assert "edgesplit cloud" in k["Service.ExecStart"][0] and "--workers" in k["Service.ExecStart"][0]
        assert sorted(v.split(":")[0] for v in k["Service.LoadCredential"]) == ["broker-ca", "broker-password"]
        assert "$${CREDENTIALS_DIRECTORY}" in k["Service.ExecStart"][0], "let the shell, not systemd, expand it"
        assert '--password-file "$${CREDENTIALS_DIRECTORY}/broker-password"' in k["Service.ExecStart"][0]
        assert "$(cat" not in k["Service.ExecStart"][0], "the password must not be on the command line"
    if name == "mosquitto.service":
        assert k["Service.Type"] == ["notify"] and "mosquitto -c" in k["Service.ExecStart"][0]
        assert "HUP" in k["Service.ExecReload"][0]
    if shutil.which("systemd-analyze") and "@@" not in text:
        proc = subprocess.run(["systemd-analyze", "verify", str(DEPLOY / "templates" / name)],
                              capture_output=True, text=True)
        complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                      if line.strip() and "is not executable" not in line and "No such file" not in line]
        assert not complaints, complaints
