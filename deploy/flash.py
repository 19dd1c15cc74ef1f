"""Prepare a Raspberry Pi OS image so that its first boot installs the edgesplit device.

``flash(image, device_package, ...)`` writes into the boot (FAT) partition of a
``.img`` (or, with ``i_know=True``, an SD card's block device) what first boot needs:

* the device package and ``edgesplit/firstboot.sh`` + ``edgesplit-firstboot.service``:
  a one-shot unit that waits for the network, unpacks the package, runs its
  ``install.sh`` and then deletes the package (it holds the broker password);
* for images that use **cloud-init** (Raspberry Pi OS Trixie and later: the boot
  partition has ``user-data``/``meta-data``/``network-config``, or ``cmdline.txt``
  says ``ds=nocloud``): ``user-data`` (host name, SSH key, a ``runcmd`` that stages
  the unit), ``network-config`` (Wi-Fi) and ``meta-data`` if the image has none;
* for older (Bookworm) images: ``firstrun.sh`` and the ``systemd.run=`` arguments
  in ``cmdline.txt``, the way Raspberry Pi Imager does it.

The FAT file system is written with mtools (``mcopy -i image@@offset``), never
mounted; the partition is found by parsing the MBR here.  Every file written is
read back and compared.  Files replaced are first saved under ``edgesplit/original/``.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Sequence

from protocol.errors import UsageError

log = logging.getLogger(__name__)

__all__ = ["flash", "FlashResult", "find_boot_partition", "BootPartition", "read_boot_file", "list_boot_files",
           "wpa_psk"]

TEMPLATES = Path(__file__).parent / "templates"
SECTOR = 512
# MBR partition types of FAT file systems (FAT12, FAT16 <32M, FAT16, FAT32 CHS, FAT32 LBA, FAT16 LBA)
FAT_TYPES = {0x01: "FAT12", 0x04: "FAT16", 0x06: "FAT16", 0x0B: "FAT32", 0x0C: "FAT32", 0x0E: "FAT16"}
# the other partitions a Raspberry Pi OS image (or a card made from one) may hold
PARTITION_TYPES = {0x83: "Linux", 0x82: "Linux swap"}
EXTENDED_TYPES = {0x05: "extended", 0x0F: "extended (LBA)", 0x85: "Linux extended"}
FIRSTRUN_ARGS = ("systemd.run=/boot/firstrun.sh", "systemd.run_success_action=reboot",
                 "systemd.unit=kernel-command-line.target")
FIRSTRUN_MARKER = "edgesplit-firstrun"
CLOUD_INIT_FILES = ("user-data", "meta-data", "network-config")
PKG_NAME = "device-package.tar.gz"
DEFAULT_GROUPS = ("users", "adm", "dialout", "audio", "netdev", "video", "plugdev", "input", "gpio", "spi", "i2c",
                  "render", "sudo")
_COMPRESSED = {b"\xfd7zXZ\x00": ".xz", b"\x1f\x8b": ".gz", b"PK\x03\x04": ".zip", b"\x28\xb5\x2f\xfd": ".zst",
               b"BZh": ".bz2"}
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_USERNAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)"
                      r"@openssh\.com)\s+[A-Za-z0-9+/]+={0,3}(\s+.*)?$")


@dataclasses.dataclass(frozen=True)
class BootPartition:
    """The FAT partition found in the MBR: its number (1-4), byte offset and size."""

    number: int
    offset: int
    size: int
    type_id: int
    fat: str
    cluster: int = 4096          # bytes per cluster: what the smallest file takes


@dataclasses.dataclass(frozen=True)
class FlashResult:
    """What ``flash`` wrote; ``summary()`` is what the command prints."""

    image: Path
    method: str                          # "cloud-init" or "firstrun"
    partition: BootPartition
    files: dict[str, str]                # path on the boot partition -> sha256 of what was written
    backups: tuple[str, ...]             # originals saved under edgesplit/original/
    hostname: str | None
    wifi_ssid: str | None
    ssh_user: str | None
    cmdline_before: str | None = None
    cmdline_after: str | None = None

    def summary(self) -> str:
        p = self.partition
        lines = [f"{self.image}: boot partition {p.number} ({p.fat}, {p.size // 2**20} MiB at byte {p.offset}) "
                 f"prepared for first boot ({self.method})"]
        for name in self.files:
            lines.append(f"  wrote    /{name}")
        if self.backups:
            lines.append(f"  saved    {', '.join(self.backups)} under /edgesplit/original/")
        if self.cmdline_after is not None and self.cmdline_after != self.cmdline_before:
            lines.append(f"  cmdline  + {' '.join(FIRSTRUN_ARGS)}")
        lines.append(f"  host     {self.hostname or '(image default)'}"
                     f"   wifi {self.wifi_ssid or '(none: Ethernet)'}"
                     f"   ssh {self.ssh_user + ' (key only)' if self.ssh_user else 'off'}")
        lines.append("  first boot installs the device package and logs to /edgesplit/install.log on the boot partition")
        return "\n".join(lines)


# ----------------------------------------------------------------- the image and its MBR

def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False


def _check_target(image: Path, i_know: bool) -> bool:
    """Refuse what we must not write; return True if ``image`` is a block device."""
    text = str(image)
    block = _is_block_device(image)
    if block or text.startswith("/dev/") or os.path.realpath(text).startswith("/dev/"):
        if not i_know:
            raise UsageError(f"{image} is a device, not an image file: writing to it changes a real disk",
                             fix="check it is the SD card you mean (lsblk), unmount it, then add --i-know")
        if not block:
            raise UsageError(f"{image} is not a block device", fix="give an .img file or an SD card's block device")
        _refuse_mounted(image)
        return True
    if not image.exists():
        raise UsageError(f"image {image} does not exist", fix="give the path of a Raspberry Pi OS .img file")
    if not image.is_file():
        raise UsageError(f"{image} is not a regular file", fix="give the path of a Raspberry Pi OS .img file")
    if not os.access(image, os.R_OK | os.W_OK):
        raise UsageError(f"cannot read and write {image}", fix="check its permissions (flash writes into the image)")
    if "@@" in text:
        raise UsageError(f"the image path {image} contains '@@', which mtools reads as an offset",
                         fix="rename or move the image")
    return False


def _refuse_mounted(device: Path) -> None:
    real = os.path.realpath(device)
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return
    for line in mounts:
        source, target = line.split()[:2]
        if source.startswith("/dev/") and os.path.realpath(source).startswith(real):
            raise UsageError(f"{source} (on {device}) is mounted at {target}: writing under a mounted file system "
                             f"corrupts it", fix=f"sudo umount {source}, then run flash again")


def _partitions(image: Path, mbr: bytes) -> list[tuple[int, int, int, int]]:
    """The MBR's used entries as (number, type, first sector, sector count)."""
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 446 + 16 * (i + 1)]
        start, count = struct.unpack_from("<II", entry, 8)
        if entry[4] == 0xEE:
            raise UsageError(f"{image} has a GPT partition table; Raspberry Pi OS images use MBR",
                             fix="give a Raspberry Pi OS .img file")
        if entry[4] and count:
            parts.append((i + 1, entry[4], start, count))
    return parts


def _refuse_layout(image: Path, parts: list[tuple[int, int, int, int]]) -> None:
    """Refuse what is not partition 1 FAT (boot) + a Linux root: a Raspberry Pi boots no other layout."""
    def kind(t: int) -> str:
        return FAT_TYPES.get(t) or PARTITION_TYPES.get(t) or EXTENDED_TYPES.get(t) or f"type 0x{t:02X}"

    layout = ", ".join(f"{n}: {kind(t)}" for n, t, _, _ in parts) or "no partitions"
    fix = "give a Raspberry Pi OS .img file as downloaded and decompressed (partition 1 FAT boot, 2 Linux root)"
    if not parts:
        raise UsageError(f"{image} has an empty partition table", fix=fix)
    for n, t, start, count in parts:
        if start == 0:
            raise UsageError(f"partition {n} of {image} starts on the partition table itself: the table is "
                             f"damaged", fix=fix)
    ordered = sorted(parts, key=lambda p: p[2])
    for (n1, _, s1, c1), (n2, _, s2, _) in zip(ordered, ordered[1:]):
        if s2 < s1 + c1:
            raise UsageError(f"partitions {n1} and {n2} of {image} overlap: the partition table is damaged",
                             fix=fix)
    fats = [p for p in parts if p[1] in FAT_TYPES]
    linux = [p for p in parts if p[1] == 0x83]
    if not fats:
        what = ("only a Linux partition: a root file system without the boot partition"
                if linux else f"no FAT partition ({layout})")
        raise UsageError(f"{image} has no FAT partition in its MBR, {what}, so it is not a Raspberry Pi OS image",
                         fix=fix)
    odd = [p for p in parts if p[1] not in FAT_TYPES and p[1] not in PARTITION_TYPES]
    extended = [p for p in parts if p[1] in EXTENDED_TYPES]
    first = parts[0][0] == 1 and parts[0][1] in FAT_TYPES
    if not first or odd or extended or not linux:
        why = ("a Raspberry Pi reads its boot files from partition 1, which is not FAT here" if not first else
               "it has an extended partition (logical partitions inside)" if extended else
               f"partition {odd[0][0]} has {kind(odd[0][1])}, which no Raspberry Pi OS image has" if odd else
               "there is no Linux root partition (type 0x83) beside the boot partition")
        raise UsageError(f"{image} has an unknown partition layout ({layout}): {why}", fix=fix)


def find_boot_partition(image) -> BootPartition:
    """Parse the MBR of ``image`` and return its FAT boot partition (partition 1).

    UsageError, before anything is written, for what a Raspberry Pi could not boot: no MBR, a
    compressed file, a bare file system, an unknown partition layout, a truncated image."""
    image = Path(image)
    with open(image, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(0)
        head = f.read(2048)
    mbr = head[:SECTOR]
    for magic, ext in _COMPRESSED.items():
        if head.startswith(magic):
            raise UsageError(f"{image} is compressed ({ext}), not a raw disk image",
                             fix=f"decompress it first, e.g. unxz {image} (or unzip / gunzip)")
    if end < SECTOR:
        raise UsageError(f"{image} is only {end} bytes: too short to hold a partition table (truncated?)",
                         fix="download and decompress the image again")
    if head[1080:1082] == b"\x53\xef" and mbr[510:512] != b"\x55\xaa":
        raise UsageError(f"{image} is a bare ext4 file system (a root partition on its own), not a whole disk "
                         f"image", fix="give the whole Raspberry Pi OS .img file, with its partition table")
    if mbr[0] in (0xEB, 0xE9) and (mbr[82:87] == b"FAT32" or mbr[54:57] == b"FAT"):
        raise UsageError(f"{image} is a bare FAT file system (a boot partition on its own), not a whole disk image",
                         fix="give the whole Raspberry Pi OS .img file, with its partition table")
    if mbr[510:512] != b"\x55\xaa":
        raise UsageError(f"{image} has no MBR partition table (no 0x55AA boot signature)",
                         fix="give a Raspberry Pi OS .img file as downloaded and decompressed")
    parts = _partitions(image, mbr)
    _refuse_layout(image, parts)
    for n, _, start, count in parts:
        if (start + count) * SECTOR > end:
            missing = (start + count) * SECTOR - end
            raise UsageError(f"{image} is truncated: partition {n} ends at byte {(start + count) * SECTOR}, "
                             f"{missing} bytes ({missing / 2**20:.1f} MiB) past the end of the file",
                             fix="download and decompress the image again (the copy stopped early)")
    n, ptype, start, count = parts[0]
    part = BootPartition(number=n, offset=start * SECTOR, size=count * SECTOR, type_id=ptype, fat=FAT_TYPES[ptype])
    with open(image, "rb") as f:
        f.seek(part.offset)
        boot = f.read(SECTOR)
    bytes_per_sector = struct.unpack_from("<H", boot, 11)[0]
    if (boot[510:512] != b"\x55\xaa" or bytes_per_sector not in (512, 1024, 2048, 4096)
            or not (boot[82:87] == b"FAT32" or boot[54:57] == b"FAT")):
        raise UsageError(f"partition {part.number} of {image} is marked FAT but holds no FAT file system",
                         fix="give an unmodified Raspberry Pi OS .img file")
    small, large = struct.unpack_from("<H", boot, 19)[0], struct.unpack_from("<I", boot, 32)[0]
    if (small or large) * bytes_per_sector > part.size:
        raise UsageError(f"the FAT file system of partition {part.number} of {image} is larger than its partition "
                         f"({(small or large) * bytes_per_sector} > {part.size} bytes): the image is damaged",
                         fix="download and decompress the image again")
    return dataclasses.replace(part, cluster=bytes_per_sector * max(boot[13], 1))


# ----------------------------------------------------------------- mtools

class _Fat:
    """The boot partition, read and written through mtools (no mount, no root)."""

    def __init__(self, image: Path, part: BootPartition):
        if not shutil.which("mcopy"):
            raise UsageError("flash needs mtools to write the FAT boot partition without mounting it",
                             fix="install it: sudo apt-get install mtools   (macOS: brew install mtools)")
        self.spec = f"{image}@@{part.offset}"
        self.env = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}
        self._tmp = tempfile.TemporaryDirectory(prefix="edgesplit-flash-")
        self.tmp = Path(self._tmp.name)

    def close(self):
        self._tmp.cleanup()

    def run(self, tool: str, *args: str) -> str:
        proc = subprocess.run([tool, "-i", self.spec, *args], env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UsageError(f"{tool} failed on the boot partition: {(proc.stderr or proc.stdout).strip()}",
                             fix="check the image is a Raspberry Pi OS image and not in use")
        return proc.stdout

    def listdir(self, path: str = "/") -> dict[str, str]:
        """Names in a directory, lower-cased -> as stored; {} if it does not exist."""
        proc = subprocess.run(["mdir", "-b", "-i", self.spec, f"::{path}"], env=self.env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return {}
        names = {}
        for line in proc.stdout.splitlines():
            name = line.strip().rstrip("/").rsplit("/", 1)[-1]
            if name and name not in (".", ".."):
                names[name.lower()] = name
        return names

    def free_bytes(self) -> int:
        m = re.search(r"([\d ,.]+) bytes free", self.run("mdir", "::/"))
        return int(re.sub(r"\D", "", m.group(1))) if m else 0

    def read(self, path: str) -> bytes:
        dest = self.tmp / f"read-{hashlib.sha1(path.encode()).hexdigest()}"
        dest.unlink(missing_ok=True)
        self.run("mcopy", "-n", f"::{path}", str(dest))
        return dest.read_bytes()

    def mkdir(self, path: str) -> None:
        parent, _, name = path.rstrip("/").rpartition("/")
        if name.lower() not in self.listdir(parent or "/"):
            self.run("mmd", f"::{path}")

    def write(self, path: str, data: bytes | Path) -> str:
        """Write a file (replacing it), read it back, return its sha256."""
        if isinstance(data, Path):
            src = data
            digest = _sha256_file(src)
        else:
            src = self.tmp / f"write-{hashlib.sha1(path.encode()).hexdigest()}"
            src.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
        self.run("mcopy", "-D", "o", str(src), f"::{path}")
        back = self.tmp / "verify"
        back.unlink(missing_ok=True)
        self.run("mcopy", "-n", f"::{path}", str(back))
        if _sha256_file(back) != digest:
            raise UsageError(f"/{path.lstrip('/')} read back from the image differs from what was written",
                             fix="the image or the disk under it is faulty: try another copy")
        back.unlink()
        return digest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_boot_file(image, name: str) -> bytes:
    """Read one file from an image's boot partition (e.g. to check what flash wrote)."""
    fat = _Fat(Path(image), find_boot_partition(image))
    try:
        return fat.read("/" + name.lstrip("/"))
    finally:
        fat.close()


def list_boot_files(image, directory: str = "/") -> list[str]:
    """Names (as stored) in a directory of an image's boot partition."""
    fat = _Fat(Path(image), find_boot_partition(image))
    try:
        return sorted(fat.listdir(directory).values())
    finally:
        fat.close()


# ----------------------------------------------------------------- inputs

def wpa_psk(ssid: str, passphrase: str) -> str:
    """The 256-bit WPA pre-shared key (64 hex digits) for ``passphrase`` on ``ssid`` (IEEE 802.11i)."""
    return hashlib.pbkdf2_hmac("sha1", passphrase.encode("utf-8"), ssid.encode("utf-8"), 4096, 32).hex()


def _read_psk(ssid: str, psk_file) -> str:
    path = Path(psk_file)
    if not path.is_file():
        raise UsageError(f"Wi-Fi passphrase file {path} does not exist",
                         fix="write the passphrase into a file only you can read (chmod 600) and pass it with "
                             "--wifi-psk-file")
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; chmod 600 it", path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text", fix="put the Wi-Fi passphrase in the file as plain text") from None
    # one trailing newline is what editors and `echo` add; it is not part of the passphrase
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if "\n" in text or "\r" in text:
        raise UsageError(f"{path} holds more than one line", fix="put only the Wi-Fi passphrase in the file")
    if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
        return text.lower()  # already a raw PSK
    if not 8 <= len(text) <= 63 or not all(32 <= ord(c) < 127 for c in text):
        raise UsageError(f"the Wi-Fi passphrase in {path} is not 8 to 63 printable ASCII characters "
                         f"(it has {len(text)})", fix="check the file holds the WPA2 passphrase and nothing else")
    return wpa_psk(ssid, text)


def _read_ssh_keys(ssh_key) -> list[str]:
    value = str(ssh_key)
    if _SSH_KEY.match(value.strip()):
        lines = [value.strip()]
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"SSH key {value} is neither a public key nor a file",
                             fix="give the public key file, e.g. --ssh-key ~/.ssh/id_ed25519.pub")
        text = path.read_text(errors="replace")
        if "PRIVATE KEY" in text:
            raise UsageError(f"{path} is a private key", fix=f"give the public key instead: {path}.pub")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    bad = [ln for ln in lines if not _SSH_KEY.match(ln)]
    if not lines or bad:
        raise UsageError(f"{value} does not hold OpenSSH public keys ({(bad or ['nothing'])[0][:40]!r}...)",
                         fix="give a .pub file such as ~/.ssh/id_ed25519.pub")
    return lines


def _check_package(device_package) -> Path:
    path = Path(device_package)
    if not path.is_file():
        raise UsageError(f"device package {path} does not exist",
                         fix="make one first: edgesplit bundle device --bundle BUNDLE --out pi.tar.gz")
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UsageError(f"device package {path} is not a .tar.gz ({exc})",
                         fix="give the tarball made by edgesplit bundle device") from None
    installers = []
    for m in members:
        parts = PurePosixPath(m.name).parts
        if m.name.startswith("/") or ".." in parts:
            raise UsageError(f"device package {path} has an unsafe member {m.name!r} (it would be unpacked as root)",
                             fix="rebuild the package with edgesplit bundle device")
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise UsageError(f"device package {path} has a special file {m.name!r}",
                             fix="rebuild the package with edgesplit bundle device")
        if (m.issym() or m.islnk()) and (m.linkname.startswith("/") or ".." in PurePosixPath(m.linkname).parts):
            raise UsageError(f"device package {path} has a link {m.name!r} pointing outside it",
                             fix="rebuild the package with edgesplit bundle device")
        clean = [p for p in parts if p != "."]
        if m.isfile() and clean and clean[-1] == "install.sh" and len(clean) <= 2:
            installers.append(m.name)
    if not installers:
        raise UsageError(f"device package {path} has no install.sh at its top (or one directory down)",
                         fix="give the tarball made by edgesplit bundle device")
    return path


# ----------------------------------------------------------------- first-boot files

def _yaml(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar: every character is escaped right.
    return json.dumps(value)


def _stage_command() -> str:
    return ('for b in /boot/firmware /boot; do if [ -f "$b/edgesplit/firstboot.sh" ]; then '
            'exec bash "$b/edgesplit/firstboot.sh" --stage --start; fi; done; '
            'echo "edgesplit: firstboot.sh not found on the boot partition" >&2; exit 1')


def render_user_data(*, hostname: str | None, ssh_keys: Sequence[str], username: str) -> str:
    """cloud-init user-data: host name, an SSH-key-only user, and a runcmd that stages the install."""
    out = ["#cloud-config",
           "# Written by `edgesplit flash`: first boot sets the host name and SSH access, then stages",
           "# edgesplit-firstboot.service, which installs the device package once the network is up.",
           ""]
    if hostname:
        out += [f"hostname: {_yaml(hostname)}", "preserve_hostname: false", "manage_etc_hosts: true", ""]
    if ssh_keys:
        out += ["users:",
                f"  - name: {_yaml(username)}",
                f"    groups: [{', '.join(DEFAULT_GROUPS)}]",
                "    shell: /bin/bash",
                "    lock_passwd: true",
                f"    sudo: {_yaml('ALL=(ALL) NOPASSWD:ALL')}",
                "    ssh_authorized_keys:"]
        out += [f"      - {_yaml(k)}" for k in ssh_keys]
        out += ["ssh_pwauth: false", ""]
    out += ["runcmd:"]
    if ssh_keys:
        out.append("  - [systemctl, enable, --now, ssh]")
    out.append(f"  - [sh, -c, {_yaml(_stage_command())}]")
    return "\n".join(out) + "\n"


def render_network_config(*, ssid: str, psk_hex: str, country: str) -> str:
    """cloud-init network-config (netplan v2): Ethernet by DHCP, and the Wi-Fi network."""
    return "\n".join([
        "# Written by `edgesplit flash`. Applied by cloud-init on first boot only.",
        "# The Wi-Fi key is the hashed 256-bit PSK, not the passphrase.",
        "network:",
        "  version: 2",
        "  ethernets:",
        "    eth0:",
        "      dhcp4: true",
        "      optional: true",
        "  wifis:",
        "    wlan0:",
        "      dhcp4: true",
        "      optional: true",
        f"      regulatory-domain: {_yaml(country)}",
        "      access-points:",
        f"        {_yaml(ssid)}:",
        f"          password: {_yaml(psk_hex)}",
        ""])


def render_meta_data(hostname: str | None) -> str:
    name = hostname or "raspberrypi"
    return "\n".join(["# Written by `edgesplit flash`: a local NoCloud seed read from the boot partition.",
                      "dsmode: local",
                      f"instance_id: {_yaml('edgesplit-' + name)}", ""])


def render_firstrun(*, hostname: str | None, ssh_keys: Sequence[str], username: str,
                    wifi: tuple[str, str, str] | None) -> str:
    """firstrun.sh for images without cloud-init (Raspberry Pi OS Bookworm and older)."""
    q = shlex.quote
    s = []
    if hostname:
        s += ["# host name",
              'if [ -x "$IMAGER" ]; then',
              f'    "$IMAGER" set_hostname {q(hostname)}',
              "else",
              "    CURRENT=$(tr -d ' \\t\\n\\r' < /etc/hostname)",
              f"    echo {q(hostname)} > /etc/hostname",
              f'    sed -i "s/127\\.0\\.1\\.1.*$CURRENT/127.0.1.1\\t{hostname}/g" /etc/hosts',
              "fi", ""]
    if ssh_keys:
        keys = " ".join(q(k) for k in ssh_keys)
        s += [f"# SSH, key only, for the first user (named {username}; no password)",
              "if [ -x /usr/lib/userconf-pi/userconf ]; then",
              f"    /usr/lib/userconf-pi/userconf {q(username)} ''",
              "elif ! getent passwd 1000 >/dev/null; then",
              f"    useradd -m -u 1000 -s /bin/bash -G sudo {q(username)}",
              "fi",
              'if [ -x "$IMAGER" ]; then',
              f'    "$IMAGER" enable_ssh -k {keys}',
              "else",
              "    U=$(getent passwd 1000 | cut -d: -f1); H=$(getent passwd 1000 | cut -d: -f6)",
              '    install -d -m 700 -o "$U" -g "$U" "$H/.ssh"',
              f"    printf '%s\\n' {keys} >> \"$H/.ssh/authorized_keys\"",
              '    chown "$U:$U" "$H/.ssh/authorized_keys"; chmod 600 "$H/.ssh/authorized_keys"',
              "    sed -i 's/^#\\?PasswordAuthentication.*/PasswordAuthentication no/' /etc/ssh/sshd_config",
              "    systemctl enable ssh",
              "fi", ""]
    if wifi:
        ssid, psk_hex, country = wifi
        s += ["# Wi-Fi (the key is the hashed 256-bit PSK, not the passphrase)",
              'if [ -x "$IMAGER" ]; then',
              f'    "$IMAGER" set_wlan {q(ssid)} {q(psk_hex)} {q(country)}',
              "else",
              "    cat > /etc/wpa_supplicant/wpa_supplicant.conf <<'WPAEOF'",
              f"country={country}",
              "ctrl_interface=DIR=/var/run/wpa_supplicant GROUP=netdev",
              "ap_scan=1",
              "update_config=1",
              "",
              "network={",
              f"\tssid={ssid.encode('utf-8').hex()}",
              f"\tpsk={psk_hex}",
              "}",
              "WPAEOF",
              "    chmod 600 /etc/wpa_supplicant/wpa_supplicant.conf",
              "    rfkill unblock wifi",
              '    for f in /var/lib/systemd/rfkill/*:wlan; do [ -e "$f" ] && echo 0 > "$f"; done',
              "fi", ""]
    template = (TEMPLATES / "flash_firstrun.sh").read_text()
    return template.replace("#@EDGESPLIT_SETTINGS@", "\n".join(s).rstrip() or "# (nothing to set)")


def _cmdline_with_firstrun(cmdline: str) -> str:
    """cmdline.txt (one line) with our systemd.run= arguments, replacing any earlier ones of ours."""
    tokens = [t for t in cmdline.split() if not (t.startswith("systemd.run=") or t.startswith("systemd.run_success")
                                                 or t == "systemd.unit=kernel-command-line.target")]
    return " ".join(tokens + list(FIRSTRUN_ARGS))


# ----------------------------------------------------------------- the job

def flash(image, device_package, *, wifi_ssid: str | None = None, wifi_psk_file=None,
          wifi_country: str | None = None, hostname: str | None = None, ssh_key=None, username: str = "pi",
          method: str = "auto", i_know: bool = False) -> FlashResult:
    """Write what first boot needs into the boot partition of a Raspberry Pi OS image; see the module doc."""
    image = Path(image)
    # --- check every input before touching the image
    if method not in ("auto", "cloud-init", "firstrun"):
        raise UsageError(f"unknown first-boot method {method!r}", fix="use auto, cloud-init or firstrun")
    if hostname is not None and not _HOSTNAME.match(hostname):
        raise UsageError(f"host name {hostname!r} is not valid",
                         fix="use 1-63 letters, digits and '-', not starting or ending with '-', e.g. pi-001")
    if not _USERNAME.match(username):
        raise UsageError(f"user name {username!r} is not valid", fix="use lower-case letters, digits, '-' or '_'")
    wifi = None
    if wifi_ssid is not None or wifi_psk_file is not None:
        if not wifi_ssid:
            raise UsageError("--wifi-psk-file needs --wifi-ssid", fix="give the network name with --wifi-ssid")
        if not 1 <= len(wifi_ssid.encode("utf-8")) <= 32 or any(ord(c) < 32 for c in wifi_ssid):
            raise UsageError(f"Wi-Fi network name {wifi_ssid!r} is not 1 to 32 bytes of text",
                             fix="give the SSID exactly as the access point shows it")
        if wifi_psk_file is None:
            raise UsageError("Wi-Fi needs a passphrase file (it is never taken on the command line)",
                             fix="write it into a file (chmod 600) and add --wifi-psk-file FILE")
        country = (wifi_country or "").upper()
        if not re.fullmatch(r"[A-Z]{2}", country):
            raise UsageError("Wi-Fi needs the country you are in (the radio's regulatory domain)",
                             fix="add --wifi-country with its two-letter code, e.g. GB, US, DE, FR")
        wifi = (wifi_ssid, _read_psk(wifi_ssid, wifi_psk_file), country)
    ssh_keys = _read_ssh_keys(ssh_key) if ssh_key else []
    package = _check_package(device_package)
    _check_target(image, i_know)
    part = find_boot_partition(image)

    fat = _Fat(image, part)
    try:
        root = fat.listdir("/")
        missing = [n for n in ("config.txt", "cmdline.txt") if n not in root]
        if missing:
            raise UsageError(f"the FAT partition of {image} has no {' or '.join(missing)}: "
                             f"it is not a Raspberry Pi boot partition",
                             fix="give a Raspberry Pi OS .img file")
        cmdline_raw = fat.read("/cmdline.txt").decode("utf-8", "replace")
        if method == "auto":
            uses_cloud_init = any(n in root for n in CLOUD_INIT_FILES) or "ds=nocloud" in cmdline_raw
            method = "cloud-init" if uses_cloud_init else "firstrun"
        if method == "firstrun" and "firstrun.sh" in root:
            existing = fat.read("/firstrun.sh").decode("utf-8", "replace")
            if FIRSTRUN_MARKER not in existing:
                raise UsageError(f"{image} already has a firstrun.sh (from Raspberry Pi Imager's settings?)",
                                 fix="flash a fresh copy of the image without Imager customisation")

        # --- is there room?  The package and, for every other file and the two directories, a
        # cluster at least (they are a few KiB each); checked before the first write, so that a
        # full partition is refused with the image unchanged
        def clusters(n: int) -> int:
            return -(-n // part.cluster) * part.cluster

        need = clusters(package.stat().st_size) + max(256 * 1024, 16 * part.cluster)
        if "edgesplit" in root and PKG_NAME in fat.listdir("/edgesplit"):
            need -= clusters(package.stat().st_size)  # replacing the previous package
        free = fat.free_bytes()
        if need > free:
            raise UsageError(f"the boot partition of {image} is too full: {free // 1024} KiB free, the device package "
                             f"and the first-boot files need {need // 1024} KiB",
                             fix="remove files you do not need from the boot partition, or make the device "
                                 "package smaller (without --offline-wheels)")

        files: dict[str, str] = {}
        backups: list[str] = []
        fat.mkdir("/edgesplit")
        fat.mkdir("/edgesplit/original")
        saved = fat.listdir("/edgesplit/original")

        def replace(name: str, data: bytes) -> None:
            # keep the image's own file once, so that the change can be undone by hand
            if name.lower() in root and name.lower() not in saved:
                original = fat.read("/" + name)
                if not (name == "firstrun.sh" and FIRSTRUN_MARKER.encode() in original):
                    fat.write(f"/edgesplit/original/{name}", original)
                    backups.append(name)
            files[name] = fat.write("/" + name, data)

        # package and first-boot unit first; the file that switches first boot on goes last
        files[f"edgesplit/{PKG_NAME}"] = fat.write(f"/edgesplit/{PKG_NAME}", package)
        files["edgesplit/device-package.sha256"] = fat.write(
            "/edgesplit/device-package.sha256", f"{files[f'edgesplit/{PKG_NAME}']}  {PKG_NAME}\n".encode())
        files["edgesplit/firstboot.sh"] = fat.write("/edgesplit/firstboot.sh",
                                                    (TEMPLATES / "flash_firstboot.sh").read_bytes())
        files["edgesplit/edgesplit-firstboot.service"] = fat.write(
            "/edgesplit/edgesplit-firstboot.service", (TEMPLATES / "edgesplit-firstboot.service").read_bytes())
        record = {"written_by": "edgesplit flash", "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "method": method, "hostname": hostname, "wifi_ssid": wifi[0] if wifi else None,
                  "wifi_country": wifi[2] if wifi else None, "ssh_user": username if ssh_keys else None,
                  "device_package": {"source": package.name, "sha256": files[f"edgesplit/{PKG_NAME}"],
                                     "bytes": package.stat().st_size}}
        files["edgesplit/flash.json"] = fat.write("/edgesplit/flash.json",
                                                  (json.dumps(record, indent=2) + "\n").encode())

        before = after = None
        if method == "cloud-init":
            if wifi:
                replace("network-config", render_network_config(ssid=wifi[0], psk_hex=wifi[1],
                                                                 country=wifi[2]).encode())
            if "meta-data" not in root:
                files["meta-data"] = fat.write("/meta-data", render_meta_data(hostname).encode())
            replace("user-data", render_user_data(hostname=hostname, ssh_keys=ssh_keys, username=username).encode())
        else:
            replace("firstrun.sh", render_firstrun(hostname=hostname, ssh_keys=ssh_keys, username=username,
                                                   wifi=wifi).encode())
            before = cmdline_raw.strip()
            after = _cmdline_with_firstrun(before)
            replace("cmdline.txt", (after + "\n").encode())
    finally:
        fat.close()
    result = FlashResult(image=image, method=method, partition=part, files=files, backups=tuple(backups),
                         hostname=hostname, wifi_ssid=wifi[0] if wifi else None,
                         ssh_user=username if ssh_keys else None, cmdline_before=before, cmdline_after=after)
    log.info("flashed %s (%s)", image, method)
    return result
