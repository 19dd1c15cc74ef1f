"""Prometheus metrics as an operator collects them: a real Prometheus (Debian's package), started here on a
free loopback port with its own configuration, scrapes a cloud worker and a device service; PromQL says
the worker answered as many requests as the device got answers.  The sample Grafana dashboard in docs/
asks only for metrics that exist."""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from fixtures_core import require

require("cryptography")
require("prometheus-client")
pytestmark = pytest.mark.timeout(300)

from deploy.broker import free_port  # noqa: E402
from fleet_bundles import fleet_bundles  # noqa: E402
from fleet_site import ROOT, DeviceProc, cloud_args, wait_for, write_site  # noqa: E402

FLEET = "lab"


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


class Prometheus:
    def __init__(self, binary: str, workdir: Path, targets: list[str]):
        self.port = free_port()
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                   "scrape_configs": [{"job_name": "edgesplit",
                                                       "static_configs": [{"targets": targets}]}]}))
        self.proc = subprocess.Popen([binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "wb"))
        wait_for(lambda: self._ready(), 60, "Prometheus to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return "Ready" in get(f"http://127.0.0.1:{self.port}/-/ready")
        except OSError:
            return False

    def query(self, promql: str):
        doc = json.loads(get(f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
        assert doc["status"] == "success", doc
        res = doc["data"]["result"]
        return float(res[0]["value"][1]) if res else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def test_prometheus_scrapes_a_worker_and_a_device_and_their_answered_counts_agree(open_dir, make_mosquitto,
                                                                                  cloud_command, tmp_path):
    binary = require("prometheus")
    require("litert")
    bundles = fleet_bundles()
    site = write_site(open_dir / "site", ["pi-001"], FLEET)
    make_mosquitto(config_path=site.out_dir)
    wport, dport = free_port(), free_port()
    cloud = cloud_command(f"mqtts://localhost:{site.port}", bundles / "a",
                          *cloud_args(site, tmp_path / "cache", "--metrics-port", wport))
    cloud.wait_ready()
    dev = DeviceProc(site, "pi-001", bundles / "a", tmp_path / "pi-001", agent={"metrics_port": dport}).start()
    prom = None
    try:
        dev.feed(20)
        wait_for(lambda: len(dev.answered()) >= 20, 90, "20 answers")
        pages = {name: get(f"http://127.0.0.1:{port}/metrics") for name, port in (("worker", wport),
                                                                                ("device", dport))}
        names = set(re.findall(r"^(edgesplit_\w+?)(?:_bucket|_count|_sum|_created)?[{ ]", "\n".join(pages.values()),
                               re.M))
        for n in names:                                # Prometheus' naming: counters _total, durations _seconds
            assert not re.search(r"(_ms|_millis|_us)$", n), n
        assert "edgesplit_device_latency_seconds" in names and "edgesplit_worker_tail_seconds" in names
        assert 'edgesplit_device_results_total{device="pi-001",outcome="answered"} 20.0' in pages["device"]
        prom = Prometheus(binary, tmp_path, [f"127.0.0.1:{wport}", f"127.0.0.1:{dport}"])
        worker_q = 'sum(edgesplit_worker_frames_total{outcome="answered"})'
        device_q = 'sum(edgesplit_device_results_total{outcome="answered"})'
        wait_for(lambda: prom.query(worker_q) == 20.0 and prom.query(device_q) == 20.0, 60,
                 "Prometheus to have scraped both")
        assert prom.query(f"{worker_q} - {device_q}") == 0.0
        assert prom.query('edgesplit_device_bundle_info{device="pi-001"}') == 1.0
        p95 = prom.query("histogram_quantile(0.95, sum by (le) (edgesplit_device_latency_seconds_bucket))")
        assert p95 is not None and 0 < p95 < 30
        # the sample dashboard asks for nothing that does not exist
        dash = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
        asked = set(re.findall(r"edgesplit_\w+", json.dumps(dash)))
        known = names | {f"{n}_bucket" for n in names} | {f"{n}_total" for n in names} | \
            {f"{n}_sum" for n in names} | {f"{n}_count" for n in names}
        assert asked and asked <= known, asked - known
    finally:
        if prom is not None:
            prom.stop()
        dev.stop()
        cloud.stop()
