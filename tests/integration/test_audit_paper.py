"""The audit of the paper's model (Tuor et al.): what the issue promises, at the paper's N = 10,000.

Slow: trains paper-cnn if it is not cached, converts a bundle per layer and attacks it, and sweeps
the KDE bounds of every layer over sigma^2.  Attack budgets are kept small (few iterations).
"""
import os
from pathlib import Path

import pytest

# The paper-scale audit (N = 10,000 on every layer, attacks, decoders and the sigma^2 sweeps, whose
# full pairwise pass costs N^2 d / 2 multiply-adds per layer: 1.3e12 for conv1) takes tens of minutes
# on two shared cores (the README has the last run's time): it belongs to a deliberate run, not to
# every `make test` (which audits small settings in tests/integration/test_audit.py and
# tests/e2e/test_report.py).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("EDGESPLIT_PAPER_AUDIT") != "1",
                       reason="paper-scale audit (tens of minutes on 2 cores) runs only with EDGESPLIT_PAPER_AUDIT=1"),
]


@pytest.fixture(scope="module")
def paper_audit(tmp_path_factory, paper_model):
    from auditor.audit import audit

    out = tmp_path_factory.mktemp("paper-audit")
    return audit("paper-cnn", n=10_000, attack_n=16, iters=200, decoder_n=3000, decoder_epochs=2, progress=False,
                 out=str(out))


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


def test_every_layer_of_table_1_is_compared_and_the_hidden_ones_sit_on_the_ceiling(paper_audit):
    rows = {p["cut"]: p for p in paper_audit.paper}
    assert list(rows) == ["conv1", "pool1", "conv2", "pool2", "dense1", "dense2"]
    for cut in ("conv1", "pool1", "conv2", "pool2", "dense1"):
        assert paper_audit.cut(cut).kde["float"]["saturated"]["ixt_upper"], cut


def test_each_hidden_layer_leaves_its_ceiling_above_the_papers_sigma2(paper_audit):
    sens = paper_audit.sigma
    assert sens["grid"][0] < 1e-3 and sens["grid"][-1] > 100 and sens["sigma2_used"] == 0.1
    for cut in ("conv1", "pool1", "conv2", "pool2", "dense1"):
        leaves = sens["cuts"][cut]["leaves"]["ixt_upper"]
        assert leaves is not None and leaves > 0.1, (cut, sens["cuts"][cut])
    # the Table 1 comparison says at which sigma^2 the paper's order would hold (or that none does)
    statement = sens["paper_ranking"]["statement"]
    assert "conv1 > pool1 > conv2 > pool2 > dense1 > dense2" in statement
    assert "At the paper's sigma^2 = 0.1 the order breaks" in statement


def test_the_four_attacks_run_at_every_audited_cut_and_are_named_by_threat_model(paper_audit):
    from auditor.attacks import ATTACKS

    names = {"whitebox": "white-box", "decoder": "query access", "architecture": "architecture only",
             "queryfree": "query-free"}
    for r in paper_audit.cuts:
        for a in ATTACKS:
            entry = r.attacks[a]
            assert entry["skipped"] is None and entry["threat_model"]["name"] == names[a], (r.name, a, entry)
            assert entry["beyond_label"]["baseline"] in ("label_mean", "label_decoder")
    # conv1 gives far more than the label; at dense2 (the class probabilities) an attack gets about the label
    assert paper_audit.cut("conv1").beyond_label["gap_db"] > 8.0
    assert abs(paper_audit.cut("dense2").beyond_label["gap_db"]) < 3.0
    md = (Path(paper_audit.paths["md"])).read_text()
    for tm in names.values():
        assert tm in md
