"""The README's main command, as a user runs it: ``edgesplit demo``.

Runs the real thing: the cached paper model, a real conversion, a broker, a
cloud worker and a device as separate processes, 1,000 MNIST test images.
"""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _demo(tmp_path, *extra):
    out = tmp_path / "demo-out"
    proc = subprocess.run([sys.executable, "-m", "edgesplit", "demo", "--n", "1000", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "summary.json").read_text()), out


def _check(stdout, summary, out):
    # Every request answered once, each matched to the right image, and the accuracy exactly that of the
    # parity check (the bundle's LiteRT head+tail) on these same 1,000 images.
    assert summary["images"] == 1000 and summary["answered"] == 1000
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 1000
    assert len({r["request_id"] for r in lines}) == 1000
    assert len({r["input"] for r in lines}) == 1000
    assert summary["correct"] == summary["expected_correct"]
    assert summary["accuracy"] >= 0.98
    for word in ("accuracy", "p50", "throughput", "bytes sent per image", "PNG"):
        assert word in stdout
    assert (out / "latency.png").stat().st_size > 1000


def test_demo_on_the_embedded_broker(tmp_path):
    stdout, summary, out = _demo(tmp_path)
    _check(stdout, summary, out)


def test_demo_through_mosquitto(tmp_path, mosquitto_broker):
    stdout, summary, out = _demo(tmp_path, "--broker", mosquitto_broker.url)
    assert summary["broker"] == mosquitto_broker.url
    _check(stdout, summary, out)
