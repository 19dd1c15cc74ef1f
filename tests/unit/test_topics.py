"""Topic names, id validation, QoS/retain rules and dead-letter messages."""
import pytest

from protocol import TopicError, topics


def test_topic_builders_and_parse_round_trip():
    assert topics.features("home", "pi-01") == "edgesplit/v1/home/pi-01/features"
    assert topics.results("home", "pi-01") == "edgesplit/v1/home/pi-01/results"
    assert topics.status("home", "pi-01") == "edgesplit/v1/home/pi-01/status"
    assert topics.dead_letter("home", "pi-01") == "edgesplit/v1/home/pi-01/dead-letter"
    for kind in topics.KINDS:
        name = topics.topic("fleet_A", "cam.7", kind)
        assert topics.parse(name) == ("fleet_A", "cam.7", kind)
        assert topics.parse(name).device == "cam.7"


def test_shared_and_wildcard_filters():
    assert topics.shared_features("workers") == "$share/workers/edgesplit/v1/+/+/features"
    assert topics.shared_features("workers", fleet="home") == "$share/workers/edgesplit/v1/home/+/features"
    assert topics.all_features() == "edgesplit/v1/+/+/features"
    assert topics.all_dead_letters("home") == "edgesplit/v1/home/+/dead-letter"
    with pytest.raises(TopicError, match="share group"):
        topics.shared_features("a/b")


@pytest.mark.parametrize("bad, fragment", [
    ("", "is empty"),
    ("pi+1", "contains '+'"),
    ("pi#", "contains '#'"),
    ("a/b", "contains '/'"),
    ("pi\x00", "NUL"),
    ("pi:1", "password-file separator"),
    ("pi 1", "whitespace"),
    ("pi\n", "whitespace"),
    ("pi\u200b", "unprintable"),
    ("x" * 65, "65 characters long"),
    (7, "must be a string"),
])
def test_bad_ids_are_refused_with_a_fix(bad, fragment):
    with pytest.raises(TopicError) as info:
        topics.features("home", bad)
    assert fragment in str(info.value)
    assert info.value.fix


def test_ids_may_be_64_characters_and_unicode():
    assert topics.check_id("x" * 64) == "x" * 64
    assert topics.parse(topics.status("küche", "kamera-ü"))[:2] == ("küche", "kamera-ü")


@pytest.mark.parametrize("name, fragment", [
    ("edgesplit/v2/home/pi/features", "protocol version 'v2'"),
    ("edgesplit/v1/home/pi/tensors", "unknown kind 'tensors'"),
    ("edgesplit/v1/home/features", "not an edgesplit topic"),
    ("other/v1/home/pi/features", "not an edgesplit topic"),
    ("edgesplit/v1/+/pi/features", "contains '+'"),
    ("$share/g/edgesplit/v1/home/pi/features", "shared-subscription filter"),
])
def test_parse_refuses_foreign_and_wildcard_topics(name, fragment):
    with pytest.raises(TopicError) as info:
        topics.parse(name)
    assert fragment in str(info.value)


def test_tensors_and_results_are_never_retained_status_is():
    assert topics.delivery("features") == topics.Delivery(qos=1, retain=False)
    assert topics.delivery("results") == topics.Delivery(qos=1, retain=False)
    assert topics.delivery("dead-letter").retain is False
    assert topics.delivery("status") == topics.Delivery(qos=1, retain=True)
    with pytest.raises(TopicError, match="unknown topic kind"):
        topics.delivery("tensors")


def test_dead_letter_message_keeps_a_bounded_prefix():
    payload = b"ES\x01" + bytes(range(256)) * 20
    data = topics.encode_dead_letter("bad-mac", "edgesplit/v1/home/pi/features", payload,
                                     detail="bad MAC: altered", worker="w1", time_us=123)
    letter = topics.decode_dead_letter(data)
    assert letter.reason == "bad-mac" and letter.topic.endswith("/features") and letter.worker == "w1"
    assert letter.payload_size == len(payload) and letter.payload == payload[:topics.DEFAULT_PREFIX_BYTES]
    assert letter.truncated and letter.time_us == 123 and letter.detail == "bad MAC: altered"
    assert data.startswith(b"{")  # JSON: readable with mosquitto_sub
    whole = topics.decode_dead_letter(topics.encode_dead_letter("x", "t", b"abc", prefix_bytes=10))
    assert whole.payload == b"abc" and not whole.truncated and whole.time_us > 0
    with pytest.raises(TopicError, match="not a dead-letter message"):
        topics.decode_dead_letter(b"ES\x01garbage")
