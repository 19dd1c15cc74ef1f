"""The deploy role: brokers, broker configuration, device packages, image flashing.

Public names live in their modules (imported lazily, so ``deploy.broker`` does not pull in
``cryptography``):

    deploy.broker   start_embedded, start_mosquitto, RunningBroker, serve (`edgesplit broker`),
                    mosquitto_binary, free_port
"""
