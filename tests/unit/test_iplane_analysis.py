"""The information plane's recording grid and its words (auditor.dynamics, auditor.compression): no training."""
from __future__ import annotations

import pytest

from auditor import compression, dynamics
from protocol.errors import UsageError


def test_ibsgd_records_144_of_its_10000_epochs():
    epochs = dynamics.ibsgd_epochs(10_000)  # Keras' 0-based epoch indices, as do_report sees them
    assert len(epochs) == 144
    assert epochs[:21] == list(range(20)) + [20] and 95 in epochs and 96 not in epochs
    assert 190 in epochs and 195 not in epochs and 9900 in epochs and 9950 not in epochs


def test_the_faithful_presets_are_ibsgds_settings():
    for act in ("tanh", "relu"):
        s = dynamics.DynamicsSpec.make(f"saxe-{act}")
        assert (s.activation, s.epochs, s.optimizer, s.lr, s.batch_size, s.n, s.sigma2, s.grid) == \
            (act, 10_000, "sgd", 1e-3, 128, 10_000, 0.1, "ibsgd")
        short = dynamics.DynamicsSpec.make(f"saxe-{act}-short")
        # the same learning rate x steps as ibsgd's 10,000 epochs at 0.001
        assert short.lr * short.epochs == pytest.approx(s.lr * s.epochs)
    steps = dynamics.grid_points("ibsgd", 469 * 10_000, 469, 1e-3)
    # ibsgd saves after epochs 1..20, 21, 26, ..., 9901; we add the untrained start and the end
    assert len(steps) == 146 and steps[:3] == [0, 469, 938] and 9901 * 469 in steps and steps[-1] == 469 * 10_000
    # at lr 0.1 the same ibsgd epochs come 100 times sooner
    assert dynamics.grid_points("ibsgd", 469 * 100, 469, 0.1)[:3] == [0, 5, 9]


def test_log_grid_and_bad_settings():
    steps = dynamics.grid_points("log:10", 1000, 10, 0.1)
    assert steps[0] == 0 and steps[1] == 1 and steps[-1] == 1000 and len(steps) == 11
    with pytest.raises(UsageError, match="unknown recording grid"):
        dynamics.DynamicsSpec.make("saxe-tanh-short", grid="every:5")
    with pytest.raises(UsageError, match="a preset: saxe-tanh"):
        dynamics.DynamicsSpec.make("saxe-sigmoid")
    with pytest.raises(UsageError, match="n = 5"):
        dynamics.DynamicsSpec.make("saxe-tanh-short", n=5)


def _result(series: dict, activation="tanh", log2_n=13.2877):
    """A result whose layers follow ``series`` (I(X;T) upper per record) over log-spaced epochs."""
    spec = dynamics.DynamicsSpec.make(f"saxe-{activation}-short")
    k = len(next(iter(series.values())))
    epochs = [0.0] + [100 * 10 ** (i / (k - 2) * 4 - 4) for i in range(k - 1)]
    records = [{"step": i, "epoch": e / 100, "epoch_equiv": e,
                "layers": {nm: {"ixt_upper": xs[i], "ixt_lower": xs[i] - 1, "iyt_upper": 3.0, "iyt_lower": 2.5}
                           for nm, xs in series.items()}} for i, e in enumerate(epochs)]
    res = dynamics.DynamicsResult(spec=spec, layers=[{"name": nm, "units": 20} for nm in series], records=records,
                                  ceilings={"n": 10_000, "log2_n": log2_n, "h_y": 3.32, "saturation_bits": 0.01},
                                  steps_per_epoch=469, total_steps=46_900, seconds={"train": 1, "mi": 1, "total": 2},
                                  complete=True)
    res.analysis = compression.analyse(res)
    return res


def test_rise_then_fall_is_compression_and_tanh_agrees_with_the_papers():
    res = _result({"fc1": [13.2877] * 8,
                   "fc2": [9.0, 10.0, 10.6, 10.7, 10.6, 10.4, 10.2, 10.0],
                   "fc3": [8.0, 9.0, 9.5, 9.6, 9.62, 9.6, 9.61, 9.6],
                   "softmax": [0.1, 3.6, 3.5, 3.45, 3.4, 3.38, 3.36, 3.35]})
    a = res.analysis
    assert a["layers"]["fc1"]["verdict"] == "saturated"
    assert a["layers"]["fc2"]["verdict"] == "compression" and a["layers"]["fc2"]["drop"] == pytest.approx(0.7)
    assert a["layers"]["fc3"]["verdict"] == "no compression"
    assert a["hidden_compressing"] == ["fc2"] and a["hidden_late_compressing"] == ["fc2"]
    assert a["output_compressing"] and a["agrees"]
    text = " ".join(a["words"])
    assert "fc2 (20 units): I(X;T) goes from 9.00 to a peak of 10.70" in text and "still falling" in text
    assert "It agrees with that reading." in text and "fc1 (20 units): on the ceiling" in text
    assert "compression" in compression.summary(res)


def test_relu_with_hidden_compression_differs_and_a_last_blip_is_not_compression():
    res = _result({"fc1": [8.0, 9.0, 10.0, 10.5, 10.6, 10.7, 10.7, 10.2],     # one low last record: a blip
                   "fc2": [8.0, 9.5, 10.5, 10.4, 10.2, 10.0, 9.9, 9.8],
                   "softmax": [0.1, 3.6, 3.5, 3.45, 3.4, 3.38, 3.36, 3.35]}, activation="relu")
    a = res.analysis
    assert a["layers"]["fc1"]["verdict"] == "no compression"
    assert a["hidden_compressing"] == ["fc2"] and not a["agrees"]
    assert "It differs from that reading" in " ".join(a["words"])
