"""The device's end of the broker: its MQTT client is built here, outside the agent.

The agent only publishes, subscribes and reads ``connected``/``connects``/``error``;
how to reach the broker (URL, user, password, CA, client id, session, protocol) is
decided here from a :class:`~device.config.DeviceConfig` and its
:class:`~device.credentials.Credentials`, so that a test, a benchmark or another
transport can hand the agent a client of its own making.

Availability, three-valued as Frigate does it, and retained so a late subscriber
learns it: ``online`` after the first connect and after every reconnect (here, on the
network thread, even while the agent is idle between bursts), ``stopped`` on a clean
exit (:meth:`device.agent.DeviceAgent.stop`), and ``offline`` as the QoS-1 last will
the broker publishes when the device vanishes (set here, before connecting).
"""
from __future__ import annotations

import logging

from device.config import DeviceConfig
from device.credentials import Credentials, fleet_key_path, resolve_credentials
from protocol import topics

log = logging.getLogger(__name__)

__all__ = ["mqtt_client", "open_agent"]


def mqtt_client(config: DeviceConfig, credentials: Credentials | None = None):
    """An unstarted :class:`protocol.mqtt.MqttClient` for this device, with its last will and ``online``."""
    from protocol.mqtt import MqttClient, Will

    creds = credentials or Credentials()
    status = topics.status(config.fleet, config.device_id)
    d = topics.delivery(topics.STATUS)

    def online() -> None:
        client.publish(status, topics.STATUS_ONLINE.encode(), qos=d.qos, retain=d.retain)

    client = MqttClient(
        config.broker_url, client_id=config.mqtt_client_id, username=creds.username, password=creds.password,
        tls_ca=creds.ca_path,
        # the default leaves a URL's ?protocol=5 in force
        protocol=None if config.protocol == "3.1.1" else config.protocol,
        # with an outbox, a persistent session also keeps the results that arrive while we are away
        clean_session=not config.persistent_session,
        will=Will(status, topics.STATUS_OFFLINE.encode(), qos=1, retain=True), on_online=online)
    return client


def open_agent(config: DeviceConfig, env: dict | None = None, *, error=None, **kwargs):
    """A :class:`~device.agent.DeviceAgent` for ``config``: its credentials read, its client built; with a
    fleet key, its bundle from the update store and an updater (``device.update``); with a metrics port,
    its metrics served (``device.metrics``).

    ``error``: the exception class for unusable credentials (default ConfigError, exit 78;
    the command line passes UsageError).  ``kwargs`` go to the agent.
    """
    from device.agent import DeviceAgent

    creds = resolve_credentials(config, env, error=error)
    client = mqtt_client(config, creds)
    # the client's broker prints without a password (a command line's URL may hold one)
    log.log(kwargs.pop("log_level", logging.DEBUG), "device %s (fleet %s), broker %s, credentials from %s",
            config.device_id, config.fleet, client.broker, creds.source)
    fleet_key = fleet_key_path(config, env, error=error)
    if fleet_key is not None and "updater" not in kwargs:
        # bundle updates: the bundle to run is the store's (the configured one until an update)
        from device.bundles import BundleStore
        from device.update import Updater
        from protocol.announce import load_verify_key

        key = load_verify_key(fleet_key)
        store = BundleStore(config.state_dir / "bundles", config.bundle)
        kwargs["bundle"] = store.open()
        kwargs["updater"] = Updater(config, store, key)
        log.info("bundle updates signed by fleet key %s; running bundle %s", key.key_id, kwargs["bundle"].bundle_id)
    agent = DeviceAgent(config, client, key=creds.key, **kwargs)
    if config.metrics_port:
        from device.metrics import serve

        agent.on_stop.append(serve(agent, config.metrics_host, config.metrics_port).close)
    return agent
