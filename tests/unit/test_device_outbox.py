"""device.outbox: what the device accepted survives a restart; the bound and its policy hold."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from device.outbox import OutboxEntry, OutboxFull, SqliteOutbox
from protocol.errors import UsageError

BID = "0123456789abcdef"


def entry(rid: int, n: int = 8, name: str | None = None) -> OutboxEntry:
    t = (np.arange(n, dtype=np.int16) % 100 - 50).astype(np.int8).reshape(2, -1)
    return OutboxEntry(rid, name or f"img{rid}.png", BID, t, 0.05, -3, 1_700_000_000_000_000 + rid % 1000)


def test_pending_inputs_survive_a_restart(tmp_path):
    path = tmp_path / "outbox.sqlite"
    box = SqliteOutbox(path, device_id="pi-01")
    big = 2**64 - 5   # request ids are uint64; SQLite integers are signed
    assert box.add([entry(1), entry(2), entry(big)]) == []
    assert box.remove([2]) == 1
    box.close()

    box = SqliteOutbox(path, device_id="pi-01")
    pending = box.pending()
    assert [e.request_id for e in pending] == [1, big]
    assert len(box) == 2
    e = pending[1]
    assert e.name == f"img{big}.png" and e.bundle_id == BID and e.scale == 0.05 and e.zero_point == -3
    np.testing.assert_array_equal(e.tensor, entry(big).tensor)
    assert e.tensor.dtype == np.int8 and e.tensor.shape == (2, 4)
    assert box.remove([1, big, 12345]) == 2   # an unknown id (a duplicate answer) is harmless
    assert len(box) == 0 and box.nbytes == 0
    box.close()


def test_drop_oldest_makes_room_and_warns_once(tmp_path, caplog):
    box = SqliteOutbox(tmp_path / "o.sqlite", device_id="pi-01", max_entries=3)
    box.add([entry(1), entry(2), entry(3)])
    with caplog.at_level(logging.WARNING, logger="device.outbox"):
        assert box.add([entry(4)]) == [1]
        assert box.add([entry(5), entry(6)]) == [2, 3]
    assert [e.request_id for e in box.pending()] == [4, 5, 6]
    assert box.dropped == 3
    assert sum("is full" in r.message for r in caplog.records) == 1


def test_reject_policy_keeps_what_was_accepted(tmp_path):
    box = SqliteOutbox(tmp_path / "o.sqlite", device_id="pi-01", max_bytes=20, policy="reject")
    box.add([entry(1), entry(2)])   # 8 bytes each
    with pytest.raises(OutboxFull, match="is full") as e:
        box.add([entry(3)])
    assert "--outbox-max" in e.value.fix or "cloud worker" in e.value.fix
    assert [x.request_id for x in box.pending()] == [1, 2]
    box.remove([1])
    box.add([entry(3)])
    assert [x.request_id for x in box.pending()] == [2, 3]


def test_an_outbox_belongs_to_one_device(tmp_path):
    SqliteOutbox(tmp_path / "o.sqlite", device_id="pi-01").close()
    with pytest.raises(UsageError, match="belongs to device 'pi-01'"):
        SqliteOutbox(tmp_path / "o.sqlite", device_id="pi-02")


def test_bad_settings_and_corrupt_files(tmp_path):
    with pytest.raises(UsageError, match="unknown outbox policy"):
        SqliteOutbox(tmp_path / "a.sqlite", device_id="d", policy="lifo")
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"garbage" * 1000)
    with pytest.raises(UsageError, match="cannot open the outbox"):
        SqliteOutbox(bad, device_id="d")
