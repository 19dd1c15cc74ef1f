"""The bundle contract: manifest validation, bundle ids, sha256 checks, safe tarballs, (de)quantization."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import msgspec
import numpy as np
import pytest

from protocol import manifest as mf
from protocol import tensors
from protocol.errors import BundleError

ROOT = Path(__file__).resolve().parents[2]


def draft(**changes) -> mf.Manifest:
    m = mf.Manifest(
        schema_version=mf.SCHEMA_VERSION, bundle_id="0" * 16, model="paper-cnn", cut="pool2", quant="int8",
        input=mf.InputSpec(shape=(28, 28, 1), dtype="float32",
                           preprocess=mf.Preprocess(color_mode="L", resize=(28, 28), mean=0.0, std=255.0,
                                                    value_range=(0.0, 1.0))),
        feature=mf.FeatureSpec(shape=(7, 7, 64), dtype="int8", scale=0.05, zero_point=-128),
        output=mf.OutputSpec(shape=(10,), dtype="float32", kind="probabilities"),
        labels=[str(i) for i in range(10)], files={}, tools={"tensorflow": "2.21.0"},
        calibration=mf.Calibration(n=500, source="mnist training images", seed=0), parity=None)
    return msgspec.structs.replace(m, **changes)


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    root = tmp_path / "b"
    root.mkdir()
    (root / mf.HEAD_FILE).write_bytes(b"head-bytes" * 100)
    (root / mf.TAIL_FILE).write_bytes(b"tail-bytes" * 300)
    mf.write_bundle(root, draft())
    return root


def raw_manifest(root: Path) -> dict:
    return json.loads((root / mf.MANIFEST_NAME).read_text())


def rewrite(root: Path, d: dict, fix_id: bool = True) -> None:
    if fix_id:
        d["bundle_id"] = mf.compute_bundle_id(d)
    (root / mf.MANIFEST_NAME).write_text(json.dumps(d))


# ------------------------------------------------------------- round trip

def test_round_trip_dir_and_tarball(bundle_dir, tmp_path):
    b = mf.load_bundle(bundle_dir)
    assert b.manifest.cut == "pool2" and b.manifest.feature.shape == (7, 7, 64)
    assert len(b.bundle_id) == 16 and b.bundle_id == mf.compute_bundle_id(raw_manifest(bundle_dir))
    assert set(b.manifest.files) == {mf.HEAD_FILE, mf.TAIL_FILE}
    assert b.head_path.read_bytes() == b"head-bytes" * 100 and b.tail_keras_path is None

    tar = mf.write_tarball(bundle_dir)
    assert tar == bundle_dir.parent / "b.tar.gz"
    with tarfile.open(tar) as t:
        assert sorted(t.getnames()) == ["b/head.tflite", "b/manifest.json", "b/tail.tflite"]
    from_tar = mf.load_bundle(tar, extract_to=tmp_path / "x")
    assert from_tar.manifest == b.manifest and from_tar.root == tmp_path / "x"
    # without extract_to it goes to a temporary directory
    assert mf.load_bundle(tar).manifest == b.manifest


def test_bundle_id_is_a_content_hash(bundle_dir, tmp_path):
    first = mf.load_bundle(bundle_dir).bundle_id
    assert mf.write_bundle(bundle_dir, draft()).bundle_id == first  # same content, same id
    assert mf.write_bundle(bundle_dir, draft(cut="pool1")).bundle_id != first
    (bundle_dir / mf.TAIL_FILE).write_bytes(b"another tail")
    assert mf.write_bundle(bundle_dir, draft()).bundle_id != first


def test_tarball_is_reproducible(bundle_dir, tmp_path):
    a = mf.write_tarball(bundle_dir, tmp_path / "a.tar.gz").read_bytes()
    b = mf.write_tarball(bundle_dir, tmp_path / "b.tar.gz").read_bytes()
    assert a == b


def test_manifest_is_readable_json(bundle_dir):
    text = (bundle_dir / mf.MANIFEST_NAME).read_text()
    assert '"shape": [7, 7, 64]' in text and text.startswith("{\n  \"schema_version\": 2,")


# ------------------------------------------------------------- validation

@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(schema_version=3), ["schema_version 3", "reads schema_version 1 and 2"]),
    (lambda d: d.pop("schema_version"), ["missing the key `schema_version`"]),
    (lambda d: d.update(schema_version="1"), ["`schema_version` must be an integer"]),
    (lambda d: d.pop("cut"), ["missing key `cut`"]),
    (lambda d: d["feature"].pop("shape"), ["missing key `feature.shape`"]),
    (lambda d: d["feature"].update(shape="7x7"), ["Expected `array`, got `str`", "feature.shape"]),
    (lambda d: d.update(model=3), ["Expected `str`, got `int`", "`model`"]),
    (lambda d: d.update(quant="int4"), ["Invalid enum value 'int4'", "`quant`"]),
    (lambda d: d.update(colour="red"), ["unknown field `colour`"]),
    (lambda d: d["feature"].update(scale=None), ["needs scale and zero_point"]),
    (lambda d: d["feature"].update(zero_point=300), ["zero_point 300 is outside the int8 range"]),
    (lambda d: d["input"]["preprocess"].update(color_mode="RGB"), ["1 channel(s) but color_mode is RGB"]),
    (lambda d: d["input"]["preprocess"].update(std=127.5), ["value_range [0.0, 1.0] does not follow"]),
    (lambda d: d.update(labels=["a", "b"]), ["2 labels for an output of shape [10]"]),
    (lambda d: d["files"].update({"head.tflite": "nothex"}), ["matching regex", "files"]),
    (lambda d: d["files"].update({"../evil": "0" * 64}), ["matching regex"]),
])
def test_invalid_manifests_are_refused_with_a_precise_message(bundle_dir, mutate, words):
    d = raw_manifest(bundle_dir)
    mutate(d)
    rewrite(bundle_dir, d)
    with pytest.raises(BundleError) as err:
        mf.load_bundle(bundle_dir)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert err.value.fix


def test_a_schema_1_manifest_still_loads(bundle_dir):
    # what edgesplit wrote before schema 2: no dataset, no source_model, no preprocess.fit/crop
    d = raw_manifest(bundle_dir)
    for key in ("dataset", "source_model"):
        d.pop(key)
    for key in ("fit", "crop"):
        d["input"]["preprocess"].pop(key)
    d["schema_version"] = 1
    rewrite(bundle_dir, d)
    m = mf.load_bundle(bundle_dir).manifest
    assert m.schema_version == 1 and m.dataset is None and m.source_model is None
    assert m.input.preprocess.fit == "stretch" and m.input.preprocess.crop is None
    # rewriting it makes a schema 2 bundle
    assert mf.write_bundle(bundle_dir, m).schema_version == 2


def test_schema_2_fields_round_trip(bundle_dir):
    pre = mf.Preprocess(color_mode="RGB", resize=(110, 110), crop=(96, 96), fit="cover", resample="bicubic",
                        mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                        value_range=(-2.1179039301310043, 2.6400000000000001))
    m = mf.write_bundle(bundle_dir, draft(
        input=mf.InputSpec(shape=(96, 96, 3), dtype="float32", preprocess=pre),
        dataset=mf.Dataset(source="/data/shapes", kind="folders", n_train=80, n_test=20, test_split=0.2, seed=3),
        source_model=mf.SourceModel(file="/models/my.keras", sha256="a" * 64)))
    got = mf.load_bundle(bundle_dir).manifest
    assert got == m and got.input.preprocess.size == (96, 96)
    assert "centre crop 96x96" in pre.describe() and "bicubic" in pre.describe()
    # the rebuild command names the model file, the data, the split and the preprocessing
    cmd = got.convert_command()
    assert cmd.startswith("edgesplit convert /models/my.keras --cut pool2")
    assert "--data /data/shapes --test-split 0.2 --data-seed 3 --preprocess mean=" in cmd and "fit=cover" in cmd
    # head input back to pixels in [0, 1], per channel
    pixels = np.array([[[0, 128, 255]]], np.uint8)
    x = got.input.pixels_to_input(np.broadcast_to(pixels, (96, 96, 3)))
    np.testing.assert_allclose(pre.to_pixels(x)[0, 0, 0], pixels[0, 0] / 255.0, atol=1e-6)


@pytest.mark.parametrize("change, words", [
    (dict(crop=(90, 90)), ["preprocess.crop [90, 90] must be [width, height] = [96, 96]"]),
    (dict(crop=(120, 120)), ["crop [120, 120] is larger than resize [110, 110]"]),
    (dict(fit="squash"), ["Invalid enum value 'squash'"]),
])
def test_bad_crop_and_fit_are_refused(bundle_dir, change, words):
    d = raw_manifest(bundle_dir)
    d["input"]["shape"] = [96, 96, 1]
    d["input"]["preprocess"].update(resize=[110, 110], crop=[96, 96])
    d["input"]["preprocess"].update({k: list(v) if isinstance(v, tuple) else v for k, v in change.items()})
    rewrite(bundle_dir, d)
    with pytest.raises(BundleError) as err:
        mf.load_bundle(bundle_dir)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_not_json_and_not_an_object(bundle_dir):
    (bundle_dir / mf.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        mf.load_bundle(bundle_dir)
    (bundle_dir / mf.MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(BundleError, match="must hold a JSON object"):
        mf.load_bundle(bundle_dir)


def test_missing_bundle_and_missing_manifest(tmp_path):
    with pytest.raises(BundleError, match="no bundle at") as err:
        mf.load_bundle(tmp_path / "nowhere")
    assert "edgesplit convert" in err.value.fix
    with pytest.raises(BundleError, match="has no manifest.json"):
        mf.load_bundle(tmp_path)
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(BundleError, match="neither a bundle directory nor a .tar.gz"):
        mf.load_bundle(tmp_path / "model.tflite")


# --------------------------------------------------------- tamper, truncate

def test_tampered_file_is_named(bundle_dir):
    data = bytearray((bundle_dir / mf.HEAD_FILE).read_bytes())
    data[10] ^= 1
    (bundle_dir / mf.HEAD_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        mf.load_bundle(bundle_dir)
    assert "head.tflite" in err.value.message and "sha256" in err.value.message
    assert "edgesplit convert paper-cnn --cut pool2 --quant int8" in err.value.fix


def test_truncated_and_missing_files_are_named(bundle_dir):
    tail = bundle_dir / mf.TAIL_FILE
    tail.write_bytes(tail.read_bytes()[:100])
    with pytest.raises(BundleError, match="tail.tflite .*changed or truncated"):
        mf.load_bundle(bundle_dir)
    tail.unlink()
    with pytest.raises(BundleError, match="tail.tflite is missing"):
        mf.load_bundle(bundle_dir)


def test_edited_manifest_no_longer_matches_its_id(bundle_dir):
    d = raw_manifest(bundle_dir)
    d["feature"]["scale"] = 0.5  # someone "fixes" the scale by hand
    rewrite(bundle_dir, d, fix_id=False)
    with pytest.raises(BundleError, match="manifest.json .* was modified after the bundle was made"):
        mf.load_bundle(bundle_dir)


def test_head_and_tail_must_be_listed(bundle_dir):
    mf.write_bundle(bundle_dir, draft(), files=[mf.HEAD_FILE])
    with pytest.raises(BundleError, match="lists no tail.tflite"):
        mf.load_bundle(bundle_dir)


def test_truncated_tarball_is_named(bundle_dir, tmp_path):
    tar = mf.write_tarball(bundle_dir)
    data = tar.read_bytes()
    for cut_at in (len(data) // 2, len(data) - 20, 30):
        bad = tmp_path / f"cut{cut_at}.tar.gz"
        bad.write_bytes(data[:cut_at])
        with pytest.raises(BundleError) as err:
            mf.load_bundle(bad, extract_to=tmp_path / f"x{cut_at}")
        assert bad.name in err.value.message and "edgesplit convert" in err.value.fix


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_tarball_path_traversal_is_refused(bundle_dir, tmp_path):
    good = [_file(f"b/{n}", (bundle_dir / n).read_bytes()) for n in (mf.MANIFEST_NAME, mf.HEAD_FILE, mf.TAIL_FILE)]
    dest = tmp_path / "dest"
    for evil in ("../evil.txt", "b/../../evil.txt", "/tmp/evil.txt", "b/sub/deep.txt"):
        tar = _tar(tmp_path / "evil.tar.gz", good + [_file(evil, b"gotcha")])
        with pytest.raises(BundleError, match="unsafe path|nested deeper"):
            mf.load_bundle(tar, extract_to=dest)
        assert not (tmp_path / "evil.txt").exists()
    link = tarfile.TarInfo("b/head.tflite")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar = _tar(tmp_path / "link.tar.gz", [good[0], (link, None), good[2]])
    with pytest.raises(BundleError, match="not a regular file"):
        mf.load_bundle(tar, extract_to=dest)
    tar = _tar(tmp_path / "mixed.tar.gz", [good[0], _file("c/head.tflite", b"x")])
    with pytest.raises(BundleError, match="several folders"):
        mf.load_bundle(tar, extract_to=dest)


def test_tarball_size_bounds(bundle_dir, tmp_path, monkeypatch):
    tar = mf.write_tarball(bundle_dir)
    monkeypatch.setattr(mf, "MAX_FILE_BYTES", 500)
    with pytest.raises(BundleError, match="too large"):
        mf.load_bundle(tar, extract_to=tmp_path / "x")
    monkeypatch.setattr(mf, "MAX_FILE_BYTES", 1 << 30)
    monkeypatch.setattr(mf, "MAX_MEMBERS", 2)
    with pytest.raises(BundleError, match="more than 2 entries"):
        mf.load_bundle(tar, extract_to=tmp_path / "y")


def test_tampered_file_inside_tarball_is_named(bundle_dir, tmp_path):
    members = []
    for n in (mf.MANIFEST_NAME, mf.HEAD_FILE, mf.TAIL_FILE):
        data = (bundle_dir / n).read_bytes()
        members.append(_file(f"b/{n}", data + b"!" if n == mf.HEAD_FILE else data))
    tar = _tar(tmp_path / "t.tar.gz", members)
    with pytest.raises(BundleError, match="head.tflite in .*t.tar.gz does not match its sha256"):
        mf.load_bundle(tar, extract_to=tmp_path / "x")


def test_a_flat_tarball_loads(bundle_dir, tmp_path):
    members = [_file(n, (bundle_dir / n).read_bytes()) for n in (mf.MANIFEST_NAME, mf.HEAD_FILE, mf.TAIL_FILE)]
    tar = _tar(tmp_path / "flat.tgz", members)
    assert mf.load_bundle(tar, extract_to=tmp_path / "x").bundle_id == mf.load_bundle(bundle_dir).bundle_id


# ------------------------------------------------------------- tensors

def test_quantize_dequantize_match_tflite_arithmetic():
    scale, zp = 0.1, -3
    q = np.arange(-128, 128, dtype=np.int8)
    x = tensors.dequantize(q, scale, zp)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, (q.astype(np.float64) - zp) * scale, rtol=1e-6)
    assert np.array_equal(tensors.quantize(x, scale, zp), q)  # round trip is exact
    # half away from zero, like TFLite; clipped to the dtype
    assert tensors.quantize(np.array([0.05, -0.05, 0.15, 1e6, -1e6]), 0.1, 0).tolist() == [1, -1, 2, 127, -128]
    assert tensors.quantize(np.array([0.0]), 1.0, 0, "uint8").dtype == np.uint8
    with pytest.raises(TypeError):
        tensors.dequantize(np.zeros(3, np.float32), 1.0, 0)


def test_feature_spec_helpers():
    f = draft().feature
    q = np.full((1, 7, 7, 64), -128, np.int8)
    one = q[0]
    assert f.check(q) is q and f.check(one) is one
    assert f.nbytes == 3136 and f.quantized
    assert np.all(f.dequantize(q) == 0.0)
    assert np.array_equal(f.quantize(f.dequantize(q)), q)
    with pytest.raises(ValueError, match="dtype is float32"):
        f.check(q.astype(np.float32))
    with pytest.raises(ValueError, match="shape is"):
        f.check(q[:, :3])
    g = mf.FeatureSpec(shape=(10,), dtype="float32")
    x = np.ones((2, 10), np.float32)
    assert g.dequantize(x) is x and not g.quantized and g.nbytes == 40


def test_pixels_to_input_follows_the_preprocess_spec():
    spec = draft().input
    k = np.arange(28 * 28, dtype=np.int64).reshape(28, 28) % 256
    x = spec.pixels_to_input(k.astype(np.uint8))
    assert x.shape == (1, 28, 28, 1) and x.dtype == np.float32
    assert np.array_equal(x[0, ..., 0], k.astype(np.float32) / np.float32(255))  # as the dataset computes it
    assert spec.pixels_to_input(np.zeros((5, 28, 28, 1), np.uint8)).shape == (5, 28, 28, 1)
    with pytest.raises(ValueError, match="do not fit"):
        spec.pixels_to_input(np.zeros((32, 32), np.uint8))
    rgb = mf.InputSpec(shape=(8, 8, 3), dtype="float32",
                       preprocess=mf.Preprocess(color_mode="RGB", resize=(8, 8), mean=[127.5, 127.5, 127.5],
                                                std=127.5, value_range=(-1.0, 1.0)))
    assert rgb.pixels_to_input(np.full((8, 8, 3), 255, np.uint8)).max() == 1.0


def test_protocol_manifest_imports_without_tensorflow():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('tensorflow', 'keras'):\n"
            "            raise ImportError('no tensorflow on this device')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import protocol.manifest, protocol.tensors\n"
            "assert 'tensorflow' not in sys.modules\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
