"""runtime.interpreter: the interpreter shim and the Model wrapper, on real .tflite files."""
from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import UsageError
from protocol.tensors import dequantize, quantize
from runtime.interpreter import BACKENDS, Model, TensorInfo, pick_backend


def test_picks_litert_first_and_says_so(caplog):
    b = pick_backend()
    assert b.name == BACKENDS[0][0] == "ai_edge_litert"
    assert b.version != "unknown"
    assert b.to_dict()["module"] == "ai_edge_litert.interpreter"


def test_unknown_interpreter_name_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown interpreter 'tflite'") as e:
        pick_backend("tflite")
    assert "ai_edge_litert" in e.value.fix


def test_model_describes_its_tensors(tiny_models):
    m = Model(tiny_models / "float.tflite", num_threads=1)
    assert m.backend.name == "ai_edge_litert"
    assert m.sample_shape == (8, 8, 1)
    assert m.input.dtype == np.float32 and not m.input.quantized
    assert m.output.shape[1:] == (3,)
    assert "float.tflite" in repr(m)
    q = Model(tiny_models / "int8.tflite")
    assert q.input.dtype == np.int8 and q.input.quantized and q.input.scale > 0
    assert q.output.quantized
    assert set(q.input.to_dict()) == {"name", "shape", "dtype", "scale", "zero_point"}


def test_batches_of_any_size_give_the_same_answers_as_one_at_a_time(tiny_models):
    m = Model(tiny_models / "float.tflite")
    x = np.random.default_rng(1).random((7, 8, 8, 1), dtype=np.float32)
    one_by_one = np.concatenate([m.run(x[i:i + 1]) for i in range(7)])
    for n in (7, 3, 1, 5):   # grow, shrink, back to one, grow again
        np.testing.assert_allclose(m.run(x[:n]), one_by_one[:n], rtol=1e-5, atol=1e-6)
    assert m.run(x[:0]).shape == (0, 3)


def test_float_input_to_an_int8_model_is_quantized_with_its_parameters(tiny_models):
    m = Model(tiny_models / "int8.tflite")
    x = np.random.default_rng(2).random((4, 8, 8, 1), dtype=np.float32)
    q = quantize(x, m.input.scale, m.input.zero_point, m.input.dtype.name)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(m.run(x), m.run(q))
    f = Model(tiny_models / "float.tflite").run(x)
    # the int8 model, dequantized, is close to the float one
    np.testing.assert_allclose(m.run_float(x), f, atol=20 * m.output.scale)
    assert m.run_float(x).dtype == np.float32


def test_a_graph_pinned_to_batch_one_still_runs_batches(tiny_models):
    m = Model(tiny_models / "pinned.tflite")
    x = np.random.default_rng(3).random((5, 8, 8, 1), dtype=np.float32)
    y = m.run(x)
    assert y.shape == (5, 3)
    np.testing.assert_allclose(y, np.concatenate([m.run(x[i:i + 1]) for i in range(5)]), rtol=1e-6)


def test_wrong_input_says_what_fits(tiny_models):
    m = Model(tiny_models / "float.tflite")
    with pytest.raises(UsageError, match="add a batch axis"):
        m.run(np.zeros((8, 8, 1), np.float32))
    with pytest.raises(UsageError, match="does not fit"):
        m.run(np.zeros((2, 9, 9, 1), np.float32))
    with pytest.raises(UsageError, match="dtype int16"):
        m.run(np.zeros((1, 8, 8, 1), np.int16))


def test_missing_or_broken_model_files(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        Model(tmp_path / "nope.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(UsageError, match="cannot load TFLite model"):
        Model(bad)


def test_model_from_bytes(tiny_models):
    m = Model(content=(tiny_models / "float.tflite").read_bytes())
    assert m.run(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 3)


def test_quantize_round_trip():
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    q = quantize(x, 1 / 127, 0, "int8")
    np.testing.assert_allclose(dequantize(q, 1 / 127, 0), x, atol=0.5 / 127 + 1e-7)
    assert quantize(np.array([10.0]), 0.01, 0, "int8")[0] == 127   # clipped, not wrapped
    info = TensorInfo.from_details({"name": "t", "index": 0, "shape": np.array([1, 2]), "dtype": np.int8,
                                    "quantization": (0.5, 3)})
    assert info.quantized and info.shape == (1, 2)
