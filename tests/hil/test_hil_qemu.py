"""The device package on the Pi's CPU architecture: its aarch64 wheels, run under qemu-aarch64
user emulation with Debian bookworm's arm64 Python 3.11 (what 64-bit Raspberry Pi OS ships),
against a real Mosquitto and a real cloud worker on this machine (docs/hil.md).

What this proves that the x86_64 targets cannot: the wheels the package carries for the Pi
import and run there (LiteRT's aarch64 build, numpy, msgspec, zstandard, Pillow), and the head
computed by the Pi's int8 kernels sends the tensor the cloud expects.  What it does not: the
Pi's speed (emulation is 10-50x slower than the real CPU) or its systemd and camera; install.sh
itself runs on the local and SSH targets.

Needs ``qemu-aarch64-static`` (Debian: qemu-user-static) and ``debootstrap``, and root for
debootstrap.  The arm64 root file system (Python and its libraries, ~230 MB) is built once from
Debian's mirror (``EDGESPLIT_DEBIAN_MIRROR``, default deb.debian.org) into
``~/.cache/edgesplit/qemu/``.  No binfmt_misc handler is registered (that would change the
kernel's configuration for the whole machine): qemu runs the arm64 python explicitly.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from hil.targets import cache_root

pytestmark = [pytest.mark.hil, pytest.mark.timeout(1200)]

QEMU = "qemu-aarch64-static"
SUITE = "bookworm"
MIRROR = os.environ.get("EDGESPLIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEVICE_ID = "pi-qemu"


def _need(tool: str, package: str) -> None:
    if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
        pytest.skip(f"{tool} is not installed: apt-get install {package}")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd[:4]))} ... failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="session")
def arm64_root() -> Path:
    """Debian bookworm arm64 with python3, unpacked (not configured: python needs no maintainer script)."""
    _need(QEMU, "qemu-user-static")
    _need("debootstrap", "debootstrap")
    if os.geteuid() != 0:
        pytest.skip("debootstrap needs root to build the arm64 root file system")
    root = cache_root() / "qemu" / f"{SUITE}-arm64"
    stamp = root / ".edgesplit-ready"
    if stamp.is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.is_file():
            tmp = root.parent / f".{root.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _run(["debootstrap", "--foreign", "--arch", "arm64", "--variant=minbase", "--include=python3",
                  SUITE, tmp, MIRROR], timeout=1200)
            # --foreign unpacks the base system only; the packages asked for with --include wait in
            # the archive cache for a second stage that needs an arm64 kernel: unpack them here.
            for deb in sorted((tmp / "var" / "cache" / "apt" / "archives").glob("*.deb")):
                _run(["dpkg-deb", "-x", deb, tmp], timeout=120)
            assert (tmp / "usr" / "bin" / "python3.11").is_file(), "debootstrap brought no python3.11"
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
            stamp.write_text(f"debootstrap {SUITE} arm64 from {MIRROR}, {time.strftime('%Y-%m-%d')}\n")
    return root


@pytest.fixture(scope="module")
def pi_package(hil_bundle, tmp_path_factory):
    """The device package as a Pi gets it, its wheels installed for aarch64 / CPython 3.11 (pip's --target
    only unpacks wheels, so the host's pip can do it: no arm64 code runs to install)."""
    from deploy.device_package import build_device_package, platform_tags

    work = tmp_path_factory.mktemp("hil-qemu")
    pkg = build_device_package(hil_bundle.path, work / "pi.tar.gz", broker="mqtts://broker.example.org:8883",
                               device_id=DEVICE_ID, offline_wheels=True)
    assert (pkg.wheel_platform, pkg.python_version) == ("aarch64", "3.11")
    with tarfile.open(pkg.path) as tar:
        tar.extractall(work / "pkg", filter="data")
    top = work / "pkg" / pkg.folder
    wheels = top / "wheels"
    site = work / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--target", site, "--only-binary=:all:",
           "--python-version", "3.11", "--implementation", "cp", "--no-index", "--find-links", wheels,
           "-c", wheels / "constraints.txt", "-r", wheels / "requirements.txt",
           next(wheels.glob("edgesplit-*.whl")), "ai-edge-litert"]
    for tag in platform_tags("aarch64", "3.11"):
        cmd[cmd.index("--python-version"):cmd.index("--python-version")] = ["--platform", tag]
    _run(cmd, timeout=600, env=dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS=""))
    return pkg, site, top / "bundle"


# A Raspberry Pi 4's /proc/cpuinfo under 64-bit Raspberry Pi OS (four Cortex-A72).  Under user
# emulation the arm64 program reads the host's x86 /proc/cpuinfo; LiteRT's optimized kernels
# (XNNPACK, ruy) ask the cpuinfo library what the CPU is, get nonsense and crash (SIGSEGV; only
# the reference kernels run).  Each run therefore gets a mount namespace of its own with this
# file over /proc/cpuinfo, and qemu emulates that very CPU (QEMU_CPU=cortex-a72): the Pi 4's
# instruction set, no more.
PI4_CPUINFO = Path(__file__).resolve().parents[1] / "data" / "cpuinfo-pi4-64bit.txt"


@pytest.fixture(scope="session")
def pi4_cpuinfo() -> Path:
    _need("unshare", "util-linux")
    return PI4_CPUINFO


def _arm64_python(root: Path, site: Path, cpuinfo: Path, *args, timeout: float = 600
                  ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_"))}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", PYTHONDONTWRITEBYTECODE="1", QEMU_CPU="cortex-a72")
    # unshare(1) makes the new mount namespace private: the bind mount is seen by this process tree only
    cmd = ["unshare", "--mount", "sh", "-c", 'mount --bind "$1" /proc/cpuinfo && shift && exec "$@"', "sh",
           str(cpuinfo), QEMU, "-L", str(root), str(root / "usr" / "bin" / "python3.11"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=site)


def test_the_pi_wheels_run_on_aarch64_with_litert_and_without_tensorflow(arm64_root, pi4_cpuinfo, pi_package,
                                                                          hil_report):
    pkg, site, bundle = pi_package
    probe = ("import json, platform, sys, numpy, ai_edge_litert, msgspec, zstandard, PIL\n"
             "from runtime.interpreter import pick_backend\n"
             "from protocol.manifest import load_bundle\n"
             f"b = load_bundle({str(bundle)!r})\n"
             "from runtime.interpreter import Model\n"
             "out = Model(b.head_path).run(numpy.zeros((2, *b.manifest.input.shape), numpy.float32))\n"
             "cpu = [l for l in open('/proc/cpuinfo') if l.startswith('Model')]\n"
             "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),\n"
             "  'head_output': list(out.shape), 'board': cpu[0].split(':', 1)[1].strip() if cpu else None,\n"
             "  'numpy': numpy.__version__, 'litert': ai_edge_litert.__file__, 'backend': str(pick_backend(None)),\n"
             "  'tensorflow': 'tensorflow' in sys.modules, 'bundle': b.manifest.bundle_id}))\n")
    proc = _arm64_python(arm64_root, site, pi4_cpuinfo, "-c", probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["machine"] == "aarch64"
    assert got["python"].startswith("3.11.")
    assert got["litert"].startswith(str(site)), got        # the shipped aarch64 wheel, not anything else
    assert "litert" in got["backend"].lower(), got
    assert got["tensorflow"] is False
    from protocol.manifest import load_bundle

    assert got["head_output"] == [2, *load_bundle(bundle).manifest.feature.shape], got        # the head ran, optimized kernels and all
    assert got["board"] == "Raspberry Pi 4 Model B Rev 1.1"        # the Pi 4 cpuinfo is what it reads
    hil_report["qemu-aarch64: the package's wheels"] = {k: got[k] for k in ("machine", "board", "python", "numpy",
                                                                                 "backend")}


def test_mnist_through_the_aarch64_head_gets_the_answers_and_tensors_of_this_machine(
        arm64_root, pi4_cpuinfo, pi_package, hil_images, hil_broker, start_worker, collect, hil_report):
    from protocol import topics
    from protocol.frame import decode_frame
    from protocol.manifest import load_bundle
    from runtime.interpreter import Model
    from runtime.preprocess import Preprocessor

    pkg, site, bundle_dir = pi_package
    bundle = load_bundle(bundle_dir)
    fleet = f"q{uuid.uuid4().hex[:6]}"
    url = hil_broker.url
    feats = collect(url, topics.features(fleet, DEVICE_ID))
    start_worker(url, bundle, fleet=fleet)
    paths = hil_images.paths[:200]            # emulated: keep it to a minute or two
    t0 = time.monotonic()
    proc = _arm64_python(arm64_root, site, pi4_cpuinfo, "-m", "edgesplit", "device", "run", "--bundle", bundle_dir,
                         "--broker", url, "--device-id", DEVICE_ID, "--fleet", fleet, "--timeout", "300",
                         *paths, timeout=900)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(paths), proc.stderr[-2000:]
    assert all("error" not in r for r in results), [r for r in results if "error" in r][:3]
    by_name = {Path(r["input"]).name: r for r in results}
    assert len(by_name) == len(paths)                     # every image answered, and once

    # the answers: the same labels as head + tail run on this machine
    local = {p.name: bundle.manifest.labels[int(i)] for p, i in zip(paths, hil_images.y_local)}
    agree = np.mean([by_name[n]["label"] == local[n] for n in local])
    truth = {p.name: bundle.manifest.labels[int(i)] for p, i in zip(paths, hil_images.y_true)}
    accuracy = np.mean([by_name[n]["label"] == truth[n] for n in truth])
    assert agree >= 0.99, f"aarch64 head + cloud tail agree with this machine on only {agree:.1%}"

    # the tensors: what the Pi's int8 kernels sent, against this machine's head on the same images
    assert feats.wait(len(paths), timeout=30)
    sent = {}
    for _, payload in feats.got[topics.features(fleet, DEVICE_ID)]:
        f = decode_frame(payload)
        sent[f.request_id] = np.asarray(f.tensor).astype(np.int16)
    rid = {n: r["request_id"] for n, r in by_name.items()}
    x = Preprocessor(bundle.manifest.input).batch(paths)
    here = Model(bundle.head_path).run(x).astype(np.int16)
    diffs = np.stack([np.abs(sent[rid[p.name]].reshape(here.shape[1:]) - here[i]) for i, p in enumerate(paths)])
    exact = float(np.mean(diffs == 0))
    assert diffs.max() <= 1, f"the aarch64 head differs from this machine's by up to {diffs.max()} int8 steps"
    assert exact >= 0.99, f"only {exact:.2%} of the int8 values are the same on aarch64"
    hil_report["qemu-aarch64: MNIST through the Pi's wheels"] = {
        "bundle": bundle.manifest.bundle_id, "images": len(paths), "answered": len(results),
        "agreement with this machine": round(float(agree), 4), "accuracy": round(float(accuracy), 4),
        "int8 values identical": f"{exact:.4%}", "max int8 difference": int(diffs.max()),
        "seconds under emulation": round(seconds, 1)}


def test_edgesplit_profile_on_the_emulated_pi_names_its_board_and_feeds_the_planner(
        arm64_root, pi4_cpuinfo, pi_package, hil_images, tmp_path, capsys, hil_report):
    from edgesplit.cli import main
    from protocol.manifest import load_bundle

    pkg, site, bundle_dir = pi_package
    m = load_bundle(bundle_dir).manifest
    prof = tmp_path / "pi4.json"
    proc = _arm64_python(arm64_root, site, pi4_cpuinfo, "-m", "edgesplit", "profile", "--bundle", bundle_dir,
                         "--out", prof, "--runs", "20", "--warmup", "2", "--part", "head",
                         "--inputs", *hil_images.paths[:8])
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(prof.read_text())
    machine = d["machine"]
    assert (machine["machine"], machine["cpu"], machine["board"]) == \
        ("aarch64", "Arm Cortex-A72 (BCM2835)", "Raspberry Pi 4 Model B Rev 1.1"), machine
    entry = d["cuts"][0]
    assert (entry["model"], entry["cut"], entry["quant"]) == (m.model, m.cut, m.quant)
    head_ms = entry["head_ms"]["median"]
    assert head_ms > 0 and entry["frame_bytes_wire"] > 0

    # the planner on this machine takes the Pi's file as it is
    capsys.readouterr()
    assert main(["plan", m.model, "--uplink", "1mbit", "--rtt", "40ms", "--device-profile", str(prof),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    opt = next(o for o in plan["options"] if o["name"] == m.cut)
    assert opt["sources"]["device_ms"] == "device profile", plan.get("notes")
    assert opt["device_ms"] == pytest.approx(head_ms)
    hil_report["qemu-aarch64: edgesplit profile on the emulated Pi 4"] = {
        "cpu": machine["cpu"], "board": machine["board"], "cut": m.cut,
        "head ms (emulated, not a Pi's speed)": round(head_ms, 2), "wire bytes": entry["frame_bytes_wire"],
        "planner": f"{opt['name']} predicted {opt['latency_ms']:.1f} ms at 1 Mbit/s, 40 ms RTT"}
