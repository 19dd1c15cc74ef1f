"""`edgesplit iplane`: a tiny model trained while its layers' information is recorded, stopped and resumed.

tiny-cnn on the synthetic shapes (63 steps an epoch), 100 test images: seconds, not minutes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(epochs=2, n=100, grid="log:6", progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from auditor import dynamics

    out = tmp_path_factory.mktemp("iplane")
    return dynamics.run(dynamics.DynamicsSpec.make("tiny-cnn", out=str(out), **TINY)), out


def test_every_cut_is_recorded_on_the_grid_with_both_bounds_under_the_ceilings(tiny_run):
    res, out = tiny_run
    assert [layer["name"] for layer in res.layers] == ["conv1", "pool1", "conv2", "pool2", "dense1", "dense2"]
    assert [r["step"] for r in res.records] == [0, 1, 3, 7, 18, 48, 126] and res.complete
    c = res.ceilings
    for r in res.records:
        for v in r["layers"].values():
            assert v["ixt_lower"] <= v["ixt_upper"] <= c["log2_n"] + 1e-9
            assert v["iyt_lower"] <= v["iyt_upper"] <= c["h_y"] + 1e-9
    # training happened: the last layer goes from knowing nothing about the label to most of it
    first, last = res.records[0]["layers"]["dense2"], res.records[-1]["layers"]["dense2"]
    assert first["iyt_upper"] < 0.5 < 2.5 < last["iyt_upper"]
    assert res.records[-1]["test_accuracy"] > 0.8


def test_the_report_says_what_each_layer_does(tiny_run):
    res, out = tiny_run
    for name in ("iplane.html", "iplane.json", "iplane.md", "figures/iplane.png", "figures/iplane_epochs.png"):
        assert (out / name).stat().st_size > 500, name
    report = json.loads((out / "iplane.json").read_text())
    assert report["schema"] == "edgesplit.iplane/1" and len(report["records"]) == 7
    md = (out / "iplane.md").read_text()
    assert "conv1 (6272 units): on the ceiling log2 N = 6.64 bits" in md
    assert "| dense2 | 10 |" in md
    assert set(report["analysis"]["layers"]) == {layer["name"] for layer in res.layers}


def test_a_stopped_run_resumes_from_its_snapshot_to_the_same_numbers(tiny_run, tmp_path):
    from auditor import dynamics

    full, _ = tiny_run
    spec = dynamics.DynamicsSpec.make("tiny-cnn", out=str(tmp_path), **TINY)
    with pytest.raises(dynamics.Stopped) as stopped:
        dynamics.run(spec, stop_after_step=70)  # mid-epoch, between two records
    assert "step 70 of 126" in stopped.value.why
    state = json.loads((tmp_path / "snapshot" / "state.json").read_text())
    assert state["step"] == 70 and len(state["records"]) == 6
    with pytest.raises(UsageError, match="already holds a run"):
        dynamics.run(spec)
    with pytest.raises(UsageError, match="other settings: epochs 2 .snapshot. vs 3"):
        dynamics.run(dynamics.DynamicsSpec.make("tiny-cnn", out=str(tmp_path), resume=True, **dict(TINY, epochs=3)))
    resumed = dynamics.run(dynamics.DynamicsSpec.make("tiny-cnn", out=str(tmp_path), resume=True, **TINY))
    assert resumed.complete and [r["step"] for r in resumed.records] == [r["step"] for r in full.records]
    for a, b in zip(full.records, resumed.records):
        assert a["layers"] == b["layers"] and a["train_loss"] == b["train_loss"]


def test_ctrl_c_stops_with_a_snapshot_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    args = ["iplane", "tiny-cnn", "--out", str(out), "--epochs", "6", "--n", "60", "--grid", "log:8"]
    proc = subprocess.Popen([sys.executable, "-m", "edgesplit", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    state = out / "snapshot" / "state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted: step" in err and f"resume with: edgesplit iplane tiny-cnn --out {out}" in err
    assert "--epochs 6 --n 60 --grid log:8 --resume" in err
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 6 * 63  # stopped after the step it was in, not at the start and not at the end
    from edgesplit import cli

    assert cli.main([*args, "--resume"]) == 0
    report = json.loads((out / "iplane.json").read_text())
    assert report["complete"] and report["records"][-1]["step"] == 6 * 63


def test_the_saxe_network_learns_mnist_with_ibsgds_optimiser_and_says_its_epochs_in_ibsgds(mnist, tmp_path):
    """One epoch of the short preset (lr 0.1 = 100 ibsgd epochs of lr 0.001), measured on 200 test images."""
    from auditor import dynamics

    spec = dynamics.DynamicsSpec.make("saxe-tanh-short", epochs=1, n=200, grid="log:3", out=str(tmp_path),
                                      progress=False)
    res = dynamics.run(spec)
    assert [(layer["name"], layer["units"]) for layer in res.layers] == \
        [("fc1", 1024), ("fc2", 20), ("fc3", 20), ("fc4", 20), ("softmax", 10)]
    assert res.steps_per_epoch == 469 and res.records[-1]["step"] == 469
    assert res.records[-1]["epoch_equiv"] == pytest.approx(100.0)  # lr x steps as ibsgd's 100 epochs at 0.001
    assert res.records[-1]["test_accuracy"] > 0.85
    assert "ibsgd-equivalent epoch" in (tmp_path / "iplane.md").read_text()
