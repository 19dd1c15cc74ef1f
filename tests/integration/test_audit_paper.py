"""The audit of the paper's model (Tuor et al.): what the issue promises, at the paper's N = 10,000.

Slow: trains paper-cnn if it is not cached, converts three bundles and attacks them.  Budgets are
kept to what a shared 2-core machine does in a few minutes (three cuts, few iterations).
"""
import pytest

import os

# The paper-scale audit (N = 10,000 on three cuts, attacks and decoders) takes about 5 minutes on two
# idle cores (290 s measured) and up to 40 minutes on a heavily shared machine: it belongs to a
# deliberate run, not to every `make test` (which audits small settings in
# tests/integration/test_audit.py and tests/e2e/test_report.py).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EDGESPLIT_PAPER_AUDIT") != "1",
                       reason="paper-scale audit (5-40 min on 2 cores) runs only with EDGESPLIT_PAPER_AUDIT=1"),
]


@pytest.fixture(scope="module")
def paper_audit(tmp_path_factory, paper_model):
    from auditor.audit import audit

    out = tmp_path_factory.mktemp("paper-audit")
    # About 5 minutes on two idle cores, 40 on a busy machine (KDE, probes and decoders on 10,000 images).
    return audit("paper-cnn", cuts=["conv1", "pool1", "dense2"], n=10_000, attack_n=16, iters=200,
                 decoder_n=3000, decoder_epochs=2, progress=False, out=str(out))


def test_shallow_reconstructions_reach_20_db_and_read_as_the_digit(paper_audit):
    r = paper_audit
    deep = r.cut("dense2").attacks["whitebox"]["metrics"]
    for cut in ("conv1", "pool1"):
        assert r.cut(cut).leakage_db >= 20.0, (cut, r.cut(cut).attacks)
        wb = r.cut(cut).attacks["whitebox"]["metrics"]
        assert wb["psnr_db"] >= 20.0
        # An independent reader (not the audited model, which white-box images are tuned to fool)
        # reads the shallow reconstructions as the right digit, the dense2 ones hardly ever.
        assert wb["judge_accuracy"] >= 0.85, (cut, wb)
        assert wb["judge_accuracy"] >= deep["judge_accuracy"] + 0.5, (cut, wb, deep)
        assert r.cut(cut).attacks["decoder"]["metrics"]["judge_accuracy"] >= 0.85


def test_leakage_falls_from_conv1_to_dense2_by_the_measures_that_do_not_saturate(paper_audit):
    conv1, dense2 = paper_audit.cut("conv1"), paper_audit.cut("dense2")
    assert conv1.leakage_db > dense2.leakage_db + 5
    assert conv1.attacks["decoder"]["metrics"]["ssim"] > dense2.attacks["decoder"]["metrics"]["ssim"] + 0.2
    assert conv1.usable["int8"]["input_bits"] > dense2.usable["int8"]["input_bits"]
    assert conv1.dcor["int8"] > dense2.dcor["int8"]
    # while the paper's estimator says the same for both hidden layers: its ceiling
    assert conv1.kde["float"]["saturated"]["ixt_upper"]


def test_dense2_kde_matches_table_1(paper_audit):
    dense2 = paper_audit.cut("dense2").kde["float"]
    assert dense2["n"] == 10_000 and dense2["sigma2"] == 0.1
    assert abs(dense2["ixt_upper"] - 3.35) <= 0.3, dense2
    assert abs(dense2["iyt_upper"] - 3.20) <= 0.3, dense2
    row = next(p for p in paper_audit.paper if p["cut"] == "dense2")
    assert row["agree"]
    conv1 = next(p for p in paper_audit.paper if p["cut"] == "conv1")
    assert "log2 N = 13.2877" in conv1["verdict"] and "float32" in conv1["verdict"]
