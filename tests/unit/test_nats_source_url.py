"""``--source nats://...``: the URL a user writes, and the topic <-> subject mapping of NATS's MQTT gateway."""
from __future__ import annotations

import pytest

from cloud.sources import is_nats_url
from cloud.sources.nats import features_subject, parse_nats_url, subject_to_topic
from protocol.errors import UsageError


def test_servers_defaults_and_options():
    u = parse_nats_url("nats://a:4222,b:4223,c?max_bytes=512MiB&max_age=2m&ack_wait=5s&replicas=1&window=64")
    assert u.servers == ("nats://a:4222", "nats://b:4223", "nats://c:4222")
    assert (u.max_bytes, u.max_age_s, u.ack_wait_s, u.replicas, u.window) == (512 << 20, 120.0, 5.0, 1, 64)
    d = parse_nats_url("nats://127.0.0.1:4222")
    assert (d.stream, d.max_bytes, d.max_age_s, d.ack_wait_s) == ("EDGESPLIT_FEATURES", 1 << 30, 600.0, 30.0)


def test_password_hidden_and_tls():
    u = parse_nats_url("tls://cloud:s3cret@nats.example:4222?ca=/etc/ca.pem")
    assert u.tls and u.username == "cloud" and u.password == "s3cret" and u.ca == "/etc/ca.pem"
    assert "s3cret" not in str(u) and str(u) == "tls://cloud:***@nats.example:4222"


@pytest.mark.parametrize("url, says", [
    ("nats://a:4222?max_bytes=lots", "is not a size"),
    ("nats://a:4222?max_age=forever", "is not a duration"),
    ("nats://a:4222?replicas=0", "not a usable count"),
    ("nats://a:99999", "is not host:port"),
    ("nats://a:4222?acks=1", "unknown NATS source option"),
    ("amqp://a:5672", "not a NATS one"),
    ("nats://a:4222?stream=has.dot", "not usable"),
])
def test_bad_urls_say_what_and_how(url, says):
    with pytest.raises(UsageError) as err:
        parse_nats_url(url)
    assert says in err.value.message and err.value.fix


def test_subjects_as_the_mqtt_gateway_maps_topics():
    # '/' becomes '.', and a '.' inside a level becomes '//' (seen on nats-server 2.15.1)
    assert subject_to_topic("edgesplit.v1.lab.pi//01.features") == "edgesplit/v1/lab/pi.01/features"
    assert features_subject() == "edgesplit.v1.*.*.features"
    assert features_subject("lab.2") == "edgesplit.v1.lab//2.*.features"


def test_scheme_picks_the_source():
    assert is_nats_url("nats://a:4222") and is_nats_url("tls://a:4222")
    assert not is_nats_url("mqtt://a:1883") and not is_nats_url(None)
