"""``edgesplit device run``'s options, made from :class:`~device.config.DeviceConfig`'s settings.

:func:`flags` lists them for the command line's parser; :func:`from_flags` turns what was given
into a config, filled from ``edgesplit broker config``'s ``broker.json`` where a flag is not
given.  Only the standard library at module level (the parser is built on a Pi too).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from device.config import SETTINGS, DeviceConfig, Setting, _check, _cross_problems, _default

__all__ = ["flags", "from_flags"]


def flags() -> Iterator[tuple[str, str, Setting, Any]]:
    """(flag, field name, setting, its default for `device run`) for each setting the command line has."""
    for name, s in SETTINGS.items():
        if s.flag:
            yield s.flag, name, s, _default(name, service=False)


def from_flags(given: dict[str, Any]) -> DeviceConfig:
    """A :class:`DeviceConfig` from ``edgesplit device run``'s options (field name -> value, None: not given).

    ``credentials`` (a device directory from ``edgesplit broker config``, or its
    ``--out`` directory with ``device_id``) supplies the broker URL, device id,
    fleet, user and client id that are not given.  Relative file paths are taken
    from the working directory.  UsageError (exit 2) names the flag at fault.
    """
    from protocol.errors import UsageError

    v = {k: val for k, val in given.items() if val is not None}
    facts: dict = {}
    if v.get("credentials"):
        from device.credentials import directory_facts, find_device_dir

        v["credentials"] = str(find_device_dir(v["credentials"], v.get("device_id")))
        facts = directory_facts(v["credentials"])
    if v.get("device_id") and facts.get("device_id") and v["device_id"] != facts["device_id"]:
        raise UsageError(f"--device-id {v['device_id']} does not match the credentials of {facts['device_id']}",
                         fix="drop --device-id, or give that device's credential directory")
    for name in ("broker_url", "device_id", "fleet", "username", "client_id"):
        if not v.get(name) and facts.get(name):
            v[name] = facts[name]
    if not v.get("broker_url"):
        raise UsageError("no broker given", fix="pass --broker mqtt://host:1883 (or --credentials DIR)")
    if not v.get("device_id"):
        raise UsageError("no device id given", fix="pass --device-id ID (or --credentials DIR)")
    values = {name: v.get(name, _default(name, service=False)) for name in SETTINGS}
    problems = []
    for name in v:                          # the defaults hold by construction
        s = SETTINGS[name]
        values[name], problem = _check(s, values[name], s.flag or "INPUT")
        if problem:
            problems.append(problem)
    if not problems:
        problems = _cross_problems(values, lambda n: SETTINGS[n].flag or "INPUT", file=False)
    if problems:
        raise UsageError("; ".join(problems), fix="correct the options named (edgesplit device run --help)")
    cwd = Path.cwd()
    for name in ("password_file", "ca_file", "key_file", "fleet_key", "outbox"):
        if name in v and values[name]:       # given on the command line: from where the user stands
            values[name] = str(cwd / os.path.expanduser(values[name]))
    values["bundle"] = cwd / os.path.expanduser(str(values["bundle"]))
    # an outbox is only worth its disk when the broker also keeps the answers for it
    values["persistent_session"] = bool(values["outbox"]) or values["persistent_session"]
    return DeviceConfig(**values)           # which makes paths Paths and sources a tuple
