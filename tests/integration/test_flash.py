"""`edgesplit flash` on small synthetic Raspberry Pi OS images (MBR + FAT32 made by mkfs.vfat).

Every file flash writes is read back with mtools (independently of deploy.flash),
the bytes outside the boot partition are checked unchanged, and fsck.vfat -n
must pass on the partition afterwards.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from deploy import flash as fl
from protocol.errors import UsageError

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.vfat", "fsck.vfat", "mcopy", "mdir")),
    reason="needs dosfstools and mtools: sudo apt-get install dosfstools mtools")

BOOT_START = 8192                    # sectors, as Raspberry Pi OS images have it
BOOT_SECTORS = 40 * 2048             # 40 MiB: FAT32 needs at least ~33 MiB
ROOT_SECTORS = 4 * 2048
CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID=6c586e13-02 rootfstype=ext4 "
           "fsck.repair=yes rootwait quiet splash plymouth.ignore-serial-consoles")
CONFIG = "# For more options and information see\n# http://rptl.io/configtxt\ndtparam=audio=on\narm_64bit=1\n"
SSID = "Café net"
PASSPHRASE = "correct horse battery staple"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOqZ9m7b0VfJcB0hQ8mF2l3k4j5h6g7f8d9s0a1q2w3e test@laptop"
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1", "LC_ALL": "C"}


# ----------------------------------------------------------------- synthetic images

def _mbr(parts) -> bytes:
    mbr = bytearray(512)
    struct.pack_into("<I", mbr, 440, 0x6C586E13)          # disk signature
    for i, (ptype, start, count) in enumerate(parts):
        struct.pack_into("<B3sB3sII", mbr, 446 + 16 * i, 0, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", start, count)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _mcopy_in(img: Path, name: str, data: bytes, tmp: Path):
    src = tmp / f"src-{name}"
    src.write_bytes(data)
    subprocess.run(["mcopy", "-i", f"{img}@@{BOOT_START * 512}", str(src), f"::/{name}"], env=MTOOLS_ENV,
                   check=True)


def make_image(tmp: Path, boot_files: dict[str, str | bytes], name="rpios.img") -> Path:
    """A sparse MBR disk: partition 1 FAT32 (boot) holding ``boot_files``, partition 2 a fake root."""
    img = tmp / name
    total = BOOT_START + BOOT_SECTORS + ROOT_SECTORS
    with open(img, "wb") as f:
        f.truncate(total * 512)
        f.write(_mbr([(0x0C, BOOT_START, BOOT_SECTORS), (0x83, BOOT_START + BOOT_SECTORS, ROOT_SECTORS)]))
        f.seek((BOOT_START + BOOT_SECTORS) * 512)
        f.write(b"ext4 root stand-in " * 1000)             # something to prove flash leaves alone
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "BOOTFS", f"--offset={BOOT_START}", str(img),
                    str(BOOT_SECTORS // 2)], check=True, capture_output=True)
    for n, data in boot_files.items():
        _mcopy_in(img, n, data.encode() if isinstance(data, str) else data, tmp)
    return img


def read_back(img: Path, name: str, tmp: Path) -> bytes:
    dest = tmp / "readback"
    dest.unlink(missing_ok=True)
    subprocess.run(["mcopy", "-n", "-i", f"{img}@@{BOOT_START * 512}", f"::/{name}", str(dest)],
                   env=MTOOLS_ENV, check=True, capture_output=True)
    return dest.read_bytes()


def boot_names(img: Path, directory="/") -> set[str]:
    out = subprocess.run(["mdir", "-b", "-i", f"{img}@@{BOOT_START * 512}", f"::{directory}"], env=MTOOLS_ENV,
                         capture_output=True, text=True, check=True).stdout
    return {ln.strip().rstrip("/").rsplit("/", 1)[-1] for ln in out.splitlines() if ln.strip()}


def fsck_partition(img: Path, tmp: Path) -> str:
    part = tmp / "boot-partition.img"
    with open(img, "rb") as src, open(part, "wb") as dst:
        src.seek(BOOT_START * 512)
        dst.write(src.read(BOOT_SECTORS * 512))
    proc = subprocess.run(["fsck.vfat", "-n", str(part)], capture_output=True, text=True)
    assert proc.returncode == 0, f"fsck.vfat -n failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def outside_partition_digest(img: Path) -> str:
    h = hashlib.sha256()
    with open(img, "rb") as f:
        h.update(f.read(BOOT_START * 512))
        f.seek((BOOT_START + BOOT_SECTORS) * 512)
        h.update(f.read())
    return h.hexdigest()


def make_package(tmp: Path, *, with_install=True, top="pi") -> Path:
    path = tmp / "pi.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        files = {f"{top}/bundle/manifest.json": b"{}", f"{top}/device.json": b'{"device_id": "pi-001"}'}
        if with_install:
            files[f"{top}/install.sh"] = (b"#!/bin/bash\nset -e\necho installing from $(pwd)\n"
                                          b"touch \"$EDGESPLIT_TEST_MARK\"\n")
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def psk_file(tmp_path):
    p = tmp_path / "wifi.psk"
    p.write_text(PASSPHRASE + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def key_file(tmp_path):
    p = tmp_path / "id_ed25519.pub"
    p.write_text(PUBKEY + "\n")
    return p


def expected_psk() -> str:
    return hashlib.pbkdf2_hmac("sha1", PASSPHRASE.encode(), SSID.encode(), 4096, 32).hex()


# ----------------------------------------------------------------- Bookworm: firstrun.sh

def test_firstrun_image_gets_firstrun_cmdline_and_package(tmp_path, psk_file, key_file):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE + "\n"})
    pkg = make_package(tmp_path)
    outside = outside_partition_digest(img)

    result = fl.flash(img, pkg, wifi_ssid=SSID, wifi_psk_file=psk_file, wifi_country="de", hostname="pi-001",
                      ssh_key=key_file)

    assert result.method == "firstrun"
    # cmdline.txt: still one line, the original arguments in order, ours appended once
    cmdline = read_back(img, "cmdline.txt", tmp_path).decode()
    assert cmdline.count("\n") == 1 and cmdline.endswith("\n")
    assert cmdline.split() == CMDLINE.split() + ["systemd.run=/boot/firstrun.sh", "systemd.run_success_action=reboot",
                                                 "systemd.unit=kernel-command-line.target"]
    # firstrun.sh: valid bash, says what to set, holds the hashed PSK and never the passphrase
    firstrun = read_back(img, "firstrun.sh", tmp_path).decode()
    assert firstrun.startswith("#!/bin/bash") and fl.FIRSTRUN_MARKER in firstrun
    subprocess.run(["bash", "-n"], input=firstrun, text=True, check=True)
    assert "set_hostname pi-001" in firstrun
    assert expected_psk() in firstrun and PASSPHRASE not in firstrun
    assert "'Café net'" in firstrun and " DE" in firstrun
    assert PUBKEY in firstrun and "userconf pi ''" in firstrun
    assert firstrun.rstrip().endswith('rm -f "$BOOT/firstrun.sh"\nexit 0')
    assert 'firstboot.sh" --stage' in firstrun
    # the package, byte for byte, and what installs it
    assert read_back(img, "edgesplit/device-package.tar.gz", tmp_path) == pkg.read_bytes()
    sha = read_back(img, "edgesplit/device-package.sha256", tmp_path).decode()
    assert sha == f"{hashlib.sha256(pkg.read_bytes()).hexdigest()}  device-package.tar.gz\n"
    assert read_back(img, "edgesplit/firstboot.sh", tmp_path) == (fl.TEMPLATES / "flash_firstboot.sh").read_bytes()
    unit = read_back(img, "edgesplit/edgesplit-firstboot.service", tmp_path).decode()
    assert "After=network-online.target" in unit and "ExecStart=/usr/local/lib/edgesplit/firstboot.sh" in unit
    # everything flash says it wrote is there with that content
    for name, digest in result.files.items():
        assert hashlib.sha256(read_back(img, name, tmp_path)).hexdigest() == digest, name
    # the original cmdline.txt is kept; config.txt and everything outside the partition untouched
    assert read_back(img, "edgesplit/original/cmdline.txt", tmp_path).decode() == CMDLINE + "\n"
    assert read_back(img, "config.txt", tmp_path).decode() == CONFIG
    assert outside_partition_digest(img) == outside
    assert "user-data" not in boot_names(img)
    fsck_partition(img, tmp_path)
    assert "firstrun" in result.summary() and "pi-001" in result.summary()


def test_flashing_twice_keeps_one_set_of_arguments_and_the_true_original(tmp_path):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    pkg = make_package(tmp_path)
    fl.flash(img, pkg, hostname="pi-001")
    second = fl.flash(img, pkg, hostname="pi-002")
    cmdline = read_back(img, "cmdline.txt", tmp_path).decode()
    assert cmdline.count("systemd.run=") == 1 and cmdline.count("kernel-command-line.target") == 1
    assert read_back(img, "edgesplit/original/cmdline.txt", tmp_path).decode() == CMDLINE
    assert "set_hostname pi-002" in read_back(img, "firstrun.sh", tmp_path).decode()
    assert second.backups == ()
    fsck_partition(img, tmp_path)


# ----------------------------------------------------------------- cloud-init images

def test_cloud_init_image_gets_user_data_and_network_config(tmp_path, psk_file, key_file):
    yaml = pytest.importorskip("yaml")
    stock_user_data = "#cloud-config\n# stock example\nssh_pwauth: false\n"
    stock_meta = "dsmode: local\ninstance_id: rpios-image\n"
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE + "\n", "user-data": stock_user_data,
                                "meta-data": stock_meta,
                                "network-config": "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true\n"})
    pkg = make_package(tmp_path)
    outside = outside_partition_digest(img)

    result = fl.flash(img, pkg, wifi_ssid=SSID, wifi_psk_file=psk_file, wifi_country="GB", hostname="cam-7",
                      ssh_key=key_file, username="edge")

    assert result.method == "cloud-init"
    user_data_text = read_back(img, "user-data", tmp_path).decode()
    assert user_data_text.startswith("#cloud-config\n")
    user_data = yaml.safe_load(user_data_text)
    assert user_data["hostname"] == "cam-7"
    (user,) = user_data["users"]
    assert user["name"] == "edge" and user["ssh_authorized_keys"] == [PUBKEY] and user["lock_passwd"] is True
    assert user_data["ssh_pwauth"] is False
    stage = user_data["runcmd"][-1]
    assert stage[:2] == ["sh", "-c"] and "firstboot.sh" in stage[2] and "--stage --start" in stage[2]
    subprocess.run(["sh", "-n", "-c", stage[2]], check=True)
    net = yaml.safe_load(read_back(img, "network-config", tmp_path))
    wlan = net["network"]["wifis"]["wlan0"]
    assert wlan["regulatory-domain"] == "GB"
    assert wlan["access-points"] == {SSID: {"password": expected_psk()}}
    assert net["network"]["ethernets"]["eth0"]["dhcp4"] is True
    assert PASSPHRASE.encode() not in read_back(img, "network-config", tmp_path)
    # the image's own meta-data stays (its instance id is what cloud-init compares); cmdline.txt untouched
    assert read_back(img, "meta-data", tmp_path).decode() == stock_meta
    assert read_back(img, "cmdline.txt", tmp_path).decode() == CMDLINE + "\n"
    assert "firstrun.sh" not in boot_names(img)
    assert read_back(img, "edgesplit/original/user-data", tmp_path).decode() == stock_user_data
    assert set(result.backups) == {"user-data", "network-config"}
    assert read_back(img, "edgesplit/device-package.tar.gz", tmp_path) == pkg.read_bytes()
    for name, digest in result.files.items():
        assert hashlib.sha256(read_back(img, name, tmp_path)).hexdigest() == digest, name
    assert outside_partition_digest(img) == outside
    fsck_partition(img, tmp_path)


def test_cloud_init_detected_from_cmdline_and_meta_data_written(tmp_path):
    yaml = pytest.importorskip("yaml")
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE + " ds=nocloud\n"})
    result = fl.flash(img, make_package(tmp_path), hostname="pi-9")
    assert result.method == "cloud-init"
    meta = yaml.safe_load(read_back(img, "meta-data", tmp_path))
    assert meta["dsmode"] == "local" and meta["instance_id"] == "edgesplit-pi-9"
    user_data = yaml.safe_load(read_back(img, "user-data", tmp_path))
    assert "users" not in user_data and "ssh" not in str(user_data["runcmd"][0])   # no key: SSH stays off
    assert "network-config" not in boot_names(img)                                  # no Wi-Fi: image's own
    fsck_partition(img, tmp_path)


# ----------------------------------------------------------------- the first-boot script itself

def test_firstboot_script_installs_the_package_once_and_removes_it(tmp_path):
    """Run firstboot.sh as the unit would, against a copy of the boot directory flash wrote."""
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    pkg = make_package(tmp_path)
    fl.flash(img, pkg)
    boot = tmp_path / "boot"
    (boot / "edgesplit").mkdir(parents=True)
    for name in ("firstboot.sh", "device-package.tar.gz", "device-package.sha256"):
        (boot / "edgesplit" / name).write_bytes(read_back(img, f"edgesplit/{name}", tmp_path))
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "systemctl").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/systemctl.calls"\n')
    (fakebin / "systemctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{fakebin}:{os.environ['PATH']}", "EDGESPLIT_BOOT_DIRS": str(boot),
           "EDGESPLIT_STATE": str(tmp_path / "state"), "EDGESPLIT_TEST_MARK": str(tmp_path / "installed")}
    script = boot / "edgesplit" / "firstboot.sh"

    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "installed").exists(), "install.sh did not run"
    assert (tmp_path / "state" / "firstboot.done").exists()
    assert not (boot / "edgesplit" / "device-package.tar.gz").exists(), "the credentials stayed on FAT"
    assert "disable edgesplit-firstboot.service" in (fakebin / "systemctl.calls").read_text()
    log = (boot / "edgesplit" / "install.log").read_text()
    assert "edgesplit device package installed" in log
    again = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already installed" in again.stdout


def test_firstboot_script_refuses_a_damaged_package(tmp_path):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    fl.flash(img, make_package(tmp_path))
    boot = tmp_path / "boot"
    (boot / "edgesplit").mkdir(parents=True)
    for name in ("firstboot.sh", "device-package.sha256"):
        (boot / "edgesplit" / name).write_bytes(read_back(img, f"edgesplit/{name}", tmp_path))
    good = read_back(img, "edgesplit/device-package.tar.gz", tmp_path)
    (boot / "edgesplit" / "device-package.tar.gz").write_bytes(good[:-100] + bytes(100))
    env = {**os.environ, "EDGESPLIT_BOOT_DIRS": str(boot), "EDGESPLIT_STATE": str(tmp_path / "state"),
           "EDGESPLIT_TEST_MARK": str(tmp_path / "installed")}
    run = subprocess.run(["bash", str(boot / "edgesplit" / "firstboot.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0 and "damaged" in run.stdout
    assert not (tmp_path / "installed").exists()


# ----------------------------------------------------------------- refusals leave the image alone

def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_block_devices_need_i_know(tmp_path):
    pkg = make_package(tmp_path)
    with pytest.raises(UsageError, match="--i-know"):
        fl.flash("/dev/mmcblk9", pkg)
    block = next((e.path for e in os.scandir("/dev") if not e.is_symlink() and stat.S_ISBLK(os.stat(e.path).st_mode)),
                 None)
    if block is not None:   # a real one, if this machine shows any: refused before it is opened
        with pytest.raises(UsageError, match="--i-know"):
            fl.flash(block, pkg)


@pytest.mark.parametrize("content, message", [
    (bytes(2 * 1024 * 1024), "no MBR"),
    (b"\xfd7zXZ\x00" + bytes(4096), "compressed"),
    (_mbr([(0x83, 2048, 2048)]) + bytes(4096 * 512), "no FAT partition"),
    (_mbr([(0xEE, 1, 4095)]) + bytes(4096 * 512), "GPT"),
])
def test_unrecognised_images_are_refused(tmp_path, content, message):
    img = tmp_path / "odd.img"
    img.write_bytes(content)
    before = _digest(img)
    with pytest.raises(UsageError, match=message):
        fl.flash(img, make_package(tmp_path))
    assert _digest(img) == before


def _write_mbr(img: Path, parts) -> None:
    with open(img, "r+b") as f:
        f.write(_mbr(parts))


def _pi_layout(**change):
    """The synthetic image's partitions (1 FAT32 boot, 2 Linux root) with some entries changed."""
    parts = {1: (0x0C, BOOT_START, BOOT_SECTORS), 2: (0x83, BOOT_START + BOOT_SECTORS, ROOT_SECTORS)}
    parts.update({int(k[1:]): v for k, v in change.items()})
    return [parts.get(i, (0, 0, 0)) for i in range(1, 5)]


@pytest.mark.parametrize("layout, message", [
    (_pi_layout(p1=(0x83, BOOT_START + BOOT_SECTORS, ROOT_SECTORS), p2=(0x0C, BOOT_START, BOOT_SECTORS)),
     r"unknown partition layout \(1: Linux, 2: FAT32\): a Raspberry Pi reads its boot files from partition 1"),
    (_pi_layout(p3=(0x07, BOOT_START + BOOT_SECTORS + ROOT_SECTORS - 2048, 1024)), "overlap"),
    (_pi_layout(p2=(0x07, BOOT_START + BOOT_SECTORS, ROOT_SECTORS)),
     r"unknown partition layout \(1: FAT32, 2: type 0x07\): partition 2 has type 0x07"),
    (_pi_layout(p2=(0x05, BOOT_START + BOOT_SECTORS, ROOT_SECTORS)), "extended partition"),
    (_pi_layout(p2=(0, 0, 0)), "no Linux root partition"),
    (_pi_layout(p1=(0, 0, 0), p2=(0, 0, 0)), "empty partition table"),
])
def test_an_unknown_partition_layout_is_refused_and_the_image_kept(tmp_path, layout, message):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    _write_mbr(img, layout)
    before = _digest(img)
    with pytest.raises(UsageError, match=message) as err:
        fl.flash(img, make_package(tmp_path))
    assert err.value.fix and "partition 1 FAT boot, 2 Linux root" in err.value.fix
    assert _digest(img) == before


def test_a_root_only_image_is_refused_and_kept(tmp_path):
    """Both ways a root file system comes alone: an MBR with only the Linux partition, and a bare ext4
    (a partition copied with dd)."""
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    _write_mbr(img, _pi_layout(p1=(0, 0, 0)))
    before = _digest(img)
    with pytest.raises(UsageError, match="only a Linux partition: a root file system without the boot partition"):
        fl.flash(img, make_package(tmp_path))
    assert _digest(img) == before
    if shutil.which("mkfs.ext4") or Path("/usr/sbin/mkfs.ext4").exists():
        bare = tmp_path / "rootfs.img"
        with open(bare, "wb") as f:
            f.truncate(8 * 2**20)
        subprocess.run([shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4", "-q", "-F", "-L", "rootfs", str(bare)],
                       check=True, capture_output=True)
        before = _digest(bare)
        with pytest.raises(UsageError, match="bare ext4 file system"):
            fl.flash(bare, make_package(tmp_path))
        assert _digest(bare) == before


def test_a_bare_boot_partition_is_refused_and_kept(tmp_path):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    bare = tmp_path / "bootfs.img"
    with open(img, "rb") as src, open(bare, "wb") as dst:
        src.seek(BOOT_START * 512)
        dst.write(src.read(BOOT_SECTORS * 512))
    before = _digest(bare)
    with pytest.raises(UsageError, match="bare FAT file system"):
        fl.flash(bare, make_package(tmp_path))
    assert _digest(bare) == before


@pytest.mark.parametrize("keep, message", [
    ((BOOT_START + BOOT_SECTORS + ROOT_SECTORS // 2) * 512, r"truncated: partition 2 ends at byte \d+, 2097152 bytes"),
    ((BOOT_START + 100) * 512, "truncated: partition 1 ends"),
    (300, "only 300 bytes"),
])
def test_a_truncated_image_is_refused_and_kept(tmp_path, keep, message):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    with open(img, "r+b") as f:
        f.truncate(keep)
    before = _digest(img)
    with pytest.raises(UsageError, match=message):
        fl.flash(img, make_package(tmp_path))
    assert _digest(img) == before


def test_a_full_boot_partition_is_refused_and_kept(tmp_path):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    free = fl._Fat(img, fl.find_boot_partition(img))
    try:
        room = free.free_bytes()
    finally:
        free.close()
    # fill the partition up to 64 KiB: the package (a few KiB) would fit, its first-boot files would not
    _mcopy_in(img, "kernel_2712.img", os.urandom(room - 64 * 1024), tmp_path)
    before = _digest(img)
    with pytest.raises(UsageError, match=r"boot partition of .* is too full: \d+ KiB free") as err:
        fl.flash(img, make_package(tmp_path))
    assert "remove files" in err.value.fix
    assert _digest(img) == before
    fsck_partition(img, tmp_path)


def test_fat_without_raspberry_pi_files_is_refused(tmp_path):
    img = make_image(tmp_path, {"readme.txt": "not a Pi"})
    before = _digest(img)
    with pytest.raises(UsageError, match="not a Raspberry Pi boot partition"):
        fl.flash(img, make_package(tmp_path))
    assert _digest(img) == before


def test_bad_inputs_are_refused_before_writing(tmp_path, psk_file):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    before = _digest(img)
    pkg = make_package(tmp_path)
    short = tmp_path / "short.psk"
    short.write_text("1234567\n")
    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "x").mkdir()
    cases = [
        (dict(device_package=make_package(tmp_path / "x", with_install=False)), "no install.sh"),
        (dict(wifi_ssid=SSID), "passphrase file"),
        (dict(wifi_ssid=SSID, wifi_psk_file=psk_file), "country"),
        (dict(wifi_ssid=SSID, wifi_psk_file=short, wifi_country="GB"), "8 to 63"),
        (dict(hostname="pi_001"), "host name"),
        (dict(ssh_key=private), "private key"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("device_package", pkg)
        with pytest.raises(UsageError, match=message):
            fl.flash(img, kwargs.pop("device_package"), **kwargs)
    assert _digest(img) == before


def test_imager_customised_image_is_refused(tmp_path):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE + " systemd.run=/boot/firstrun.sh",
                                "firstrun.sh": "#!/bin/bash\n# from Raspberry Pi Imager\n"})
    before = _digest(img)
    with pytest.raises(UsageError, match="already has a firstrun.sh"):
        fl.flash(img, make_package(tmp_path))
    assert _digest(img) == before


def test_unsafe_package_is_refused(tmp_path):
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    bad = tmp_path / "evil.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name in ("install.sh", "../../etc/cron.d/evil"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(UsageError, match="unsafe member"):
        fl.flash(img, bad)


def test_psk_helpers():
    # IEEE 802.11i test vector (Annex H.4): passphrase "password", SSID "IEEE"
    assert fl.wpa_psk("IEEE", "password") == "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"


# ----------------------------------------------------------------- the command

def test_cli_flash(tmp_path, psk_file, capsys):
    from edgesplit.cli import main
    img = make_image(tmp_path, {"config.txt": CONFIG, "cmdline.txt": CMDLINE})
    pkg = make_package(tmp_path)
    code = main(["flash", str(img), "--device-package", str(pkg), "--wifi-ssid", SSID, "--wifi-psk-file",
                 str(psk_file), "--wifi-country", "GB", "--hostname", "pi-001"])
    out = capsys.readouterr().out
    assert code == 0 and "firstrun" in out and "/edgesplit/device-package.tar.gz" in out
    assert main(["flash", "/dev/sdz", "--device-package", str(pkg)]) == 2
    assert "--i-know" in capsys.readouterr().err
