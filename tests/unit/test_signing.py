"""Keys, MACs and the replay window."""
import os
import stat

import numpy as np
import pytest

from protocol import Frame, FrameError, ReplayWindow, UsageError, decode_frame, encode_frame
from protocol.signing import (compute_mac, format_key, generate_key, key_for, load_key, load_keys, parse_key,
                              verify_mac, write_key)

NOW = 1_700_000_000_000_000


def test_generated_keys_are_random_32_bytes():
    a, b = generate_key(), generate_key()
    assert len(a) == 32 and a != b


@pytest.mark.parametrize("fmt", ["hex", "base64"])
def test_key_files_round_trip_and_are_private(tmp_path, fmt):
    path = tmp_path / "keys" / "pi-01.key"
    key = write_key(path, fmt=fmt)
    assert load_key(path) == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert parse_key(format_key(key, fmt)) == key


def test_load_keys_reads_one_file_per_device(tmp_path):
    k1, k2 = write_key(tmp_path / "pi-01.key"), write_key(tmp_path / "pi-02.key")
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_keys(tmp_path) == {"pi-01": k1, "pi-02": k2}


@pytest.mark.parametrize("text, fragment", [
    ("", "exactly one key line"),
    ("# only a comment\n", "exactly one key line"),
    ("00ff\n", "at least 16 are needed"),
    ("not a key!\n", "neither hex nor base64"),
    ("aa" * 32 + "\n" + "bb" * 32, "exactly one key line"),
])
def test_malformed_key_files_say_what_is_wrong(tmp_path, text, fragment):
    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_key(path)
    assert fragment in str(info.value) and "bad.key" in str(info.value)


def test_missing_key_file_and_directory():
    with pytest.raises(UsageError, match="does not exist"):
        load_key("/nonexistent/pi.key")
    with pytest.raises(UsageError, match="does not exist"):
        load_keys("/nonexistent")


def test_mac_is_16_bytes_and_depends_on_key_and_data():
    key = generate_key()
    tag = compute_mac(key, b"head", b"er")
    assert len(tag) == 16 and tag == compute_mac(key, b"header")
    assert verify_mac(key, tag, b"header")
    assert not verify_mac(key, tag, b"headex")
    assert not verify_mac(generate_key(), tag, b"header")


def test_key_for_sources():
    key = generate_key()
    assert key_for(None, "pi") is None
    assert key_for(key, "anyone") == key
    assert key_for({"pi": key}, "pi") == key
    assert key_for(lambda d: key if d == "pi" else None, "pi") == key
    with pytest.raises(FrameError, match="unknown device 'x'"):
        key_for({"pi": key}, "x")
    with pytest.raises(UsageError, match="at least 16"):
        key_for(b"short", "pi")


# ---------------------------------------------------------------- replay window

def test_replay_window_accepts_new_frames_and_refuses_replays():
    w = ReplayWindow(window_s=60)
    for seq in range(5):
        w.check("pi-01", seq, NOW + seq, now_us=NOW)
    w.check("pi-02", 0, NOW, now_us=NOW)  # per device
    with pytest.raises(FrameError, match="replayed frame: device 'pi-01' already sent seq 3") as info:
        w.check("pi-01", 3, NOW + 3, now_us=NOW + 10)
    assert info.value.reason == "replay"
    assert len(w) == 2


def test_replay_window_refuses_frames_outside_the_time_window():
    w = ReplayWindow(window_s=30)
    with pytest.raises(FrameError, match="31.0 s old, outside the replay window of ±30 s") as info:
        w.check("pi", 1, NOW - 31_000_000, now_us=NOW)
    assert info.value.reason == "stale" and "NTP" in info.value.fix
    with pytest.raises(FrameError, match="in the future"):
        w.check("pi", 2, NOW + 31_000_000, now_us=NOW)


def test_replay_of_a_forgotten_frame_is_still_refused():
    w = ReplayWindow(window_s=60, per_device=4)
    for seq in range(10):
        w.check("pi", seq, NOW + seq, now_us=NOW)
    with pytest.raises(FrameError, match="older than the replay window remembers"):
        w.check("pi", 2, NOW + 2, now_us=NOW)


def test_a_device_that_restarts_its_counter_is_accepted():
    w = ReplayWindow(window_s=60, per_device=4)
    for seq in range(10):
        w.check("pi", seq, NOW + seq, now_us=NOW)
    w.check("pi", 0, NOW + 1000, now_us=NOW)  # after a reboot: seq 0 again, but a new send time
    w.check("pi", 1, NOW + 1001, now_us=NOW)


def test_replay_window_forgets_old_devices_beyond_its_bound():
    w = ReplayWindow(max_devices=3)
    for d in range(5):
        w.check(f"pi-{d}", 0, NOW, now_us=NOW)
    assert len(w) == 3


def test_worker_path_signed_frame_then_replay(tmp_path):
    """What a worker does: decode with the device keys, then ask the window."""
    key = write_key(tmp_path / "pi-01.key")
    keys = load_keys(tmp_path)
    frame = Frame.features(np.array([1, 2, 3], np.int8), request_id=1, device_id="pi-01",
                           bundle_id="0123456789abcdef", seq=1, t_send_us=NOW)
    payload = encode_frame(frame, key=key)
    w = ReplayWindow(window_s=60, clock=lambda: NOW / 1e6)
    w.check_frame(decode_frame(payload, key=keys))
    with pytest.raises(FrameError, match="replayed frame"):
        w.check_frame(decode_frame(payload, key=keys))
