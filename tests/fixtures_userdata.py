"""A user's own model and images: rendered coloured shapes on disk and small Keras models trained on them.

Nothing is downloaded: the images are drawn with Pillow (a red circle, a green cross, a blue square or
a yellow triangle, colours jittered, on a dark or bright noisy background, at a random place and size, saved as JPEG at
sizes other than the model's so that the resize is exercised).

``user_rgb`` (session): a camera-like model — ``keras.applications.MobileNetV2(alpha=0.35,
input_shape=(96, 96, 3), weights=None)`` with a 4-class softmax head, trained on those images
scaled to [-1, 1] (MobileNetV2's ``preprocess_input``), so converting it needs
``--preprocess scale=1/127.5,offset=-1``.  Built once per machine by :func:`cached_build` (the
training takes a few minutes on two busy cores); the test process only loads the file.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest

from fixtures_models import cached_build

CLASSES = ("circle", "cross", "square", "triangle")

# Run as ``python -c SHAPES_CODE`` by the recipes below and importable by tests: one drawing code.
SHAPES_CODE = '''
import numpy as np
from pathlib import Path
from PIL import Image, ImageDraw

CLASSES = ("circle", "cross", "square", "triangle")


#: each class has its shape and its colour family (red, green, blue, yellow): an RGB model that mixed up
#: the channels would be caught, and a grey one still sees the shape
PALETTE = ((225, 55, 45), (55, 195, 75), (55, 85, 225), (235, 205, 40))


def draw(label, rng, size):
    """One RGB image of class ``label``: its shape, in its colour, on a dark or bright noisy background."""
    w, h = size
    bg = rng.integers(0, 60, 3) if rng.random() < 0.5 else rng.integers(200, 256, 3)
    fg = np.clip(np.asarray(PALETTE[label]) + rng.integers(-25, 26, 3), 0, 255)
    base = np.clip(rng.normal(0, 18, (h, w, 3)) + bg, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.34) * min(w, h)
    cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
    colour = tuple(int(v) for v in fg)
    if label == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif label == 1:
        t = max(2, int(r * 0.35))
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    elif label == 2:
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    return img


def write_shapes(root, n_per_class, *, seed=0, sizes=((120, 100), (96, 96), (140, 110)), suffix=".jpg",
                 mode="RGB", layout="folders"):
    """Class folders root/<class>/NNN.jpg (or a flat folder with labels.csv); returns root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["file,label"]
    for label, name in enumerate(CLASSES):
        for i in range(n_per_class):
            img = draw(label, rng, sizes[int(rng.integers(len(sizes)))])
            if mode == "L":
                img = img.convert("L")
            if layout == "folders":
                (root / name).mkdir(exist_ok=True)
                img.save(root / name / f"{i:03d}{suffix}", quality=92)
            else:
                fname = f"img_{label}_{i:03d}{suffix}"
                img.save(root / fname, quality=92)
                rows.append(f"{fname},{name}")
    if layout == "labels.csv":
        (root / "labels.csv").write_text("\\n".join(rows) + "\\n")
    return root
'''

# Run as ``python -c RGB_RECIPE OUT``: the images, then MobileNetV2 trained on them ([-1, 1] input).
RGB_RECIPE = SHAPES_CODE + '''
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras

from converter.inputspec import make_preprocess
from converter.userdata import load_data
from protocol import manifest as mf

out = Path(sys.argv[1])
write_shapes(out / "shapes", 150, seed=0)
spec = mf.InputSpec(shape=(96, 96, 3), dtype="float32", preprocess=make_preprocess((96, 96, 3), 127.5, 127.5))
data = load_data(out / "shapes").for_input(spec, progress=False)   # the same 80/20 split convert makes
keras.utils.set_random_seed(0)
base = keras.applications.MobileNetV2(alpha=0.35, input_shape=(96, 96, 3), weights=None, include_top=False,
                                      pooling="avg")
model = keras.Model(base.input, keras.layers.Dense(len(CLASSES), activation="softmax", name="predictions")(base.output),
                    name="shapes_mobilenet")
# MobileNetV2's BatchNorm momentum (0.999) needs thousands of steps before its moving statistics are
# usable at inference; a short training needs a short memory
for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        layer.momentum = 0.9
x, y = data.x_train[:], data.y_train
epochs = 24
schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=epochs * -(-len(x) // 32))
model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
loss, acc = model.evaluate(data.x_test[:], data.y_test, verbose=0)
print(f"test accuracy {acc:.4f}", file=sys.stderr)
model.save(out / "mobilenet.keras")
(out / "accuracy.txt").write_text(f"{acc}\\n")
'''


def shapes_module():
    """The drawing code as a module (``write_shapes``, ``draw``, ``CLASSES``)."""
    mod = types.ModuleType("shapes")
    exec(SHAPES_CODE, mod.__dict__)
    return mod


@pytest.fixture(scope="session")
def shapes():
    """``write_shapes(root, n_per_class, ...)`` and friends."""
    return shapes_module()


#: where the RGB bundles are cut: early (24x24x8) and in the middle (6x6x24)
RGB_CUTS = ("block_2_add", "block_9_add")
PREPROCESS = "scale=1/127.5,offset=-1"

# Run as ``python -c RGB_BUNDLES_RECIPE OUT`` (formatted with the model's folder): the command a user
# types, `edgesplit convert mobilenet.keras --data shapes --preprocess ... --cut C`, at both cuts.
RGB_BUNDLES_RECIPE = """
import subprocess, sys
from pathlib import Path

out, root = Path(sys.argv[1]), Path({root!r})
for cut in {cuts!r}:
    done = subprocess.run([sys.executable, "-m", "edgesplit", "convert", str(root / "mobilenet.keras"), "--cut", cut,
                           "--data", str(root / "shapes"), "--preprocess", {preprocess!r}, "--calibration", "200",
                           "--out", str(out / cut)], capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        sys.exit(done.returncode)
    (out / f"{{cut}}.txt").write_text(done.stdout)
"""


@pytest.fixture(scope="session")
def user_rgb():
    """The user's RGB camera model and images, and its bundles at two cuts made by `edgesplit convert --data`:

    ``.model`` (mobilenet.keras), ``.images`` (class folders of JPEG files), ``.accuracy`` (the Keras
    test accuracy on the held-out fifth), ``.preprocess``, ``.bundles`` ({cut: bundle dir}) and
    ``.printed`` ({cut: what convert printed}).  Both built once per machine.
    """
    from protocol.manifest import load_bundle

    out = cached_build("user-rgb-mobilenet", RGB_RECIPE, check=lambda d: (d / "mobilenet.keras").stat())
    recipe = RGB_BUNDLES_RECIPE.format(root=str(out), cuts=RGB_CUTS, preprocess=PREPROCESS)
    made = cached_build("user-rgb-bundles", recipe, check=lambda d: [load_bundle(d / c) for c in RGB_CUTS])
    return types.SimpleNamespace(model=out / "mobilenet.keras", images=out / "shapes",
                                 accuracy=float((out / "accuracy.txt").read_text()), preprocess=PREPROCESS,
                                 root=out, bundles={c: made / c for c in RGB_CUTS},
                                 printed={c: (made / f"{c}.txt").read_text() for c in RGB_CUTS})
