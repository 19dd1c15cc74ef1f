"""The deploy role: brokers, broker configuration, device packages, image flashing.

Public names (each imported on first use, so ``deploy.broker`` does not pull in ``cryptography``):

    start_embedded, start_mosquitto, RunningBroker, mosquitto_binary, free_port   deploy.broker
    write_broker_config                                                          deploy.broker_config
    build_device_package, DevicePackage                                          deploy.device_package

``edgesplit flash`` is ``deploy.flash.flash`` (a module and a function of the same name: not listed here).
"""
from __future__ import annotations

from protocol.public import public_names

__all__, __getattr__, __dir__ = public_names(__name__, {
    "start_embedded": "deploy.broker",
    "start_mosquitto": "deploy.broker",
    "RunningBroker": "deploy.broker",
    "mosquitto_binary": "deploy.broker",
    "free_port": "deploy.broker",
    "write_broker_config": "deploy.broker_config",
    "build_device_package": "deploy.device_package",
    "DevicePackage": "deploy.device_package",
})
