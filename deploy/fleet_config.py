"""What ``edgesplit broker config`` adds for bundle updates: the fleet's signing key and the ACL lines.

* ``<out>/fleet/fleet.key`` (0600): the operator's Ed25519 key that signs announcements
  (``protocol.announce``); ``fleet.pub`` goes into every device's, cloud user's, gateway's and
  operator's credential directory.  Kept on a re-run; ``--rotate`` makes a new one (every
  device then needs its new ``fleet.pub``).
* ACL lines, per role (everything not listed stays denied):

  ======== ===========================================================================
  device   reads the fleet's announcement, its own announcements and the fleet's bundle
           chunks, its own dead letters; writes its own report
  cloud    reads the fleet's and every device's announcements and the bundle chunks
  operator writes announcements (fleet and per device) and bundle chunks; reads them
           back, and every device's status, report and dead letters
  gateway  carries the device's side of all this across an edge bridge
  ======== ===========================================================================
"""
from __future__ import annotations

from pathlib import Path

from protocol import announce, topics

__all__ = ["write_fleet_keys", "acl_lines", "FLEET_DIR"]

FLEET_DIR = "fleet"


def write_fleet_keys(out_dir: str | Path, *, rotate: bool = False) -> tuple[Path, Path, bool]:
    """``<out>/fleet/fleet.key`` and ``fleet.pub`` (kept unless ``rotate``): (private, public, made anew?)."""
    return announce.generate_keys(Path(out_dir) / FLEET_DIR, keep=not rotate)


def acl_lines(fleet: str, role: str, user: str) -> list[str]:
    """The bundle-update lines of one user's ACL block (``role``: device, cloud, operator, gateway)."""
    p = f"{topics.PREFIX}/{fleet}"
    chunks = f"{p}/{topics.CHUNK}/#"
    if role == "device":
        return [f"topic read {topics.fleet_announce(fleet)}",
                f"topic read {topics.device_announce(fleet, user)}",
                f"topic read {chunks}",
                f"topic read {topics.dead_letter(fleet, user)}",
                f"topic write {topics.report(fleet, user)}"]
    if role == "cloud":
        return [f"topic read {topics.fleet_announce(fleet)}",
                f"topic read {topics.all_of(topics.ANNOUNCE, fleet)}",
                f"topic read {chunks}"]
    if role == "operator":
        return [f"topic readwrite {topics.fleet_announce(fleet)}",
                f"topic readwrite {topics.all_of(topics.ANNOUNCE, fleet)}",
                f"topic readwrite {chunks}",
                f"topic read {topics.all_of(topics.STATUS, fleet)}",
                f"topic read {topics.all_of(topics.REPORT, fleet)}",
                f"topic read {topics.all_dead_letters(fleet)}"]
    if role == "gateway":
        return [f"topic read {topics.fleet_announce(fleet)}",
                f"topic read {topics.all_of(topics.ANNOUNCE, fleet)}",
                f"topic read {chunks}",
                f"topic read {topics.all_dead_letters(fleet)}",
                f"topic write {topics.all_of(topics.REPORT, fleet)}"]
    raise ValueError(f"unknown role {role!r}")
