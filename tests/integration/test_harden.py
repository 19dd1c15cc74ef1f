"""``edgesplit harden`` on a small model: the hardened .keras and its ordinary int8 bundle, what the
device really sends, the checks that catch a defence declared on one side only, and one message
(exit 2) for each kind of mistake.  Real fine-tuning (a few steps), real TFLite conversions, real
LiteRT interpreters."""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import msgspec
import numpy as np
import pytest

from edgesplit.cli import main
from protocol import manifest as mf
from protocol.errors import BundleError, UsageError

pytestmark = pytest.mark.timeout(900)

SMALL = ["--steps", "30", "--test-n", "200", "--no-attacks"]


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(map(str, argv)))
        except SystemExit as exc:          # argparse's own errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hardened(tmp_path_factory):
    """``edgesplit harden tiny-cnn --cut pool2 --method noise --strength 0.5`` (a few steps)."""
    out = tmp_path_factory.mktemp("harden") / "noise"
    code, printed, err = run_cli("harden", "tiny-cnn", "--cut", "pool2", "--method", "noise", "--strength", "0.5",
                                 *SMALL, "--out", out)
    assert code == 0, err
    return out, printed


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory, tiny_model):
    from converter import bundle

    out = tmp_path_factory.mktemp("plain") / "pool2"
    bundle.convert("tiny-cnn", cut="pool2", out=out, parity_n=200, progress=False)
    return mf.load_bundle(out)


def test_harden_writes_the_hardened_model_and_an_ordinary_bundle(hardened):
    from converter import zoo
    from converter.defended import CutDefence

    out, printed = hardened
    b = mf.load_bundle(out / "bundle.tar.gz")                  # the tarball verifies like a user's copy
    d = b.manifest.defence
    assert (d.method, d.op, d.distribution, d.learned) == ("noise", "noise", "gaussian", False)
    assert b.feature.dtype == "int8" and (d.head_scale, d.head_zero_point) != (b.feature.scale, b.feature.zero_point)
    model = zoo.load_model(out / "model.keras")                # loads like any .keras, defence layer included
    layer = [lay for lay in model.layers if isinstance(lay, CutDefence)]
    assert len(layer) == 1 and layer[0].spec().scale == pytest.approx(d.scale)
    record = json.loads((out / "harden.json").read_text())
    assert record["point"]["accuracy"] == b.manifest.parity.accuracy > 0.8
    assert b.manifest.parity.passed and b.manifest.parity.agreement >= 0.95
    assert "noise 0.5" in printed and "on the device" in printed


def test_the_device_sends_fresh_noise_and_never_the_clean_tensor(hardened):
    from converter import zoo
    from runtime.split import Head

    b = mf.load_bundle(hardened[0] / "bundle")
    x = np.asarray(zoo.load_dataset(zoo.ZOO["tiny-cnn"]).x_test[:64], np.float32)
    head = Head(b)
    clean = mf.FeatureSpec(shape=b.feature.shape, dtype="int8", scale=b.manifest.defence.head_scale,
                           zero_point=b.manifest.defence.head_zero_point).dequantize(head.model.run(x))
    first, second = (b.feature.dequantize(head.features(x)) for _ in range(2))
    assert not np.array_equal(first, second)                   # fresh for every input, every time
    sigma = float(np.mean(b.manifest.defence.scale))
    assert np.std(first - clean.reshape(first.shape)) == pytest.approx(sigma, rel=0.15)


def test_a_manifest_that_lost_its_defence_is_refused_where_the_head_is_loaded(hardened, tmp_path):
    from runtime.split import Head

    copy = tmp_path / "bundle"
    shutil.copytree(hardened[0] / "bundle", copy)
    m = mf.read_manifest(copy / mf.MANIFEST_NAME)
    mf.write_bundle(copy, msgspec.structs.replace(m, defence=None))    # a valid, re-hashed manifest
    with pytest.raises(BundleError, match="lost its `defence` block"):
        Head(mf.load_bundle(copy))


def test_a_defence_on_one_side_only_fails_loudly(hardened, plain_bundle, tiny_model):
    from auditor.defences import check, exposed
    from converter import zoo

    hard_bundle = mf.load_bundle(hardened[0] / "bundle")
    hard_model = zoo.load_model(hardened[0] / "model.keras")
    # applied at audit time but not on the device
    with pytest.raises(BundleError, match="declares no defence"):
        exposed.deployed_head(plain_bundle, hard_model)
    # applied on the device but not in the audited model
    with pytest.raises(BundleError, match="has none"):
        exposed.deployed_head(hard_bundle, tiny_model)
    with pytest.raises(BundleError, match="has none"):
        check.verify_bundle(hard_bundle, tiny_model, np.zeros((4, 28, 28, 1), np.float32))
    head = exposed.deployed_head(hard_bundle, hard_model)      # the pair harden wrote agrees
    assert head.defence["op"] == "noise" and head.name == "noise 0.5"


def test_the_deployed_head_exposes_the_defence_to_the_attacker(hardened):
    from auditor.defences import exposed

    head = exposed.deployed_head(hardened[0] / "bundle", hardened[0] / "model.keras")
    x = np.zeros((8, 28, 28, 1), np.float32)
    a, b = np.asarray(head.keras_head(x, training=False)), np.asarray(head.keras_head(x, training=False))
    assert not np.array_equal(a, b)                            # the Keras head draws its noise too
    assert np.array_equal(np.asarray(head.clean_head(x)), np.asarray(head.clean_head(x)))
    assert head.send(x).shape == (8, *head.feature_shape)
    assert not np.array_equal(head.send(x), head.send(x))


def test_converting_a_hardened_model_at_another_cut_is_refused(hardened, tmp_path):
    code, _, err = run_cli("convert", hardened[0] / "model.keras", "--cut", "pool1", "--out", tmp_path / "b")
    assert code == 2
    assert "hardened at 'pool2'" in err and "in the cloud" in err and "fix: convert it with --cut pool2" in err


@pytest.mark.parametrize("args, message", [
    (["--method", "vibe"], "unknown defence method 'vibe' (did you mean 'vib'?)"),
    (["--method", "dropout", "--strength", "1.5"], "--strength 1.5 is out of range for dropout"),
    (["--method", "noise", "--strength", "0"], "--strength 0.0 is out of range for noise"),
    (["--method", "noise", "--cut", "dense2"], "'dense2' is the model's output"),
    (["--method", "noise", "--cut", "conv9"], "has no layer 'conv9'"),
    (["--method", "vib", "--noise", "laplace"], "--noise and --learned belong to --method noise"),
    (["--method", "noise", "--min-accuracy", "98"], "--min-accuracy is a fraction"),
])
def test_each_mistake_gets_one_message_and_exit_2(args, message, tmp_path):
    argv = ["harden", "tiny-cnn", *(["--cut", "pool2"] if "--cut" not in args else []), *args, *SMALL,
            "--out", tmp_path / "o"]
    code, _, err = run_cli(*argv)
    assert code == 2, err
    assert message in err and "fix:" in err
    assert err.count("error:") == 1 and "Traceback" not in err


def test_a_sweep_whose_budget_no_point_meets_says_so_after_writing_every_point(tmp_path):
    from auditor.defences.finetune import FinetuneSettings
    from auditor.defences.harden import harden
    from auditor.defences.points import HardenSettings

    settings = HardenSettings(finetune=FinetuneSettings(steps=20), test_n=200, victims=50, aux_n=500,
                              attacks=("decoder", "label_mean"),
                              attack_settings={"decoder": {"budgets": (300,), "epochs": 1, "min_pairs": 640}})
    with pytest.raises(UsageError) as caught:
        harden("tiny-cnn", "pool2", "dropout", sweep=True, strengths="0.2,0.4", out=tmp_path / "s",
               max_psnr=1.0, settings=settings, progress=False)
    assert "no point meets" in caught.value.message and "--max-psnr 1" in caught.value.message
    assert "relax --min-accuracy or --max-psnr" in caught.value.fix
    sweep = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert sweep["schema"] == "edgesplit.harden-sweep/1" and sweep["chosen"] is None
    assert [p["label"] for p in sweep["points"]] == ["dropout 0.2", "dropout 0.4"]
    for p in sweep["points"] + [sweep["baseline"]]:
        assert p["psnr_db"] > 1.0 and p["label_only"]["psnr_db"] > 1.0 and p["strongest"] == "decoder"
        assert p["beyond_label_db"] == pytest.approx(p["psnr_db"] - p["label_only"]["psnr_db"])
    assert sweep["pareto"] and all(sweep["points"][i]["pareto"] for i in sweep["pareto"])
