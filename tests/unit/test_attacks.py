"""The attacks registry on a tiny float head: every attack runs, names its threat model, and is scored
beside the label-only baseline; an attack missing what it needs says why instead of running."""
import dataclasses

import numpy as np
import pytest

from auditor import attacks
from auditor.attacks import AuxData, heads

TINY = {"whitebox": {"iters": 60, "max_n": 6}, "decoder": {"budgets": (50, 200), "epochs": 3, "min_pairs": 200},
        "architecture": {"rounds": 15, "max_n": 6}, "queryfree": {"iters": 40, "max_n": 6, "epochs": 1},
        "label_decoder": {"epochs": 1, "min_pairs": 200}}


@pytest.fixture(scope="module")
def tiny_data(tiny_model):
    from converter import zoo

    data = zoo.load_dataset(zoo.ZOO["tiny-cnn"])
    return tiny_model, data.x_train[:200], data.y_train[:200], data.x_test[:24], data.y_test[:24]


@pytest.fixture(scope="module")
def conv1_report(tiny_data):
    model, xa, ya, xv, yv = tiny_data
    head = heads.from_model(model, "conv1")
    return attacks.run_attacks(head, xv, AuxData(xa, ya), settings=TINY, labels=yv, model=model)


def test_registry_names_every_attack_and_its_threat_model():
    tms = attacks.threat_models()
    assert list(attacks.ATTACKS) == ["whitebox", "decoder", "architecture", "queryfree"]
    assert set(tms) == set(attacks.ATTACKS) | set(attacks.BASELINES)
    assert {tms[a]["name"] for a in attacks.ATTACKS} == {"white-box", "query access", "architecture only",
                                                         "query-free"}
    assert tms["whitebox"]["weights"] and not tms["architecture"]["weights"] and tms["architecture"]["architecture"]
    assert tms["decoder"]["queries"] and not tms["queryfree"]["queries"] and tms["queryfree"]["tail"]
    with pytest.raises(ValueError, match="known: whitebox"):
        attacks.get("gradient-magic")
    with pytest.raises(ValueError, match="iters"):
        attacks.get("whitebox", iterations=3)


def test_every_attack_runs_and_is_scored_beyond_the_label(conv1_report):
    rep = conv1_report
    assert [o.name for o in rep.outcomes] == list(attacks.ATTACKS) + list(attacks.BASELINES)
    for o in rep.attacks():
        assert o.threat_model["knows"] and o.beyond_label["baseline"] in attacks.BASELINES
        assert o.beyond_label["gap_db"] == pytest.approx(o.metrics["psnr_db"] - o.beyond_label["label_psnr_db"])
        assert o.images.shape[1:] == (28, 28, 1) and 0.0 <= o.images.min() and o.images.max() <= 1.0
    assert rep.get("whitebox").n == 6 and rep.get("decoder").n == 24
    assert set(rep.get("decoder").sweep) == {"50", "200"}
    # conv1 gives the image back far better than the label alone does
    top = rep.beyond_label()
    assert top["attack"] in attacks.ATTACKS and top["gap_db"] > 5.0
    assert rep.to_dict()["attacks"]["whitebox"]["threat_model"]["name"] == "white-box"


def test_an_attack_without_what_it_needs_is_skipped_with_the_reason(tiny_data):
    model, xa, ya, xv, _ = tiny_data
    head = dataclasses.replace(heads.from_model(model, "pool1"), keras_head=None, architecture=None)
    rep = attacks.run_attacks(head, xv[:6], AuxData(xa, ya), attacks=["whitebox", "architecture", "label_mean"])
    assert rep.get("whitebox").skipped == "the head's weights are not known"
    assert "architecture" in rep.get("architecture").skipped
    assert rep.strongest() is None and rep.get("label_mean").metrics["n"] == 6


def test_the_query_decoder_trains_on_what_the_deployed_head_sends(tiny_data):
    """A head whose send adds fresh noise: the decoder's queries go through it (adaptive), not the clean head."""
    model, xa, ya, xv, _ = tiny_data
    clean = heads.from_model(model, "pool1")
    calls = []

    def noisy_send(x, _rng=np.random.default_rng(0)):
        calls.append(len(x))
        f = clean.send(x)
        return f + _rng.normal(0, 0.5, f.shape).astype(np.float32)

    head = dataclasses.replace(clean, send=noisy_send, name="noise 0.5", defence={"method": "noise", "strength": 0.5})
    a, b = head.send(xv[:4]), head.send(xv[:4])
    assert not np.array_equal(a, b)   # fresh noise per call
    calls.clear()
    attacks.run_attacks(head, xv, AuxData(xa, ya), attacks=["decoder"], settings={"decoder": TINY["decoder"]})
    assert calls == [len(xv), 200]  # the victims once, then the attacker's own images (budgets are prefixes)
