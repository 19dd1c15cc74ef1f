"""device.sources: files, folders, globs (sorted, deterministic) and the camera's install hint."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from device import sources
from protocol.errors import UsageError


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8), "L").save(path, format="PNG")
    return path


@pytest.fixture
def tree(tmp_path):
    for name in ("b.png", "a.png", "c.JPG", "sub/z.png", "sub/a.png", ".hidden/x.png", ".dot.png"):
        _png(tmp_path / name)
    (tmp_path / "readme.txt").write_text("not an image")
    return tmp_path


def names(paths, root):
    return [os.path.relpath(p, root) for p in paths]


def test_a_single_file(tree):
    assert sources.expand_paths([str(tree / "b.png")]) == [tree / "b.png"]


def test_a_folder_is_sorted_recursive_and_skips_hidden_and_non_images(tree):
    got = names(sources.expand_paths([str(tree)]), tree)
    assert got == ["a.png", "b.png", "c.JPG", "sub/a.png", "sub/z.png"]
    # the same order every time
    assert got == names(sources.expand_paths([str(tree)]), tree)


def test_a_glob_is_sorted(tree):
    got = names(sources.expand_paths([str(tree / "*.png")]), tree)
    assert got == ["a.png", "b.png"]   # glob skips dot files like a shell does
    assert names(sources.expand_paths([str(tree / "**" / "a.png")]), tree) == ["a.png", "sub/a.png"]


def test_specs_keep_their_order_and_duplicates_are_sent_once(tree):
    got = names(sources.expand_paths([str(tree / "sub"), str(tree / "b.png"), str(tree / "sub" / "a.png")]), tree)
    assert got == ["sub/a.png", "sub/z.png", "b.png"]


def test_missing_path_empty_folder_and_unmatched_glob_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist") as e:
        sources.expand_paths([str(tmp_path / "missing.png")])
    assert "glob" in e.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no image file"):
        sources.expand_paths([str(tmp_path / "empty")])
    with pytest.raises(UsageError, match="matches no image file"):
        sources.expand_paths([str(tmp_path / "*.png")])


def test_open_inputs_checks_everything_before_the_first_sample(tree):
    with pytest.raises(UsageError, match="nope.png does not exist"):
        sources.open_inputs([str(tree / "a.png"), str(tree / "nope.png")])
    samples = list(sources.open_inputs([str(tree / "a.png"), str(tree / "b.png")]))
    assert [s.name for s in samples] == [str(tree / "a.png"), str(tree / "b.png")]
    assert samples[0].data == tree / "a.png"
    with pytest.raises(UsageError, match="no inputs"):
        sources.open_inputs([])


def test_camera_specs():
    assert sources.parse_camera_spec("camera") is None
    assert sources.parse_camera_spec("camera:5") == 5
    assert sources.parse_camera_spec("pictures/") is False
    with pytest.raises(UsageError, match="bad camera input"):
        sources.parse_camera_spec("camera:many")


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here")
def test_camera_without_picamera2_says_how_to_install_it():
    with pytest.raises(UsageError) as e:
        sources.open_inputs(["camera:3"])
    assert "picamera2" in e.value.message
    assert "sudo apt install python3-picamera2" in e.value.fix
    assert "--system-site-packages" in e.value.fix


def test_a_file_called_camera_is_a_file(tmp_path, monkeypatch):
    _png(tmp_path / "camera")   # no suffix: only read because it was named explicitly
    monkeypatch.chdir(tmp_path)
    samples = list(sources.open_inputs(["camera"]))
    assert [s.name for s in samples] == ["camera"]


def test_a_watched_folder_hands_out_each_settled_image_once_and_files_what_is_done(tree):
    state = tree / "state"
    w = sources.FolderWatcher([str(tree)], done_dir=state / "done", failed_dir=state / "failed", settle=0.0)
    first = names(w.scan(), tree)
    # the same rules as a one-off run over the folder
    assert first == names(sources.expand_paths([str(tree)]), tree)
    assert w.scan() == []                                  # in flight: not handed out again
    w.done(str(tree / "a.png"), ok=True)
    w.done(str(tree / "sub/z.png"), ok=False)
    assert (state / "done" / "a.png").is_file() and (state / "failed" / "sub" / "z.png").is_file()
    assert not (tree / "a.png").exists()
    # done/ and failed/ inside the watched folder are never read again
    _png(tree / "new.png")
    assert names(w.scan(), tree) == ["new.png"]


def test_a_watched_image_still_being_written_waits_for_settle(tmp_path):
    w = sources.FolderWatcher([str(tmp_path)], done_dir=tmp_path / "d", failed_dir=tmp_path / "f", settle=60.0)
    _png(tmp_path / "fresh.png")
    assert w.scan() == []
    old = tmp_path / "old.png"
    _png(old)
    os.utime(old, (0, 0))
    assert w.scan() == [old]
