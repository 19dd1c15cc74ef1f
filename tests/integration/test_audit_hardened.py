"""The audit of a hardened cut beside its own: ``edgesplit harden`` (a few fine-tuning steps of tiny-cnn
with dropout kept on at pool2), then ``edgesplit audit --hardened``: the same four attacks, adaptive
(they go through the deployed head with its fresh dropout masks), before and after in one report, and
a model whose defence disagrees with the bundle's manifest refused loudly."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from protocol.errors import BundleError

pytestmark = pytest.mark.timeout(1500)

SMALL = dict(n=120, attack_n=6, iters=60, decoder_n=400, decoder_epochs=2, parity_n=60, calibration=60,
             latency_runs=3, progress=False, sigma_sweep=False)


def _cli(*argv):
    from edgesplit.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hardened_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("harden") / "dropout"
    code, _, err = _cli("harden", "tiny-cnn", "--cut", "pool2", "--method", "dropout", "--strength", "0.5",
                        "--steps", "30", "--test-n", "200", "--no-attacks", "--out", out)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def audited(hardened_dir, tmp_path_factory):
    from auditor.audit import audit

    out = tmp_path_factory.mktemp("audit-hardened")
    return audit("tiny-cnn", cuts=["pool2"], hardened=[str(hardened_dir)], out=str(out), **SMALL), out


def test_the_hardened_cut_is_attacked_by_the_same_four_attacks_knowing_its_defence(audited):
    from auditor.attacks import ATTACKS

    result, _ = audited
    (h,) = result.hardened
    assert h.name == "pool2 + dropout 0.5" and h.layer == "pool2" and h.variant == "dropout 0.5"
    assert h.defence["method"] == "dropout" and h.defence["rate"] == pytest.approx(0.5)
    for a in ATTACKS:
        assert h.attacks[a]["skipped"] is None and h.attacks[a]["threat_model"]["name"], a
    # the white-box attacker models the mask it knows of: only the entries the device kept
    assert h.attacks["whitebox"]["defence_aware"] == "dropout: kept entries only"
    assert result.cut("pool2").attacks["whitebox"]["defence_aware"] is None
    assert h.beyond_label["gap_db"] is not None and h.bundle_id != result.cut("pool2").bundle_id


def test_the_report_shows_before_and_after_and_the_recommendation_weighs_the_hardened_cut(audited):
    import jsonschema

    result, out = audited
    report = json.loads((out / "report.json").read_text())
    schema = json.loads(Path("auditor/report_schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(report)
    assert [r["name"] for r in report["hardened"]] == ["pool2 + dropout 0.5"]
    assert report["hardened"][0]["attacks"]["decoder"]["threat_model"]["name"] == "query access"
    rec = result.recommendation
    assert {d["name"] for d in rec["leaks"]} == {"pool2", "pool2 + dropout 0.5"}
    if rec["variant"] == "dropout 0.5":
        assert "costs" in rec["reason"] and "points of int8 accuracy" in rec["reason"]
    else:
        assert "no hardened variant leaks less beyond the label" in rec["reason"]
    page = (out / "report.html").read_text()
    assert "before → after" in page and "pool2 + dropout 0.5" in page
    assert "Hardened cuts, before and after" in (out / "report.md").read_text()


def test_a_model_whose_defence_is_not_the_bundles_is_refused(hardened_dir, tmp_path, tiny_model):
    """Audit-time defence and device-side defence must be the same: the unhardened model beside the
    hardened bundle (the defence would be on the device but not in what the attacks differentiate)."""
    from auditor.audit import audit
    from converter import zoo

    fake = tmp_path / "dropout"
    shutil.copytree(hardened_dir, fake)
    (fake / "model.keras").unlink()
    shutil.copy(zoo.cached_paths("tiny-cnn")[0], fake / "model.keras")
    with pytest.raises(BundleError):
        audit("tiny-cnn", cuts=["pool2"], hardened=[str(fake)], **dict(SMALL, attack_n=2, iters=5))
