"""The device role on its target, driven from outside through the broker (docs/hil.md).

The target is ``EDGESPLIT_HIL_TARGET``: the local Pi-like target by default (a venv
with Raspberry Pi OS's dependency set, one CPU, its own network namespace behind a
20 Mbit/s link with 40 ± 10 ms each way and 2 % of connections cut), or a real Pi
over SSH.  The broker and the cloud worker run on this machine.
"""
from __future__ import annotations

import dataclasses

import pytest

from bench.netlink import Relay, ShapedLink
from hil import scenario
from hil.targets import LocalTarget, SshTarget, need_netns, target_url

pytestmark = [pytest.mark.hil, pytest.mark.timeout(900)]

DEVICE_ID = "pi-hil"
RATE = "20mbit"
IMPAIRMENTS = dict(delay_ms=40, jitter_ms=10, cut_fraction=0.02, cut_after=(8 * 1024, 48 * 1024), seed=2018)


@dataclasses.dataclass
class Rig:
    target: object
    relay: Relay
    package: object
    install: object
    link: ShapedLink | None


@pytest.fixture(scope="module")
def rig(hil_bundle, hil_broker, hil_report, tmp_path_factory):
    url = target_url()
    work = tmp_path_factory.mktemp("hil-device")
    link = None
    if url == "local":
        need_netns()
        link = ShapedLink(rate=RATE).open()
        target = LocalTarget(link, work / "target")
        relay = link.relay((hil_broker.host, hil_broker.port), **IMPAIRMENTS)
    else:
        target = SshTarget(url, work / "ssh")
        # a real Pi: the network is the link; the relay adds the delay and the cuts
        relay = Relay((target.harness_address, 0), (hil_broker.host, hil_broker.port), **IMPAIRMENTS).start()
    try:
        package = scenario.build_package(hil_bundle.path, target, relay.url, DEVICE_ID, work / "package")
        install = target.install(package.path)
        yield Rig(target, relay, package, install, link)
    finally:
        target.close()
        relay.stop()
        if link is not None:
            link.close()


def test_install_runs_offline_from_the_tarball_alone(rig, hil_report):
    inst = rig.install
    assert inst.ok, inst.output[-3000:]
    assert inst.offline, "install.sh should say it installed offline, from the package's wheels"
    interp, _ = scenario.interpreter_choice()
    assert inst.interpreter.startswith(interp.replace("-", "_")), inst.interpreter
    if rig.target.kind == "local":
        # the Pi-only steps are skipped and said so
        said = " | ".join(inst.skipped)
        for step in ("apt-get install", "system user", "systemctl"):
            assert step in said, f"install.sh did not say it skipped {step!r}: {inst.skipped}"
    # Raspberry Pi OS's set: numpy 1.x, the chosen interpreter, no TensorFlow; edgesplit from the wheel
    probe = rig.target.python(
        "import importlib.util as u, numpy, device, sys\n"
        "print(numpy.__version__)\n"
        "print(u.find_spec('tensorflow') is None, u.find_spec('ai_edge_litert') is None)\n"
        "print(device.__file__)\n")
    numpy_version, no_tf, where = probe.splitlines()
    assert int(numpy_version.split(".")[0]) < 2
    assert no_tf.split()[0] == "True"
    if interp == "tflite-runtime":
        assert no_tf.split()[1] == "True", "ai-edge-litert should not be installed on this target"
    assert "/opt/edgesplit/venv/" in where, f"device imported from {where}, not from the installed package"
    hil_report[f"install ({rig.target.kind} target)"] = {
        "seconds": round(inst.seconds, 1),
        "venv": "made anew (cold)" if inst.cold else "reused from an earlier install (warm)",
        "interpreter": inst.interpreter, "numpy": numpy_version, "package_mib": round(rig.package.bytes / 2**20, 1),
        "where": inst.where,
        "skipped (Pi-only steps)": inst.skipped or "none",
    }


def test_500_images_over_the_shaped_link_with_a_kill(rig, hil_bundle, hil_images, hil_broker, hil_report,
                                                     tmp_path):
    if not rig.install.ok:
        pytest.fail("the install failed (see test_install_runs_offline_from_the_tarball_alone)")
    res = scenario.run_scenario(rig.target, rig.relay, hil_broker.url, hil_bundle.path, DEVICE_ID,
                                hil_images.paths, tmp_path, n_burst=250, n_kill=230, n_paced=20)
    figures = scenario.check(res, hil_images.y_local, hil_images.y_true, hil_images.paths)
    where = "local Pi-like target" if rig.target.kind == "local" else str(rig.target.url)
    link = (f"{RATE} tbf, relay {IMPAIRMENTS['delay_ms']}±{IMPAIRMENTS['jitter_ms']} ms each way, "
            f"{IMPAIRMENTS['cut_fraction']:.0%} of connections cut + the first")
    hil_report[f"500 images, {where}"] = {"model": hil_bundle.description, "link": link,
                                          "target": rig.target.description} | figures
