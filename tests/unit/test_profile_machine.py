"""The profile names the device's CPU and board the way its owner knows them, from /proc/cpuinfo as
each kernel prints it (64-bit Raspberry Pi OS prints no "model name")."""
from pathlib import Path

from device.profile import parse_cpuinfo

PI4_64BIT = (Path(__file__).resolve().parents[1] / "data" / "cpuinfo-pi4-64bit.txt").read_text()  # 64-bit Pi OS

PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

Revision\t: d04170
Serial\t\t: 5a1b2c3d4e5f6a7b
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
stepping\t: 0
"""


def test_a_pi_4_on_64_bit_pi_os_is_a_cortex_a72_on_its_board():
    assert parse_cpuinfo(PI4_64BIT) == ("Arm Cortex-A72 (BCM2835)", "Raspberry Pi 4 Model B Rev 1.1")


def test_a_pi_5_is_a_cortex_a76():
    assert parse_cpuinfo(PI5) == ("Arm Cortex-A76", "Raspberry Pi 5 Model B Rev 1.0")


def test_x86_keeps_its_model_name_and_its_model_number_is_not_a_board():
    assert parse_cpuinfo(X86) == ("AMD EPYC 7B13", None)


def test_an_unknown_core_or_an_empty_file_gives_no_name_rather_than_a_wrong_one():
    assert parse_cpuinfo("CPU implementer\t: 0x41\nCPU part\t: 0xfff\n") == ("", None)
    assert parse_cpuinfo("CPU implementer\t: 0x61\nCPU part\t: 0x022\n") == ("", None)   # Apple: not mapped
    assert parse_cpuinfo("CPU implementer\t: junk\n") == ("", None)
    assert parse_cpuinfo("") == ("", None)
