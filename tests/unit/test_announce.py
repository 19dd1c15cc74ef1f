"""Signed bundle announcements (protocol.announce) and the chunked archive they describe (protocol.transfer)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from fixtures_core import require

require("cryptography")

from protocol import announce, topics, transfer  # noqa: E402
from protocol.errors import UpdateError, UpdateReason  # noqa: E402


@pytest.fixture
def keys(tmp_path):
    priv, pub, made = announce.generate_keys(tmp_path / "fleet")
    assert made and oct(priv.stat().st_mode & 0o777) == "0o600"
    return announce.load_signing_key(priv), announce.load_verify_key(pub)


def _ref(size=5000, chunk=1024, bundle_id="0123456789abcdef"):
    data = os.urandom(size)
    chunks = [hashlib.sha256(data[i:i + chunk]).hexdigest() for i in range(0, size, chunk)]
    ref = announce.BundleRef(bundle_id=bundle_id, model="m", cut="c", input_shape=(28, 28, 1), size=size,
                             sha256=hashlib.sha256(data).hexdigest(), files={"manifest.json": "0" * 64},
                             chunk_size=chunk, chunks=chunks)
    return ref, data


def _ann(ref, **kw):
    return announce.Announcement(fleet="lab", seq=kw.pop("seq", 7), issued_us=1, action="install",
                                 bundle_id=ref.bundle_id, bundle=ref, **kw)


def test_a_signed_announcement_round_trips_and_any_change_breaks_its_signature(keys):
    sk, vk = keys
    ref, _ = _ref()
    msg = announce.encode(_ann(ref), sk)
    got = announce.decode(msg, vk, fleet="lab", device="pi-001")
    assert got.bundle == ref and got.seq == 7
    env = json.loads(msg)
    body = json.loads(env["body"])
    body["seq"] = 99                                        # a replayed announcement given a higher seq
    env["body"] = json.dumps(body)
    with pytest.raises(UpdateError) as e:
        announce.decode(json.dumps(env).encode(), vk, fleet="lab")
    assert e.value.reason is UpdateReason.BAD_SIGNATURE and "does not verify" in e.value.message


def test_a_key_the_device_does_not_trust_and_another_fleet_are_refused(keys, tmp_path):
    sk, vk = keys
    other, _, _ = announce.generate_keys(tmp_path / "other")
    ref, _ = _ref()
    with pytest.raises(UpdateError) as e:
        announce.decode(announce.encode(_ann(ref), announce.load_signing_key(other)), vk, fleet="lab")
    assert e.value.reason is UpdateReason.BAD_SIGNATURE and "not trusted here" in e.value.message
    with pytest.raises(UpdateError) as e:
        announce.decode(announce.encode(_ann(ref), sk), vk, fleet="home")
    assert e.value.reason is UpdateReason.NOT_ADDRESSED
    with pytest.raises(UpdateError) as e:                   # copied onto another device's topic
        announce.decode(announce.encode(_ann(ref, devices=["pi-001"]), sk), vk, fleet="lab", device="pi-002")
    assert e.value.reason is UpdateReason.NOT_ADDRESSED
    with pytest.raises(UpdateError) as e:
        announce.decode(b"not json", vk)
    assert e.value.reason is UpdateReason.BAD_ANNOUNCEMENT


def test_keys_are_kept_when_they_exist(tmp_path):
    first = announce.generate_keys(tmp_path)
    again = announce.generate_keys(tmp_path)
    assert again[2] is False
    assert announce.load_verify_key(first[1]).key_id == announce.load_signing_key(again[0]).key_id


def test_the_fleet_topics_never_match_a_device_filter():
    assert topics.fleet_announce("lab") == "edgesplit/v1/lab/announce"
    assert topics.chunk("lab", "0123456789abcdef", 3) == "edgesplit/v1/lab/bundle/0123456789abcdef/3"
    from protocol.mqtt import filter_matches

    for name in (topics.fleet_announce("lab"), topics.chunk("lab", "0123456789abcdef", 3)):
        assert not filter_matches(topics.all_of(topics.ANNOUNCE, "lab"), name)
        assert not filter_matches(topics.all_features("lab"), name)
    assert topics.parse(topics.report("lab", "pi-1")).kind == "report"


def test_a_part_file_resumes_from_what_it_holds_and_refuses_a_wrong_chunk(tmp_path):
    ref, data = _ref()
    part = transfer.PartFile(ref, tmp_path)
    assert part.missing() == [0, 1, 2, 3, 4]
    assert part.write(3, data[3072:4096]) and part.write(4, data[4096:])
    with pytest.raises(UpdateError) as e:
        part.write(0, data[1:1025])
    assert e.value.reason is UpdateReason.BAD_CHUNK
    again = transfer.PartFile(ref, tmp_path)                # a restart: what is on disk is hashed again
    assert again.missing() == [0, 1, 2]
    for i in again.missing():
        again.write(i, data[i * 1024:(i + 1) * 1024])
    done = again.finish()
    assert done.read_bytes() == data and transfer.PartFile(ref, tmp_path).complete


def test_a_file_url_fills_the_part(tmp_path):
    ref, data = _ref()
    src = tmp_path / "b.tar.gz"
    src.write_bytes(data)
    ref = announce.BundleRef(**{**{f: getattr(ref, f) for f in ref.__struct_fields__}, "url": src.as_uri()})
    part = transfer.PartFile(ref, tmp_path / "in")
    part.write(0, data[:1024])
    assert transfer.fetch_url(ref.url, part).read_bytes() == data
