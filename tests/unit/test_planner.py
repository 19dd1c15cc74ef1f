"""The cut planner on synthetic audit reports and profiles: parsing, the cost model, ranking, limits."""
from __future__ import annotations

import json
import math

import pytest

from converter import planner
from protocol.errors import UsageError


def _report(cuts, model="toy", input_bytes=784):
    """A minimal audit report.json: (name, frame bytes, head ms, tail ms, leakage dB, dcor) per cut."""
    return {
        "schema": "edgesplit.audit/1", "model": model,
        "input": {"name": "input", "shape": [28, 28, 1], "bytes": input_bytes, "usable": {"label_bits": 3.0}},
        "cuts": [{"name": n, "cost": {"bytes_int8": int(b) - 60, "frame_bytes": float(b), "head_ms": h, "tail_ms": t,
                                      "head_macs": 1000, "tail_macs": 1000},
                  "leakage_db": leak, "dcor": {"int8": dc}, "usable": {"int8": {"label_bits": 3.0}},
                  "accuracy": {"int8": 0.99}} for n, b, h, t, leak, dc in cuts],
    }


REPORT = _report([
    ("conv1", 25_000, 0.4, 1.5, 28.0, 0.9),
    ("pool2", 3_200, 0.9, 0.5, 16.0, 0.7),
    ("dense2", 100, 1.6, 0.01, 11.0, 0.5),
])


def _profile(entries, model="toy"):
    """A device profile: (cut, head ms, tail ms, wire bytes) per entry."""
    return {"schema": "edgesplit.profile/1", "machine": {}, "interpreter": {"name": "ai_edge_litert"},
            "input": {"shape": [28, 28, 1], "bytes": 784, "frame_bytes": 829},
            "cuts": [{"model": model, "cut": c, "quant": "int8", "bundle_id": "0" * 16, "head_ms": {"median": h},
                      "tail_ms": {"median": t}, "frame_bytes_raw": 4000, "frame_bytes_wire": w, "result_bytes": 90}
                     for c, h, t, w in entries]}


# ------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, bps", [
    ("1mbit", 1e6), ("20Mbit", 20e6), ("500kbit", 5e5), ("1.5 Mbit/s", 1.5e6), ("10mbps", 10e6),
    ("2MB/s", 16e6), ("1gbit", 1e9), ("64000bit", 64e3), (1e6, 1e6),
])
def test_rates_parse_in_bits_per_second(text, bps):
    assert planner.parse_rate(text) == pytest.approx(bps)


@pytest.mark.parametrize("text, words", [
    ("1", "no unit"), ("fast", "not a rate"), ("0mbit", "above zero"), ("1mbt", "unknown unit"),
    ("-3mbit", "not a rate"),
])
def test_bad_rates_say_what_is_wrong_and_how_to_write_one(text, words):
    with pytest.raises(UsageError) as e:
        planner.parse_rate(text, "--uplink")
    assert words in e.value.message and "--uplink" in e.value.message
    assert "1mbit" in e.value.fix


@pytest.mark.parametrize("text, seconds", [("40ms", 0.04), ("0.04s", 0.04), ("40 ms", 0.04), ("250us", 250e-6),
                                            ("0", 0.0), ("1.5s", 1.5)])
def test_times_parse_in_seconds(text, seconds):
    assert planner.parse_time(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text, words", [("40", "no unit"), ("40mss", "unknown unit"), ("soon", "not a duration")])
def test_bad_times_are_refused_with_the_fix(text, words):
    with pytest.raises(UsageError) as e:
        planner.parse_time(text, "--rtt")
    assert words in e.value.message
    assert "40ms" in e.value.fix


# ------------------------------------------------------------------ the cost model

def test_a_cut_is_predicted_term_by_term():
    res = planner.plan(REPORT, uplink="1mbit", rtt="40ms", hop_ms=0.5, cloud_wait_ms=5.0)
    o = res.option("pool2")
    link = res.link
    wire = link.wire_bytes(3200)
    # 3,200 B payload + MQTT header (1 + 2 length bytes + 2 + 40 topic + 2 id) + 3 segments of 66 B
    assert wire == 3200 + (1 + 2 + 2 + 40 + 2) + 3 * 66
    assert o.up_ms == pytest.approx(wire * 8 / 1e6 * 1e3)
    assert o.rtt_ms == 40.0 and o.mqtt_ms == 4 * 0.5
    assert o.cloud_ms == pytest.approx(0.5 + 5.0)
    assert o.latency_ms == pytest.approx(0.9 + o.up_ms + 40 + 5.5 + o.down_ms + 2.0)


def test_a_token_bucket_burst_is_sent_at_line_rate():
    plain = planner.plan(REPORT, uplink="1mbit", rtt="40ms").option("pool2")
    burst = planner.plan(REPORT, uplink="1mbit", rtt="40ms", burst="3200").option("pool2")
    assert plain.up_ms - burst.up_ms == pytest.approx(3200 * 8 / 1e6 * 1e3)


def test_all_on_device_and_raw_image_are_ranked_beside_the_cuts():
    res = planner.plan(REPORT, uplink="1mbit", rtt="40ms")
    names = [o.name for o in res.options]
    assert set(names) == {"device", "raw", "conv1", "pool2", "dense2"}
    assert [o.rank for o in res.options] == list(range(1, 6))
    lat = [o.latency_ms for o in res.options]
    assert lat == sorted(lat)
    # the whole model on the device: head + tail of the fastest pair in the report, nothing sent
    assert res.option("device").latency_ms == pytest.approx(min(0.4 + 1.5, 0.9 + 0.5, 1.6 + 0.01))
    assert res.option("device").bytes_up is None
    raw = res.option("raw")
    assert raw.bytes_up == 784 + 60 and raw.leakage_db == math.inf


def test_on_a_slow_link_bytes_decide_and_on_a_fast_one_compute_does():
    slow = planner.plan(REPORT, uplink="500kbit", rtt="40ms", exclude=["device"])
    assert [o.name for o in slow.options if o.kind != "device"][:2] == ["dense2", "raw"]
    assert slow.option("conv1").rank == len(slow.options)          # 25 KB at 500 kbit/s: the slowest
    fast = planner.plan(REPORT, uplink="10gbit", rtt="0ms", exclude=["device"], hop_ms=0, cloud_wait_ms=0)
    # with a free network, the cut with the least device + cloud time wins
    assert fast.pick.name == "pool2"


def test_the_fastest_option_is_picked_and_device_wins_for_a_tiny_model():
    res = planner.plan(REPORT, uplink="20mbit", rtt="40ms")
    assert res.pick.name == "device"
    assert "nothing" in res.reason and "device" in res.reason


def test_device_profile_times_replace_the_reports():
    prof = _profile([("pool2", 12.0, 3.0, 1500.0), ("conv1", 5.0, 9.0, 9000.0)])
    res = planner.plan(REPORT, uplink="1mbit", rtt="40ms", device_profile=prof)
    o = res.option("pool2")
    assert o.device_ms == 12.0 and o.bytes_up == 1500.0
    assert o.sources["device_ms"] == "device profile"
    assert "device profile" in o.sources["bytes_up"]
    assert res.option("dense2").sources["device_ms"].startswith("audit report")
    # the whole model on the device is the profile's fastest head + tail
    assert res.option("device").device_ms == pytest.approx(14.0)
    assert res.option("raw").bytes_up == 829
    assert not any("no --device-profile" in n for n in res.notes)


def test_cloud_profile_gives_the_tail_time():
    cloud = _profile([("pool2", 0.2, 0.05, None)])
    o = planner.plan(REPORT, uplink="1mbit", rtt="40ms", cloud_profile=cloud, cloud_wait_ms=0).option("pool2")
    assert o.cloud_ms == pytest.approx(0.05) and o.sources["cloud_ms"] == "cloud profile"


def test_a_profile_of_another_model_is_not_used():
    prof = _profile([("pool2", 12.0, 3.0, 1500.0)], model="other")
    res = planner.plan(REPORT, uplink="1mbit", rtt="40ms", device_profile=prof)
    assert res.option("pool2").device_ms == 0.9
    assert any("'other'" in n for n in res.notes)


# ------------------------------------------------------------------ limits and the pick

def test_max_leakage_excludes_the_raw_image_and_leaky_cuts():
    res = planner.plan(REPORT, uplink="1mbit", rtt="40ms", max_leakage_db=15, exclude=["device"])
    assert res.pick.name == "dense2"
    assert not res.option("raw").ok and "input itself" in res.option("raw").excluded[0]
    assert not res.option("pool2").ok and "16.0 dB > --max-leakage 15" in res.option("pool2").excluded[0]
    assert "--max-leakage 15 dB" in res.reason


def test_max_latency_can_leave_nothing_and_says_why():
    res = planner.plan(REPORT, uplink="1mbit", rtt="40ms", max_latency_ms=10, exclude=["device"])
    assert res.pick is None
    assert "no option meets the limits" in res.reason and "--max-latency-ms 10" in res.reason


def test_the_leakage_objective_picks_the_least_leaking_cut():
    res = planner.plan(REPORT, uplink="20mbit", rtt="40ms", objective="leakage", exclude=["device"])
    assert res.pick.name == "dense2"
    res = planner.plan(REPORT, uplink="20mbit", rtt="40ms", objective="leakage")
    assert res.pick.name == "device"


def test_leakage_limit_without_a_report_excludes_unknown_cuts():
    prof = _profile([("pool2", 1.0, 0.5, 1500.0)])
    report = _report([("pool2", 3200, 0.9, 0.5, None, None)])
    res = planner.plan(report, uplink="1mbit", rtt="40ms", device_profile=prof, max_leakage_db=20,
                       exclude=["device"])
    assert res.pick is None
    assert "leakage unknown" in res.option("pool2").excluded[0]


def test_unknown_exclude_and_non_reports_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such option"):
        planner.plan(REPORT, uplink="1mbit", rtt="40ms", exclude=["pool9"])
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"schema": "something/1"}))
    with pytest.raises(UsageError, match="not an audit report"):
        planner.plan(str(bad), uplink="1mbit", rtt="40ms")
    with pytest.raises(UsageError, match="does not exist"):
        planner.plan(str(tmp_path / "missing.json"), uplink="1mbit", rtt="40ms")


def test_cli_plan_prints_the_ranking_and_json(tmp_path, capsys):
    from edgesplit.cli import main

    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    assert main(["plan", str(path), "--uplink", "1mbit", "--rtt", "40ms", "--max-leakage", "15",
                 "--exclude", "device"]) == 0
    out = capsys.readouterr().out
    assert "pick: dense2" in out and "raw" in out and "conv1" in out
    assert main(["plan", str(tmp_path), "--uplink", "20Mbit", "--rtt", "0.04s", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["pick"] == "device" and len(d["options"]) == 5
    assert main(["plan", str(path), "--uplink", "fast", "--rtt", "40ms"]) == 2
    assert "--uplink 'fast'" in capsys.readouterr().err


def test_planning_from_a_report_needs_no_tensorflow(tmp_path):
    from fixtures_models import run_blocked

    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    proc = run_blocked(tmp_path, """
        import sys
        from edgesplit.cli import main
        code = main(sys.argv[1:])
        assert "tensorflow" not in sys.modules and "keras" not in sys.modules
        raise SystemExit(code)
    """, args=("plan", str(path), "--uplink", "1mbit", "--rtt", "40ms"))
    assert proc.returncode == 0, proc.stderr
    assert "pick: device" in proc.stdout
