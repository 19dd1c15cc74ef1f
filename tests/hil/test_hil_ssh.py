"""The ``ssh://`` target (what drives a real Raspberry Pi), tested against a local sshd in a namespace.

sshd runs inside a network namespace made for the test, on its own address, and
accepts only a key generated here.  Through it the target copies the device
package, installs it with its own script (offline), starts, kills and restarts the
device, reads its peak RSS and collects its results — the same scenario as on a
Pi, on fewer images.
"""
from __future__ import annotations

import getpass

import pytest

from bench.netlink import ShapedLink
from hil import scenario
from hil.targets import (SshTarget, claim_cache, install_key, make_ssh_key, mark_installed, need_netns,
                         sshd_binary, start_sshd)

pytestmark = [pytest.mark.hil, pytest.mark.timeout(900)]

DEVICE_ID = "pi-hil-ssh"


@pytest.fixture(scope="module")
def ssh_rig(hil_bundle, hil_broker, tmp_path_factory):
    need_netns()
    if sshd_binary() is None:
        pytest.skip("sshd is not installed: apt-get install openssh-server (CI installs it; no service is "
                    "started, the test runs its own sshd inside a namespace)")
    work = tmp_path_factory.mktemp("hil-ssh")
    with ShapedLink(rate="100mbit") as link:
        key = make_ssh_key(work)
        start_sshd(link, work / "sshd", key)
        url = f"ssh://{getpass.getuser()}@{link.ns_addr}:22?identity={key}&dir="
        relay = link.relay((hil_broker.host, hil_broker.port), delay_ms=20, jitter_ms=5, cut_fraction=0.02,
                           cut_after=(4 * 1024, 16 * 1024), seed=7)
        lock = None
        target = SshTarget(url + str(work / "probe"), work / "ssh-probe")
        try:
            package = scenario.build_package(hil_bundle.path, target, relay.url, DEVICE_ID, work / "package")
            # the remote directory is the cached disk the local target uses (this "Pi" is this machine):
            # its venv is reused, as on a Pi in the field that gets a new package
            arch, pyver = target.platform()
            target.close()
            disk, lock = claim_cache(install_key(package.path, pyver, arch), work / "remote")
            target = SshTarget(url + str(disk), work / "ssh")
            install = target.install(package.path)
            if install.ok and lock is not None:
                mark_installed(disk)
            yield target, relay, install, link
        finally:
            target.close()
            relay.stop()
            if lock is not None:
                lock.close()


def test_ssh_target_installs_runs_and_recovers(ssh_rig, hil_bundle, hil_images, hil_broker, hil_report,
                                               tmp_path):
    target, relay, install, link = ssh_rig
    # the target reached this machine through the namespace's link, and said so
    assert target.harness_address == link.host_addr
    assert install.ok, install.output[-3000:]
    assert install.offline
    res = scenario.run_scenario(target, relay, hil_broker.url, hil_bundle.path, DEVICE_ID, hil_images.paths,
                                tmp_path, n_burst=40, n_kill=30, n_paced=10)
    figures = scenario.check(res, hil_images.y_local, hil_images.y_true, hil_images.paths)
    hil_report["ssh target against a local sshd in a namespace"] = {
        "target": target.description, "install_seconds": round(install.seconds, 1),
        "venv": "made anew (cold)" if install.cold else "reused (warm)"} | figures
