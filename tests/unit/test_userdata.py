"""converter.userdata: the user's folders and .npz files, split, decoded as a device decodes them."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from converter import userdata
from converter.inputspec import make_preprocess
from converter.userdata import DataError, load_data
from protocol import manifest as mf
from runtime.preprocess import Preprocessor

RGB_SPEC = mf.InputSpec(shape=(16, 16, 3), dtype="float32", preprocess=make_preprocess((16, 16, 3), 127.5, 127.5))
GREY_SPEC = mf.InputSpec(shape=(12, 12, 1), dtype="float32", preprocess=make_preprocess((12, 12, 1), 0.0, 255.0))


def _image(rng, size=(20, 18), mode="RGB"):
    channels = 3 if mode == "RGB" else 1
    a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(a if channels == 3 else a[..., 0], mode)


def _class_folders(root, counts, seed=0, suffix=".png", size=(20, 18), mode="RGB"):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _image(rng, size, mode).save(root / name / f"{i:03d}{suffix}")
    return root


def test_class_folders_are_classes_in_sorted_order_and_split_per_class(tmp_path):
    root = _class_folders(tmp_path / "d", {"zebra": 10, "apple": 20, "mango": 5})
    (root / "apple" / "more").mkdir()
    _image(np.random.default_rng(9)).save(root / "apple" / "more" / "deep.jpg")   # nested: found, as Keras does
    (root / "apple" / ".hidden.png").write_bytes(b"not an image")                  # hidden: ignored
    (root / "apple" / "notes.txt").write_text("not an image")                      # not an image: ignored
    d = load_data(root)
    assert d.classes == ["apple", "mango", "zebra"] and d.named and d.files
    assert d.split.kind == "folders" and d.split.source == str(root.resolve())
    assert d.split.n_train + d.split.n_test == 36 and d.split.test_split == 0.2 and d.split.seed == 0
    # about a fifth of every class is held out, and no image is on both sides
    per_class = np.bincount(d.test.y, minlength=3).tolist()
    assert per_class == [4, 1, 2] and len(d.test.y) == 7
    assert not set(map(str, d.train.items)) & set(map(str, d.test.items))
    for side in (d.train, d.test):
        for path, y in zip(side.items, side.y):
            assert path.relative_to(root).parts[0] == d.classes[y]
    # the split is seeded: the same seed gives the same split, another seed another one
    assert [str(p) for p in load_data(root).test.items] == [str(p) for p in d.test.items]
    other = load_data(root, seed=1, test_split=0.5)
    assert other.split.test_split == 0.5 and other.split.seed == 1 and len(other.test.y) == 18
    assert np.bincount(other.test.y).tolist() == [11, 2, 5]  # quotas 10.5, 2.5, 5: one more for the first tie
    assert "seeded per-class split (seed 1, 50 % held out)" in other.split.describe()
    assert other.split.to_manifest() == mf.Dataset(source=str(root.resolve()), kind="folders", n_train=18,
                                                   n_test=18, test_split=0.5, seed=1)


def test_decoding_is_the_devices_bit_for_bit_png_and_jpeg_grey_and_rgb(tmp_path):
    for spec, mode in ((RGB_SPEC, "RGB"), (GREY_SPEC, "L")):
        for suffix in (".png", ".jpg"):
            root = _class_folders(tmp_path / f"{mode}{suffix}", {"a": 6, "b": 6}, suffix=suffix, mode=mode,
                                  size=(31, 23))
            data = load_data(root).for_input(spec, progress=False)
            device = Preprocessor(spec)
            files = list(load_data(root).test.items)
            got = data.x_test[:]
            assert got.dtype == np.float32 and got.shape == (len(files),) + spec.shape
            np.testing.assert_array_equal(got, device.batch(files))
            np.testing.assert_array_equal(data.x_test.pixels(slice(None)),
                                          np.stack([device.image_pixels(device.open_image(f)) for f in files]))
            np.testing.assert_array_equal(np.asarray(data.x_test), got)


def test_images_are_decoded_on_demand_and_once(tmp_path):
    root = _class_folders(tmp_path / "d", {"a": 30, "b": 30})
    data = load_data(root).for_input(RGB_SPEC, progress=False)
    assert len(data.x_train) == 48 and data.x_train.shape == (48, 16, 16, 3)
    assert len(data.x_train._pixels) == 0                 # nothing decoded yet
    some = data.x_train[np.array([3, 7, 3])]
    assert some.shape == (3, 16, 16, 3) and len(data.x_train._pixels) == 2
    np.testing.assert_array_equal(some[0], some[2])
    np.testing.assert_array_equal(data.x_train[7], some[1])
    assert data.x_train[-1].shape == (16, 16, 3) and data.x_train[:0].shape == (0, 16, 16, 3)
    with pytest.raises(IndexError):
        data.x_train[np.array([48])]


def test_labels_csv_with_names_and_with_indices(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "d"
    (root / "imgs").mkdir(parents=True)
    rows = ["file,label"]
    for i in range(12):
        _image(rng).save(root / "imgs" / f"{i}.png")
        rows.append(f"imgs/{i}.png,{['dog', 'cat', 'owl'][i % 3]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    d = load_data(root, test_split=0.25)
    assert d.classes == ["cat", "dog", "owl"] and d.split.kind == "labels.csv"
    assert len(d.test.y) == 3 and sorted(d.test.y.tolist()) == [0, 1, 2]
    y_of = {p.name: y for p, y in zip(list(d.train.items) + list(d.test.items),
                                      np.concatenate([d.train.y, d.test.y]))}
    assert y_of["0.png"] == 1 and y_of["1.png"] == 0 and y_of["2.png"] == 2   # dog, cat, owl
    # whole-number labels are the model's output indices, with or without a header
    (root / "labels.csv").write_text("".join(f"imgs/{i}.png,{i % 4 + 3}\n" for i in range(12)))
    d = load_data(root)
    assert d.classes == [str(i) for i in range(7)] and not d.named
    assert set(np.concatenate([d.train.y, d.test.y]).tolist()) == {3, 4, 5, 6}
    assert d.check_outputs(10) == [str(i) for i in range(10)]


def test_train_and_test_folders_bring_their_own_split(tmp_path):
    _class_folders(tmp_path / "d" / "train", {"a": 4, "b": 4})
    _class_folders(tmp_path / "d" / "val", {"a": 2, "b": 3}, seed=1)
    d = load_data(tmp_path / "d")
    assert d.split.test_split is None and (d.split.n_train, d.split.n_test) == (8, 5)
    assert d.test.y.tolist() == [0, 0, 1, 1, 1] and "own train and test sets" in d.split.describe()
    with pytest.raises(DataError, match="has its own test set"):
        load_data(tmp_path / "d", test_split=0.3)


def test_npz_pixels_floats_and_names(tmp_path):
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, (20, 12, 12), dtype=np.uint8)
    x_test = rng.integers(0, 256, (6, 12, 12), dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(20) % 3, x_test=x_test, y_test=np.arange(6) % 3,
             labels=np.array(["r", "g", "b"]))
    d = load_data(path)
    assert d.classes == ["r", "g", "b"] and d.split.kind == "npz" and d.split.test_split is None
    bound = d.for_input(GREY_SPEC)
    np.testing.assert_array_equal(bound.x_test[:], x_test[..., None].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(bound.x_test[:], Preprocessor(GREY_SPEC).arrays(x_test))
    # another size: resized by the same Pillow code as a device's arrays
    big = mf.InputSpec(shape=(24, 24, 3), dtype="float32", preprocess=make_preprocess((24, 24, 3), 0.0, 255.0))
    np.testing.assert_array_equal(d.for_input(big).x_test[:], Preprocessor(big).arrays(x_test))
    # x and y alone are split; float images are the model's input already
    np.savez(path, x=rng.random((30, 12, 12, 1), dtype=np.float32), y=np.arange(30) % 2)
    d = load_data(path, test_split=0.1)
    assert d.split.test_split == 0.1 and len(d.test.y) == 3 and d.classes == ["0", "1"]
    np.testing.assert_array_equal(d.for_input(GREY_SPEC).x_test[:], d.test.items)


def _bad(match, spec, **kw):
    with pytest.raises(DataError, match=match) as err:
        load_data(spec, **kw)
    assert err.value.exit_code == 2 and err.value.fix
    return err.value


def test_bad_folders_get_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    _bad("is empty: no class folders", tmp_path / "empty")
    _bad("no such file or folder", tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    _bad("is a file but not an .npz", tmp_path / "notes.txt")
    loose = tmp_path / "loose"
    loose.mkdir()
    _image(np.random.default_rng(0)).save(loose / "a.png")
    err = _bad("holds 1 images but no labels", loose)
    assert "labels.csv" in err.fix
    (tmp_path / "hollow" / "cats").mkdir(parents=True)
    _bad("but no images in them", tmp_path / "hollow")
    one = _class_folders(tmp_path / "one", {"a": 1})
    _bad("a split into train and test images needs at least 2", one)
    two = _class_folders(tmp_path / "two", {"a": 5})
    for bad in (0.0, 1.0, 1.5, -0.2):
        _bad("--test-split must be a fraction between 0 and 1", two, test_split=bad)


def test_labels_csv_naming_a_missing_file_is_named(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    _image(np.random.default_rng(0)).save(root / "a.png")
    (root / "labels.csv").write_text("file,label\na.png,cat\nb.png,dog\nc.png,dog\n")
    err = _bad(r"labels.csv line 3 names b.png, which is not in .* \(and 1 more\)", root)
    assert "correct or delete those rows" in err.fix
    (root / "labels.csv").write_text("file,label\na.png\n")
    _bad("line 2: .* has 1 field", root)
    (root / "labels.csv").write_text("image_path,kind\na.png,cat\n")
    _bad("labels.csv line 1 names image_path", root)   # no header it knows: read as a row, and that file is missing
    (root / "labels.csv").write_text("file,species\na.png,cat\n")
    _bad("names no label column", root)


def test_unreadable_and_truncated_images_are_named_when_decoded(tmp_path):
    root = _class_folders(tmp_path / "d", {"a": 5, "b": 5}, suffix=".jpg")
    broken = sorted((root / "a").iterdir())[0]
    broken.write_bytes(b"this is not a jpeg")
    cut = sorted((root / "b").iterdir())[0]
    cut.write_bytes(cut.read_bytes()[:300])
    data = load_data(root, test_split=0.5).for_input(RGB_SPEC, progress=False)
    bad = {str(broken), str(cut)}
    for view in (data.x_train, data.x_test):
        for i, path in enumerate(view.items):
            if str(path) in bad:
                with pytest.raises(DataError) as err:
                    view[i]
                assert str(path) in err.value.message and err.value.exit_code == 2
                assert f"replace or delete {path}" in err.value.fix
                bad.discard(str(path))
    assert not bad


def test_label_the_model_cannot_output(tmp_path):
    d = load_data(_class_folders(tmp_path / "d", {c: 3 for c in "abcde"}))
    assert d.check_outputs(5) == list("abcde")
    assert d.check_outputs(7) == list("abcde") + ["5", "6"]
    with pytest.raises(DataError, match=r"label 'e' is class 4 .*has 4 outputs .*5 classes"):
        d.check_outputs(4, "'my-model'")


@pytest.mark.parametrize("arrays, words", [
    (dict(images=np.zeros((4, 8, 8), np.uint8)), ["holds the arrays ['images']", "needs x_train"]),
    (dict(x=np.zeros((4, 8), np.uint8), y=np.zeros(4, int)), ["x has shape [4, 8]"]),
    (dict(x=np.zeros((4, 8, 8, 5), np.uint8), y=np.zeros(4, int)), ["5 channels, which cannot be converted"]),
    (dict(x=np.zeros((4, 8, 8, 2), np.float32), y=np.zeros(4, int)), ["float with 2 channels"]),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(3, int)), ["holds 4 images but y holds 3 labels"]),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.eye(4)), ["y has shape [4, 4]", "argmax"]),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, -1, 0])), ["negative label -1"]),
    (dict(x=np.full((4, 8, 8), 300, np.int32), y=np.zeros(4, int)), ["values 300..300, not 0..255"]),
    (dict(x_train=np.zeros((4, 8, 8), np.uint8), y_train=np.zeros(4, int), x_test=np.zeros((2, 9, 9), np.uint8),
          y_test=np.zeros(2, int)), ["x_train images are [8, 8, 1] but x_test images are [9, 9, 1]"]),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 2]), labels=np.array(["a", "b"])),
     ["labels names 2 classes but the labels go up to 2"]),
])
def test_bad_npz_gets_one_clear_error(tmp_path, arrays, words):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    err = _bad(words[0].replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)"), path)
    for w in words[1:]:
        assert w in err.message + err.fix
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    _bad("cannot read .* as an .npz", tmp_path / "junk.npz")


def test_sample_pixels_for_choosing_a_scaling(tmp_path):
    d = load_data(_class_folders(tmp_path / "d", {"a": 10, "b": 10}))
    px, y = d.sample_pixels(8, RGB_SPEC)
    assert px.dtype == np.uint8 and px.shape == (8, 16, 16, 3) and len(y) == 8
    assert set(y.tolist()) <= {0, 1}
    assert userdata.IMAGE_SUFFIXES[0] == ".png"


def test_decoded_pixels_are_kept_only_up_to_the_budget(tmp_path, monkeypatch):
    root = _class_folders(tmp_path / "d", {"a": 10, "b": 10})
    monkeypatch.setattr(userdata, "CACHE_BYTES", 5 * 16 * 16 * 3)     # room for five images
    data = load_data(root).for_input(RGB_SPEC, progress=False)
    first = data.x_train[:]
    assert len(data.x_train._pixels) == 5
    np.testing.assert_array_equal(data.x_train[:], first)             # the rest decoded again, the same
    np.testing.assert_array_equal(first, Preprocessor(RGB_SPEC).batch(load_data(root).train.items))
