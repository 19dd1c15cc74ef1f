"""converter.cuts: valid cuts (articulation points) and their costs, on small models built in the test."""
from __future__ import annotations

import json

import keras
import pytest

from converter import cuts, zoo
from protocol.errors import UsageError

L = keras.layers

PAPER_BYTES = {"conv1": 25088, "pool1": 6272, "conv2": 12544, "pool2": 3136, "dense1": 1024, "dense2": 10}


@pytest.fixture(scope="module")
def paper_arch():
    """paper-cnn's architecture, untrained: cuts do not depend on weights."""
    return zoo.build_paper_cnn()


def test_paper_cnn_has_exactly_the_six_cuts_with_the_papers_byte_counts(paper_arch):
    found = cuts.list_cuts(paper_arch)
    assert [c.name for c in found] == list(PAPER_BYTES)
    assert {c.name: c.bytes_int8 for c in found} == PAPER_BYTES
    assert all(c.bytes_float32 == 4 * c.bytes_int8 == 4 * c.elements for c in found)
    by_name = {c.name: c for c in found}
    assert by_name["pool2"].shape == (7, 7, 64) and by_name["dense1"].shape == (1024,)


def test_paper_cnn_macs_and_params_per_cut(paper_arch):
    conv1 = 28 * 28 * 5 * 5 * 1 * 32
    conv2 = 14 * 14 * 5 * 5 * 32 * 64
    dense1, dense2 = 3136 * 1024, 1024 * 10
    total = conv1 + conv2 + dense1 + dense2
    by_name = {c.name: c for c in cuts.list_cuts(paper_arch)}
    assert by_name["conv1"].head_macs == by_name["pool1"].head_macs == conv1
    assert by_name["conv2"].head_macs == by_name["pool2"].head_macs == conv1 + conv2
    assert by_name["dense1"].tail_macs == dense2
    assert by_name["dense2"].head_macs == total and by_name["dense2"].tail_macs == 0
    for cut in by_name.values():
        assert cut.head_macs + cut.tail_macs == total == cuts.model_macs(paper_arch)
        assert cut.head_params + cut.tail_params == paper_arch.count_params()
    assert by_name["pool2"].head_params == 832 + 51264


def test_flatten_is_not_a_separate_cut_and_the_error_says_use_pool2(paper_arch):
    with pytest.raises(UsageError) as err:
        cuts.find_cut(paper_arch, "flatten")
    assert "reshape" in err.value.message and "pool2" in err.value.message


def test_residual_model_lists_only_true_articulation_points():
    model = zoo.build_residual_cnn()
    names = [c.name for c in cuts.list_cuts(model)]
    assert names == ["stem", "res_add", "res_relu", "pool1", "merge", "pool2", "dense1", "dense2"]
    for inside in ("res_a", "res_b", "branch_a", "branch_b"):
        with pytest.raises(UsageError) as err:
            cuts.find_cut(model, inside)
        assert "not a valid cut" in err.value.message and "stem, res_add" in err.value.message


def test_branches_from_the_input_are_not_cuts_and_depthwise_macs_count(branching_model):
    found = {c.name: c for c in cuts.list_cuts(branching_model)}
    assert list(found) == ["merge", "dw", "pool", "dense"]
    assert found["merge"].shape == (28, 28, 9)
    depthwise = 28 * 28 * 3 * 3 * 9
    assert found["dw"].head_macs - found["merge"].head_macs == depthwise
    with pytest.raises(UsageError, match="input layer"):
        cuts.find_cut(branching_model, "image")


def test_sequential_and_nested_models_are_supported():
    seq = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="c"), L.Flatten(name="f"),
                            L.Dense(5, name="d")], name="seq")
    assert [c.name for c in cuts.list_cuts(seq)] == ["c", "d"]

    inner = keras.Sequential([keras.Input((6,)), L.Dense(4, name="i1"), L.Dense(3, name="i2")], name="inner")
    inp = keras.Input((6,))
    out = L.Dense(2, name="last")(inner(inp))
    outer = keras.Model(inp, out, name="outer")
    found = {c.name: c for c in cuts.list_cuts(outer)}
    assert list(found) == ["inner", "last"]
    assert found["inner"].head_macs == 6 * 4 + 4 * 3 and found["inner"].tail_macs == 3 * 2


def test_late_second_input_and_shared_layers_are_not_cuts():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    x = L.Dense(4, name="da")(a)
    shared = L.Dense(4, name="shared")
    y = L.Add(name="add")([shared(x), shared(b)])
    out = L.Dense(2, name="out")(y)
    model = keras.Model([a, b], out)
    # "da" is not a cut: input b still has to reach the tail.  "shared" runs twice.
    assert [c.name for c in cuts.list_cuts(model)] == ["add", "out"]


def test_model_without_a_valid_cut_is_a_usage_error():
    inp = keras.Input((4,), name="x")
    model = keras.Model(inp, [L.Dense(2, name="p")(inp), L.Dense(3, name="q")(inp)], name="twoheads")
    with pytest.raises(UsageError) as err:
        cuts.list_cuts(model)
    assert "no valid cut" in err.value.message and err.value.fix


def test_unknown_layer_lists_valid_cuts_and_suggests_the_closest(paper_arch):
    with pytest.raises(UsageError) as err:
        cuts.find_cut(paper_arch, "pool3")
    message = err.value.message
    assert "did you mean 'pool2'" in message
    assert "conv1, pool1, conv2, pool2, dense1, dense2" in message
    assert cuts.find_cut(paper_arch, "pool2").bytes_int8 == 3136


def test_cut_dict_is_json_and_table_shows_every_cut(paper_arch):
    found = cuts.list_cuts(paper_arch)
    decoded = json.loads(json.dumps([c.to_dict() for c in found]))
    assert decoded[3]["name"] == "pool2" and decoded[3]["shape"] == [7, 7, 64]
    assert set(decoded[0]) >= {"name", "index", "shape", "elements", "bytes_int8", "bytes_float32",
                               "head_macs", "tail_macs", "head_params", "tail_params"}
    table = cuts.format_table(found)
    assert table.splitlines()[0].split()[:2] == ["cut", "layer"]
    for name, size in PAPER_BYTES.items():
        assert name in table and f"{size:,}" in table
