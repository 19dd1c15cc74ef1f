"""Model and data fixtures shared by the whole suite (owned by the converter foundation).

Session-scoped: each model is built or loaded once per test run.  Trained zoo
models come from the edgesplit cache ($EDGESPLIT_CACHE or ~/.cache/edgesplit);
``paper_model`` trains paper-cnn if it is not cached (tens of minutes on a busy
CPU), so tests that use it should be marked ``slow``.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def mnist():
    """MNIST: converter.datasets.Mnist (60k train, 10k test, float32 (N,28,28,1) in [0,1])."""
    from converter.datasets import load_mnist

    return load_mnist()


@pytest.fixture(scope="session")
def synthetic():
    """(x, y): 500 synthetic 28x28x1 shape images in 10 classes, seed 7 (not the zoo's training seed)."""
    from converter.datasets import synthetic_images

    return synthetic_images(500, seed=7)


@pytest.fixture(scope="session")
def paper_model():
    """The trained paper-cnn (Tuor et al.) from the cache, trained if needed."""
    from converter import zoo

    return zoo.load_model("paper-cnn")


@pytest.fixture(scope="session")
def tiny_model():
    """tiny-cnn trained on synthetic shapes (seconds to train; cached)."""
    from converter import zoo

    return zoo.load_model("tiny-cnn")


@pytest.fixture(scope="session")
def residual_model():
    """residual-cnn: a trained functional model with a residual block and a two-branch block."""
    from converter import zoo

    return zoo.load_model("residual-cnn")


@pytest.fixture(scope="session")
def branching_model():
    """An untrained model that forks right at the input (inception-like) and has a depthwise conv."""
    from converter import zoo

    return zoo.build_branching_cnn()
