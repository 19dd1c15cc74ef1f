"""protocol.profile (edgesplit.profile/1, read by the planner) and protocol.stats (the one percentile helper)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from protocol.errors import UsageError
from protocol.profile import SCHEMA, load_profile, validate_profile
from protocol.stats import percentiles


def profile(**cut):
    entry = {"model": "toy", "cut": "pool2", "quant": "int8", "bundle_id": "0" * 16, "head_ms": {"median": 1.5},
             "tail_ms": None, "frame_bytes_raw": 4000, "frame_bytes_wire": None, "result_bytes": 90} | cut
    return {"schema": SCHEMA, "machine": {}, "interpreter": {"name": "ai_edge_litert"}, "full_ms": None,
            "input": {"bytes": 784}, "cuts": [entry]}


def test_percentiles_are_numpys_with_the_counts_beside_them():
    v = [5.0, 1.0, 3.0, 2.0, 4.0, float("nan")]
    p = percentiles(v)
    assert p == {"n": 5, "median": 3.0, "mean": 3.0, "min": 1.0, "max": 5.0,
                 "p50": 3.0, "p95": pytest.approx(4.8), "p99": pytest.approx(4.96)}
    assert percentiles(np.arange(101.0), (5, 99.5)) == pytest.approx(
        {"n": 101, "median": 50.0, "mean": 50.0, "min": 0.0, "max": 100.0, "p5": 5.0, "p99.5": 99.5})
    assert percentiles(iter([2.0])) == {"n": 1, "median": 2.0, "mean": 2.0, "min": 2.0, "max": 2.0,
                                        "p50": 2.0, "p95": 2.0, "p99": 2.0}
    assert percentiles([]) == {} and percentiles([math.inf]) == {}


def test_a_written_profile_loads_and_a_valid_one_passes(tmp_path):
    path = tmp_path / "pi.json"
    path.write_text(json.dumps(profile()))
    assert load_profile(path)["cuts"][0]["head_ms"]["median"] == 1.5
    d = profile()
    assert validate_profile(d) is d


@pytest.mark.parametrize("change, words", [
    ({"cut": None}, "cuts[0].cut must be the cut's layer name"),
    ({"head_ms": {"median": "fast"}}, "cuts[0].head_ms must be null or an object whose median is a number"),
    ({"tail_ms": 3.0}, "cuts[0].tail_ms must be null"),
    ({"frame_bytes_wire": -1}, "cuts[0].frame_bytes_wire must be a number of bytes"),
    ({"model": 7}, "cuts[0].model must be a string"),
])
def test_a_field_the_planner_reads_is_checked_by_name(change, words, tmp_path):
    path = tmp_path / "pi.json"
    path.write_text(json.dumps(profile(**change)))
    with pytest.raises(UsageError) as e:
        load_profile(path)
    assert words in e.value.message and str(path) in e.value.message
    assert "edgesplit profile" in e.value.fix


def test_not_a_profile_missing_or_unreadable(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UsageError, match="cannot read profile"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "report.json").write_text(json.dumps({"schema": "edgesplit.audit/1", "cuts": []}))
    with pytest.raises(UsageError, match="is not an edgesplit profile .schema edgesplit.audit/1, expected "
                                         "edgesplit.profile/1"):
        load_profile(tmp_path / "report.json")
    with pytest.raises(UsageError, match="the profile given is not an edgesplit profile"):
        validate_profile([1, 2], "the profile given")
