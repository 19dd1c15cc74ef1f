"""converter.zoo and the `train` / `cuts` verbs: real training, the cache, the lock, loading errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converter import cuts, zoo
from protocol.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
PAPER_BYTES = {"conv1": 25088, "pool1": 6272, "conv2": 12544, "pool2": 3136, "dense1": 1024, "dense2": 10}


def edgesplit(capsys, *args) -> tuple[int, str, str]:
    """The command's exit code, stdout and stderr, in this process: TensorFlow is already loaded here, and a
    fresh interpreter would spend seconds importing it again.  (The real process: the two-process test.)"""
    from edgesplit.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_tiny_model_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path))
    first = zoo.train("tiny-cnn")
    assert not first.from_cache and first.test_accuracy >= 0.9
    assert first.path == tmp_path / "models" / "tiny-cnn.keras" and first.path.is_file()
    record = json.loads(first.path.with_suffix(".json").read_text())
    assert record["test_accuracy"] == pytest.approx(first.test_accuracy)
    assert record["versions"]["keras"] and record["recipe"]["epochs"] == zoo.ZOO["tiny-cnn"].epochs

    second = zoo.train("tiny-cnn")
    assert second.from_cache and second.test_accuracy == pytest.approx(first.test_accuracy)
    x = np.linspace(0, 1, 2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28, 1)
    np.testing.assert_allclose(second.model.predict(x, verbose=0), first.model.predict(x, verbose=0), atol=1e-6)
    assert "loaded from cache" in second.summary() and "test accuracy" in second.summary()

    # Another epoch count is a separate variant: the reference model is never replaced.
    variant = zoo.train("tiny-cnn", epochs=1)
    assert variant.path.name == "tiny-cnn.e1.keras" and not variant.from_cache
    assert zoo.train("tiny-cnn").path == first.path


def test_two_processes_training_at_once_train_only_once(tmp_path):
    """Two real `edgesplit train` processes at once (tiny-cnn: it trains for longer than the two take to start)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", EDGESPLIT_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-m", "edgesplit", "train", "tiny-cnn"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stdout = [o[0] for o in outs]
    assert sum("  trained:" in s for s in stdout) == 1, stdout
    assert sum("loaded from cache" in s for s in stdout) == 1, stdout


def test_load_model_errors_say_what_to_do(tmp_path):
    with pytest.raises(UsageError) as err:
        zoo.load_model("paper-cn")
    assert "did you mean 'paper-cnn'" in err.value.message and ".keras" in err.value.fix
    with pytest.raises(UsageError, match="not found"):
        zoo.load_model(tmp_path / "missing.keras")
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(UsageError) as err:
        zoo.load_model(h5)
    assert "not a .keras file" in err.value.message and "model.save('model.keras')" in err.value.fix
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(UsageError, match="cannot load"):
        zoo.load_model(broken)


def test_a_keras_file_works_wherever_a_model_is_taken(tmp_path, residual_model):
    path = tmp_path / "mine.keras"
    residual_model.save(path)
    loaded = zoo.load_model(str(path))
    assert [c.to_dict() for c in cuts.list_cuts(loaded)] == [c.to_dict() for c in cuts.list_cuts(residual_model)]


def test_cli_cuts_json_on_a_keras_file_lists_the_six_paper_cuts(tmp_path, capsys):
    path = tmp_path / "paper.keras"
    zoo.build_paper_cnn().save(path)
    code, out, err = edgesplit(capsys, "cuts", path, "--json")
    assert code == 0, err
    listed = json.loads(out)["cuts"]
    assert {c["name"]: c["bytes_int8"] for c in listed} == PAPER_BYTES


def test_cli_errors_exit_2_with_a_fix_and_no_traceback(capsys):
    code, _, err = edgesplit(capsys, "cuts", "no-such-model")
    assert code == 2
    assert "unknown model 'no-such-model'" in err and "fix:" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_cli_cuts_paper_cnn_json(capsys):
    code, out, err = edgesplit(capsys, "cuts", "paper-cnn", "--json")
    assert code == 0, err
    listed = json.loads(out)["cuts"]
    assert [c["name"] for c in listed] == list(PAPER_BYTES)
    assert {c["name"]: c["bytes_int8"] for c in listed} == PAPER_BYTES
    assert {c["name"]: c["bytes_float32"] for c in listed} == {k: 4 * v for k, v in PAPER_BYTES.items()}


@pytest.mark.slow
def test_cli_train_paper_cnn_prints_test_accuracy_of_at_least_99_percent(capsys):
    code, out, err = edgesplit(capsys, "train", "paper-cnn")
    assert code == 0, err
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert accuracy >= 0.99, out


@pytest.mark.slow
def test_paper_model_fixture_reaches_99_percent_on_the_mnist_test_set(paper_model, mnist):
    probs = paper_model.predict(mnist.x_test, batch_size=500, verbose=0)
    assert (probs.argmax(axis=1) == mnist.y_test).mean() >= 0.99
    assert [c.name for c in cuts.list_cuts(paper_model)] == list(PAPER_BYTES)
