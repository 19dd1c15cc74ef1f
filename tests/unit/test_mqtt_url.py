"""Broker URLs as users write them, and the mistakes they make."""
import random

import pytest

from protocol.errors import ConfigError, UsageError
from protocol.mqtt import Backoff, MqttClient, Will, filter_matches, parse_url


def test_plain_url_defaults():
    u = parse_url("mqtt://broker.local")
    assert (u.host, u.port, u.tls, u.username, u.protocol) == ("broker.local", 1883, False, None, "3.1.1")


def test_tls_url_with_credentials_and_options(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    u = parse_url(f"mqtts://pi%2D01:p%40ss@10.0.0.5?ca={ca}&protocol=5")
    assert (u.host, u.port, u.tls, u.username, u.password, u.ca, u.protocol) == \
        ("10.0.0.5", 8883, True, "pi-01", "p@ss", str(ca), "5")
    assert "p@ss" not in str(u) and "***" in str(u) and "p@ss" not in repr(u)


def test_explicit_arguments_win_over_the_url():
    u = parse_url("mqtt://a:b@h:1999", username="c", password="d", protocol=5)
    assert (u.username, u.password, u.port, u.protocol) == ("c", "d", 1999, "5")


@pytest.mark.parametrize("url, words", [
    ("localhost:1883", "not a URL"),
    ("http://h:1883", "scheme"),
    ("mqtt://:1883", "no host"),
    ("mqtt://h:99999", "invalid port"),
    ("mqtt://h:1883/topic", "path"),
    ("mqtt://h?cafile=x", "did you mean 'ca'"),
    ("mqtt://h?ca=/etc/ca.pem", "mqtts://"),
    ("mqtt://h?protocol=4.0", "protocol version"),
    ("mqtt://:pw@h", "without a user name"),
])
def test_bad_urls_say_what_to_do(url, words):
    with pytest.raises(UsageError) as err:
        parse_url(url)
    assert words in (err.value.message + " " + (err.value.fix or ""))


def test_missing_ca_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_url(f"mqtts://h?ca={tmp_path / 'nope.pem'}")
    assert err.value.exit_code == 78


def test_persistent_session_needs_a_client_id():
    with pytest.raises(UsageError):
        MqttClient("mqtt://127.0.0.1:1", clean_session=False)


def test_will_rejects_wildcards():
    with pytest.raises(UsageError):
        Will("edgesplit/v1/+/d/status")
    assert Will("a/b", "offline").payload == b"offline"


@pytest.mark.parametrize("flt, topic, ok", [
    ("$share/g/edgesplit/v1/+/+/features", "edgesplit/v1/f/d/features", True),
    ("$share/g/edgesplit/v1/+/+/features", "edgesplit/v1/f/d/results", False),
    ("edgesplit/v1/f/#", "edgesplit/v1/f/d/results", True),
    ("$share/g", "anything", False),
])
def test_filter_matching_strips_share_prefix(flt, topic, ok):
    assert filter_matches(flt, topic) is ok


def test_backoff_is_full_jitter_and_capped():
    b = Backoff(initial=0.5, maximum=8.0)
    rng = random.Random(1)
    for attempt in range(12):
        cap = min(8.0, 0.5 * 2 ** attempt)
        draws = [b.delay(attempt, rng) for _ in range(200)]
        assert all(0 < d <= cap for d in draws)
        assert max(draws) > 0.6 * cap and min(draws) < 0.4 * cap    # spread over the whole range
