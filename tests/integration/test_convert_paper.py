"""The paper model end to end: ``convert paper-cnn`` at every cut, int8, parity on 2,000 MNIST test images.

Slow: needs the trained ``paper-cnn`` (trained and cached on first use) and
converts its six cuts.  The model, MNIST, the calibration images and the Keras
predictions are loaded once and shared by every cut.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

from fixtures_core import require  # noqa: E402

require("tensorflow")
Interpreter = require("litert").Interpreter

from converter import bundle, cuts  # noqa: E402
from protocol import manifest as mf  # noqa: E402

# bytes sent per image at int8, from the issue
PAPER_CUTS = {"conv1": 25088, "pool1": 6272, "conv2": 12544, "pool2": 3136, "dense1": 1024, "dense2": 10}


def _head_output(path):
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    return it.get_output_details()[0]


def test_cli_convert_paper_cnn_pool2_int8(paper_pool2_cli):
    assert paper_pool2_cli.code == 0
    printed = paper_pool2_cli.printed
    b = mf.load_bundle(paper_pool2_cli.out.with_name("pool2.tar.gz"))  # verifies every sha256
    for name, digest in b.manifest.files.items():
        assert mf.sha256_file(b.root / name) == digest
    m = b.manifest
    assert (m.model, m.cut, m.quant) == ("paper-cnn", "pool2", "int8")
    out = _head_output(b.head_path)
    assert np.dtype(out["dtype"]) == np.int8 and tuple(out["shape"][1:]) == (7, 7, 64)
    assert out["quantization"] == pytest.approx((m.feature.scale, m.feature.zero_point))
    assert m.feature.nbytes == 3136 and m.calibration.n == 500 and "training" in m.calibration.source
    assert m.parity.n == 2000 and m.parity.min_agreement == 0.99 and m.parity.passed
    assert m.parity.agreement >= 0.99 and m.parity.accuracy >= 0.98
    assert m.bundle_id in printed and "PASSED" in printed


def test_paper_cuts_are_the_six_layers(paper_model):
    assert [c.name for c in cuts.list_cuts(paper_model)] == list(PAPER_CUTS)


@pytest.mark.parametrize("cut", list(PAPER_CUTS))
def test_every_paper_cut_converts_to_int8_and_agrees(cut, paper_model, tmp_path):
    result = bundle.convert(paper_model, cut=cut, quant="int8", out=tmp_path / cut, name="paper-cnn", progress=False)
    m = result.manifest
    assert m.feature.dtype == "int8" and m.feature.nbytes == PAPER_CUTS[cut]
    assert np.dtype(_head_output(mf.load_bundle(result.tarball).head_path)["dtype"]) == np.int8
    assert m.parity.n == 2000 and m.parity.min_agreement == 0.99
    assert result.agreement >= 0.99, result.summary()
    print(f"\n{cut}: agreement {result.agreement:.4f} accuracy {result.accuracy:.4f} "
          f"head {result.head_bytes} B tail {result.tail_bytes} B in {result.seconds['total']:.1f} s")
