"""The audit on tiny-cnn with real conversion, the real LiteRT interpreter and real wire frames.

Small settings (few images, few iterations) so it runs in about a minute on a busy 2-core box.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import UsageError

SMALL = dict(n=120, attack_n=6, iters=60, decoder_n=400, decoder_epochs=3, parity_n=60, calibration=60,
             latency_runs=3, progress=False)


@pytest.fixture(scope="module")
def tiny_audit(tmp_path_factory):
    from auditor.audit import audit

    out = tmp_path_factory.mktemp("audit")
    result = audit("tiny-cnn", cuts=["conv1", "pool2", "dense2"], out=str(out), max_bytes=1000, **SMALL)
    return result, out


def test_report_json_validates_against_the_schema(tiny_audit):
    import jsonschema

    _, out = tiny_audit
    schema = json.loads(Path("auditor/report_schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    report = json.loads((out / "report.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(report)
    assert [c["name"] for c in report["cuts"]] == ["conv1", "pool2", "dense2"]
    assert report["settings"]["seed"] == 0 and report["versions"]["ai-edge-litert"]


def test_every_report_file_is_written(tiny_audit):
    result, out = tiny_audit
    for name in ("report.html", "report.json", "report.md", "figures/grid.png", "figures/information_plane.png",
                 "figures/leakage_vs_cost.png"):
        assert (out / name).stat().st_size > 100, name
    md = (out / "report.md").read_text()
    assert "Recommended cut" in md and "| conv1" in md
    assert set(result.paths) == {"html", "json", "md"}


def test_the_recommendation_respects_the_byte_budget_and_says_why(tiny_audit):
    result, _ = tiny_audit
    rec = result.recommendation
    assert rec["cut"] in ("pool2", "dense2")           # conv1 sends 6272 bytes > 1000
    assert result.cut(rec["cut"]).cost["bytes_int8"] <= 1000
    assert "conv1" in rec["reason"] and "--max-bytes 1000" in rec["reason"]
    assert result.cut("conv1").budget_failures and not result.cut(rec["cut"]).budget_failures
    assert "recommended cut: " + rec["cut"] in result.summary()


def test_shallow_cut_leaks_more_than_the_last_layer(tiny_audit):
    result, _ = tiny_audit
    conv1, dense2 = result.cut("conv1"), result.cut("dense2")
    assert conv1.leakage_db > dense2.leakage_db + 3
    assert conv1.attacks["decoder"]["metrics"]["ssim"] > dense2.attacks["decoder"]["metrics"]["ssim"]
    assert conv1.dcor["int8"] > dense2.dcor["int8"]
    # the hidden layer's KDE figure sits on its ceiling; the report flags it
    assert conv1.kde["float"]["saturated"]["ixt_upper"]
    assert conv1.kde["float"]["ixt_upper"] <= result.ceilings["log2_n"] + 1e-9


def test_costs_come_from_the_real_bundle(tiny_audit):
    result, _ = tiny_audit
    for c in result.cuts:
        assert c.cost["bytes_int8"] * 4 == c.cost["bytes_float32"]
        assert c.cost["head_ms"] > 0 and c.cost["tail_ms"] >= 0 and c.cost["head_size_bytes"] > 0
        assert c.cost["frame_bytes"] > 0
        assert 0.5 < c.accuracy["int8"] <= 1.0
    assert result.cut("conv1").cost["head_macs"] < result.cut("dense2").cost["head_macs"]


def test_sent_features_are_the_int8_tensor_through_the_wire(tmp_path, synthetic):
    from auditor import features
    from converter import bundle as bundle_mod
    from runtime.interpreter import Model
    from protocol.manifest import load_bundle

    made = bundle_mod.convert("tiny-cnn", cut="pool2", quant="int8", calibration=60, out=str(tmp_path / "b"),
                              min_agreement=0.0, parity_n=60, progress=False)
    b = load_bundle(made.bundle_dir)
    x = synthetic[0][:20]
    sent = features.sent_features(b, x)
    direct = Model(b.head_path).run(x)
    assert sent.raw.dtype == np.int8 and np.array_equal(sent.raw, direct)
    spec = b.manifest.feature
    assert np.array_equal(sent.values, (direct.astype(np.float32) - spec.zero_point) * np.float32(spec.scale))
    assert sent.frame_bytes > 0
    # int8 arithmetic through the head moved the features by about a quantization step, not more
    from converter import zoo

    flo = features.float_features(zoo.load_model("tiny-cnn"), "pool2", x)
    assert np.abs(sent.values - flo).mean() <= spec.scale


def test_a_bundle_is_audited_at_its_own_cut_only(tmp_path):
    from auditor.audit import audit
    from converter import bundle as bundle_mod

    made = bundle_mod.convert("tiny-cnn", cut="dense1", quant="int8", calibration=60, out=str(tmp_path / "b"),
                              min_agreement=0.0, parity_n=60, progress=False)
    with pytest.raises(UsageError, match="cut at 'dense1'"):
        audit(str(made.bundle_dir), cuts=["conv1"], **SMALL)
    result = audit(str(made.tarball), **dict(SMALL, decoder_epochs=1, iters=20))
    assert [c.name for c in result.cuts] == ["dense1"]
    assert result.cuts[0].bundle_id == made.bundle_id


def test_bad_settings_say_how_to_fix_them():
    from auditor.audit import AuditSpec

    with pytest.raises(UsageError) as err:
        AuditSpec.make("tiny-cnn", min_accuracy=98)
    assert "0.98" in str(err.value)
    with pytest.raises(UsageError, match="preset"):
        AuditSpec.make("tiny-cnn", preset="papr")
    with pytest.raises(UsageError, match="too few"):
        AuditSpec.make("tiny-cnn", n=5)
    spec = AuditSpec.make("paper-cnn", preset="paper", iters=10)
    assert spec.n == 10_000 and spec.sigma2 == 0.1 and spec.iters == 10 and spec.cuts is None


def test_unknown_cut_lists_the_valid_ones():
    from auditor.audit import audit

    with pytest.raises(UsageError) as err:
        audit("tiny-cnn", cuts=["nosuch"], **SMALL)
    assert "pool1" in str(err.value)


def test_same_seed_same_numbers():
    from auditor.audit import audit
    from auditor.report import to_json

    def numbers(d):
        if isinstance(d, dict):
            # wall times differ from run to run (auditor.mi's "detail" holds its step timings)
            return {k: numbers(v) for k, v in d.items() if k not in ("seconds", "detail", "head_ms", "tail_ms",
                                                                      "reason")}
        if isinstance(d, list):
            return [numbers(v) for v in d]
        return d

    kw = dict(SMALL, n=60, iters=20, decoder_n=200, decoder_epochs=1, seed=3)
    a = numbers(to_json(audit("tiny-cnn", cuts=["pool1"], **kw)))
    b = numbers(to_json(audit("tiny-cnn", cuts=["pool1"], **kw)))
    assert a == b


def test_paper_rows_say_why_they_differ():
    from auditor.audit import CutAudit
    from auditor.paper import paper_comparison

    def row(name, ixt, iyt, sat):
        kde = {"ixt_upper": ixt, "ixt_lower": ixt - 0.01, "iyt_upper": iyt, "iyt_lower": iyt - 0.01,
               "saturated": {"ixt_upper": sat, "iyt_upper": sat}}
        return CutAudit(name=name, index=1, shape=(1,), depth=0.0, cost={}, accuracy={}, kde={"float": kde, "int8": kde},
                        usable={}, dcor={}, attacks={}, bundle_id="0" * 16)

    ceilings = {"log2_n": 13.287712379549449, "h_y": 3.3194}
    rows = paper_comparison([row("conv1", 13.2877, 3.3194, True), row("dense1", 13.2877, 3.3194, True),
                             row("dense2", 3.354, 3.272, False), row("flatten", 1.0, 1.0, False)], ceilings)
    by = {r["cut"]: r for r in rows}
    assert set(by) == {"conv1", "dense1", "dense2"}
    assert "exceeds log2 N = 13.2877" in by["conv1"]["verdict"] and "float32" in by["conv1"]["verdict"]
    assert "is the ceiling log2 N = 13.2877, rounded" in by["dense1"]["verdict"]
    assert by["dense2"]["agree"] and "below the ceilings" in by["dense2"]["verdict"]


def test_every_cut_gets_its_kde_bounds_over_sigma2_and_where_it_leaves_its_ceiling(tiny_audit):
    from auditor import sigma

    result, out = tiny_audit
    report = json.loads((out / "report.json").read_text())
    sens = report["sigma_sensitivity"]
    assert sens["grid"] == list(sigma.GRID_DEFAULT) and set(sens["cuts"]) == {"conv1", "pool2", "dense2"}
    for c in report["cuts"]:
        sw = c["kde"]["sigma_sweep"]
        assert all(a >= b for a, b in zip(sw["ixt_upper"], sw["ixt_lower"]))
        assert all(a >= b for a, b in zip(sw["ixt_upper"], sw["ixt_upper"][1:]))  # falls as sigma^2 grows
        # the sweep at the audit's sigma^2 is the audit's own figure
        i = sw["grid"].index(result.spec.sigma2)
        assert abs(sw["ixt_upper"][i] - c["kde"]["float"]["ixt_upper"]) < 1e-6
    # conv1 sits on its ceiling at the audit's 0.1 and leaves it at a larger sigma^2
    assert result.cut("conv1").kde["float"]["saturated"]["ixt_upper"]
    assert sens["cuts"]["conv1"]["leaves"]["ixt_upper"] > result.spec.sigma2
    assert (out / "figures" / "sigma_bands.png").stat().st_size > 1000
    assert "How much the KDE figures depend on sigma^2" in (out / "report.md").read_text()
    assert "conv1: I(X;B) at sigma^2 = " in result.summary()
