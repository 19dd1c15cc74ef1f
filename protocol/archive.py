"""Bundle archives: a ``.tar.gz`` from anywhere extracted without trusting it, and a packer that
gives the same bytes for the same files (``protocol.manifest`` says which files and bounds).
"""
from __future__ import annotations

import gzip
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import BundleError

__all__ = ["Limits", "extract", "pack"]


@dataclass(frozen=True)
class Limits:
    """What an archive may hold: file names, entries, sizes (one small file, e.g. a manifest, smaller)."""

    file_name: re.Pattern
    small_file: str
    max_small_bytes: int
    max_file_bytes: int
    max_total_bytes: int
    max_members: int


def extract(tar_path: Path, dest: Path, limits: Limits) -> None:
    """Extract the files of ``tar_path`` (flat, or all in one folder) into ``dest`` without trusting it.

    Regular files only, no path outside ``dest``, names matching ``limits.file_name``, sizes and
    the number of entries bounded, the gzip stream read to its end (its CRC checked).
    BundleError naming what is wrong.
    """
    broken = f"re-run `edgesplit convert` to rebuild it, or copy {tar_path.name} again"
    prefix = None
    total = 0
    try:
        with tarfile.open(tar_path, mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > limits.max_members:
                    raise BundleError(f"{tar_path} holds more than {limits.max_members} entries; a bundle has a few",
                                      fix=broken)
                parts = member.name.split("/")
                if member.name.startswith("/") or ".." in parts or any(p in ("", ".") for p in parts[:-1]):
                    raise BundleError(f"{tar_path} contains an unsafe path {member.name!r}", fix=broken)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise BundleError(f"{tar_path} contains {member.name!r}, which is not a regular file "
                                      f"(links and devices are refused)", fix=broken)
                if len(parts) > 2:
                    raise BundleError(f"{tar_path} contains {member.name!r}, nested deeper than a bundle",
                                      fix=broken)
                top = parts[0] if len(parts) == 2 else ""
                if prefix is None:
                    prefix = top
                elif top != prefix:
                    raise BundleError(f"{tar_path} mixes files from several folders ({prefix!r}, {top!r})",
                                      fix=broken)
                name = parts[-1]
                if not limits.file_name.match(name):
                    raise BundleError(f"{tar_path} contains an unexpected file name {member.name!r}", fix=broken)
                limit = limits.max_small_bytes if name == limits.small_file else limits.max_file_bytes
                total += member.size
                if member.size > limit or total > limits.max_total_bytes:
                    raise BundleError(f"{tar_path}: {member.name} is too large ({member.size} bytes)", fix=broken)
                src = tar.extractfile(member)
                with open(dest / name, "wb") as out:
                    # copy no more than the header declared, whatever the stream holds
                    remaining = member.size
                    while remaining:
                        chunk = src.read(min(remaining, 1 << 20))
                        if not chunk:
                            raise BundleError(f"{tar_path} is truncated inside {member.name}", fix=broken)
                        out.write(chunk)
                        remaining -= len(chunk)
            # Read to the end of the gzip stream so its CRC and length are checked (a cut-off
            # archive fails here); a few blocks of padding are normal, megabytes are not.
            trailing = 0
            while chunk := tar.fileobj.read(1 << 16):
                trailing += len(chunk)
                if trailing > 1 << 20:
                    raise BundleError(f"{tar_path} has unexpected data after its last file", fix=broken)
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BundleError(f"{tar_path} is truncated or corrupt ({exc})", fix=broken) from None


def pack(root: Path, names: list[str], dest: Path) -> Path:
    """Pack ``root/<name>`` for each name into ``dest`` as ``<root name>/<name>``, sorted, with zeroed
    times and owners, so the same files always give the same bytes; written atomically."""
    tmp = dest.with_name("." + dest.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(names):
            info = tarfile.TarInfo(f"{root.name}/{name}")
            info.size = (root / name).stat().st_size
            info.mode = 0o644
            info.mtime = 0
            with open(root / name, "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, dest)
    return dest
