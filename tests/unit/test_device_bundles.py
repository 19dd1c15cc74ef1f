"""The device's bundle store (device.bundles): what runs after a start, a switch, a broken bundle, a
killed run; and the probation's verdicts (device.update.Probation)."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from device.bundles import BundleStore
from device.update import Probation
from protocol.announce import bundle_ref
from protocol.errors import BundleError, UpdateError, UpdateReason
from protocol.manifest import load_bundle
from protocol.report import DeviceReport


@pytest.fixture(scope="module")
def bundles():
    from fleet_bundles import fleet_bundles

    return fleet_bundles()


def _id(path):
    return load_bundle(path).bundle_id


def test_the_first_start_adopts_the_configured_bundle_and_a_new_one_installed_by_hand(tmp_path, bundles):
    store = BundleStore(tmp_path / "bundles", bundles / "a")
    assert store.open().bundle_id == _id(bundles / "a") == store.current_id
    assert store.previous_id is None
    again = BundleStore(tmp_path / "bundles", bundles / "b.tar.gz")      # a new device package
    assert again.open().bundle_id == _id(bundles / "b") == again.current_id
    assert again.previous_id == _id(bundles / "a")


def test_an_installed_archive_is_checked_against_its_announcement(tmp_path, bundles):
    store = BundleStore(tmp_path / "bundles", bundles / "a")
    store.open()
    ref = bundle_ref(load_bundle(bundles / "b"), bundles / "b.tar.gz")
    b = store.install(bundles / "b.tar.gz", ref)
    assert store.has(b.bundle_id) and not list(store.staging.iterdir())
    other = bundle_ref(load_bundle(bundles / "bad"), bundles / "bad.tar.gz")
    with pytest.raises(UpdateError) as e:                   # the archive of one bundle announced as another
        store.install(bundles / "b.tar.gz", other)
    assert e.value.reason is UpdateReason.BAD_SHA256 and not list(store.staging.iterdir())


def test_a_switch_keeps_the_previous_bundle_and_a_broken_current_falls_back_to_it(tmp_path, bundles):
    store = BundleStore(tmp_path / "bundles", bundles / "a")
    a = store.open().bundle_id
    ref = bundle_ref(load_bundle(bundles / "b"), bundles / "b.tar.gz")
    b = store.install(bundles / "b.tar.gz", ref).bundle_id
    store.switch(b)
    assert (store.current_id, store.previous_id) == (b, a)
    head = store.store / b / "head.tflite"
    head.write_bytes(head.read_bytes()[:-10])               # the SD card lost the end of a file
    reopened = BundleStore(tmp_path / "bundles", bundles / "a")
    assert reopened.open().bundle_id == a == reopened.current_id


def test_a_switch_cut_short_leaves_the_old_bundle_and_no_half_unpacked_one(tmp_path, bundles):
    store = BundleStore(tmp_path / "bundles", bundles / "a")
    a = store.open().bundle_id
    b = _id(bundles / "b")
    # what a kill between the two renames of a switch leaves: state says switching, current is old
    store.state.update(switching={"to": b, "from": a}, probation={"bundle": b})
    store.save()
    (store.staging / b).mkdir()
    (store.staging / b / "head.tflite").write_bytes(b"half")
    reopened = BundleStore(tmp_path / "bundles", bundles / "a")
    assert reopened.open().bundle_id == a
    assert "probation" not in reopened.state and "switching" not in reopened.state
    assert not list(reopened.staging.iterdir())
    assert json.loads(reopened.state_path.read_text())["factory"] == a


def test_with_no_usable_bundle_at_all_the_start_says_so(tmp_path, bundles):
    shutil.copytree(bundles / "a", tmp_path / "a")
    store = BundleStore(tmp_path / "bundles", tmp_path / "a")
    store.open()
    for p in store.store.iterdir():
        (p / "tail.tflite").write_bytes(b"x")
    (tmp_path / "a" / "head.tflite").write_bytes(b"x")
    with pytest.raises(BundleError, match="no usable bundle"):
        BundleStore(tmp_path / "bundles", tmp_path / "a").open()


def test_a_probation_passes_on_good_answers_fails_on_errors_and_ends_after_its_time():
    p = Probation("b", answers=3, max_errors=2, seconds=60)
    for _ in range(3):
        assert p.verdict() is None
        p.result(True)
    assert p.verdict() == "pass"
    p = Probation("b", answers=3, max_errors=2, seconds=60)
    p.result(True)
    p.result(False, "dead letter unknown-bundle")
    assert p.verdict() is None
    p.result(False, "dead letter unknown-bundle")
    assert p.verdict() == "fail" and "2 of its first 3 answers failed (dead letter unknown-bundle)" in p.why()
    quiet = Probation("b", answers=3, max_errors=2, seconds=60, since=time.monotonic() - 61)
    assert quiet.verdict() == "pass"
    quiet.result(False, "timeout")
    assert quiet.verdict() is None          # one failure and no good answer: not proven either way


def test_a_report_reads_as_one_phrase():
    r = DeviceReport(device="pi-1", time_us=0, bundle="a" * 16)
    assert r.line() == f"active {'a' * 16}"
    assert DeviceReport(device="pi-1", time_us=0, bundle="a" * 16, healthy=False).line().endswith("(probation)")
    up = DeviceReport(device="pi-1", time_us=0, bundle="a" * 16, state="updating", target="b" * 16, progress=0.4)
    assert up.line() == f"updating {'b' * 16} 40 %"
    bad = DeviceReport(device="pi-1", time_us=0, bundle="a" * 16, state="refused", reason="self-test", detail="x")
    assert bad.line() == "refused self-test: x"
    assert os.environ.get("EDGESPLIT_FAILPOINTS") is None
