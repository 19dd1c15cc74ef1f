"""The report's scatter labels stay readable: cuts on the same spot share one label, and no label
is drawn over another or outside the figure."""
import itertools

import pytest

from auditor.report import plots

# The paper model's cuts as an audit of this machine sees them: head latency (ms) and bytes per
# input against the strongest attack's PSNR.  conv1/pool1, conv2/pool2 and dense1/dense2 cost
# nearly the same time, and leak nearly the same, pairwise.
NAMES = ["conv1", "pool1", "conv2", "pool2", "dense1", "dense2"]
HEAD_MS = [0.026, 0.028, 0.050, 0.053, 0.126, 0.129]
BYTES = [25088, 6272, 12544, 3136, 1024, 10]
PSNR = [25.1, 24.9, 19.0, 18.8, 12.3, 12.2]


def _draw(xs, ys, log_x):
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.scatter(xs, ys)
    if log_x:
        ax.set_xscale("log")
    texts = plots._label_groups(ax, NAMES, xs, ys, log_x=log_x)
    fig.canvas.draw()
    return plt, fig, ax, texts


def _boxes(fig, ax):
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]


def test_cuts_with_the_same_latency_and_leakage_share_one_label():
    plt, fig, ax, texts = _draw(HEAD_MS, PSNR, log_x=False)
    try:
        assert texts == ["conv1, pool1", "conv2, pool2", "dense1, dense2"]
        assert [t for t, _ in _boxes(fig, ax)] == texts
    finally:
        plt.close(fig)


@pytest.mark.parametrize("xs, log_x", [(HEAD_MS, False), (BYTES, True)], ids=["latency", "bytes, log axis"])
def test_labels_do_not_overlap_and_stay_inside_the_figure(xs, log_x):
    plt, fig, ax, texts = _draw(xs, PSNR, log_x)
    try:
        boxes = _boxes(fig, ax)
        assert sorted(sum((t.split(", ") for t, _ in boxes), [])) == sorted(NAMES)  # every cut named once
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
            assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} are drawn over each other"
        frame = fig.bbox
        for text, box in boxes:
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, \
                f"label {text!r} runs off the figure"
    finally:
        plt.close(fig)
