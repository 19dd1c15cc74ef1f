"""``edgesplit profile``: time a bundle's head (and tail) with the real interpreter on *this* machine.

Runs on the device itself (a Raspberry Pi has no TensorFlow, and none is imported
here), so the planner (``edgesplit plan --device-profile FILE``) predicts with the
device's own timings instead of the workstation's.  Run it on the cloud machine too
(``--part tail`` or ``both``) for ``--cloud-profile``.

Per bundle (one cut each; give several bundles for several cuts) it records:

* head and tail latency of one input at a time (median, p95, mean, min over ``runs``
  timed calls after a warm-up), on ``threads`` interpreter threads (default 1);
* the feature tensor's bytes, the frame's bytes before compression (header + tensor),
  and, when real inputs are given, the mean bytes of the frames as the agent sends
  them (``compress="auto"``: zstd when it pays, which depends on the images);
* the bytes of a result frame and of the raw input image as uint8 in a frame (what
  "send the raw image to the cloud" costs).

The head and tail of one bundle are the whole model, so head + tail is also the
time of running everything on this machine.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from protocol.errors import UsageError
from protocol.profile import CutProfile, DeviceProfile, latency_stats

log = logging.getLogger(__name__)

PARTS = ("head", "tail", "both")
_DEVICE_ID = "profile"


# Arm Ltd. (implementer 0x41) core part numbers, as /proc/cpuinfo gives them on aarch64, whose
# kernels print no "model name": the cores of every Raspberry Pi and of common Arm servers.
ARM_CORES = {0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55", 0xd07: "Cortex-A57",
             0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75", 0xd0b: "Cortex-A76",
             0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd40: "Neoverse-V1", 0xd41: "Cortex-A78",
             0xd49: "Neoverse-N2", 0xd4f: "Neoverse-V2"}


def parse_cpuinfo(text: str) -> tuple[str, str | None]:
    """(CPU name, board) from the text of /proc/cpuinfo.

    x86 prints ``model name``; an aarch64 kernel prints only ``CPU implementer`` and
    ``CPU part`` (a Pi 4: 0x41 / 0xd08, an Arm Cortex-A72) and, on Raspberry Pi OS,
    ``Hardware`` (the SoC family, e.g. BCM2835) and ``Model`` (the board).
    """
    found: dict = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key != "Model":                  # the board; x86's lower-case "model" is a CPU model number
            key = key.lower()
        if key in ("model name", "hardware", "cpu implementer", "cpu part", "Model") and key not in found:
            found[key] = value.strip()
    board = found.get("Model") or None
    if found.get("model name"):
        return found["model name"], board
    try:
        arm = int(found.get("cpu implementer", ""), 16) == 0x41
        core = ARM_CORES.get(int(found.get("cpu part", ""), 16)) if arm else None
    except ValueError:
        core = None
    hardware = found.get("hardware")
    if core:
        return (f"Arm {core} ({hardware})" if hardware else f"Arm {core}"), board
    return hardware or "", board


def machine_info() -> dict:
    """CPU, cores, memory, load and (on a Pi) the board model of this machine."""
    try:
        cpu, board = parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu, board = "", None
    cpu = cpu or platform.processor() or ""
    try:
        board = Path("/proc/device-tree/model").read_text().strip("\x00\n ") or board
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {"hostname": platform.node(), "cpu": cpu, "board": board, "machine": platform.machine(),
            "cores": os.cpu_count(), "memory_gib": mem_gib, "load_avg_1_5_15": load,
            "os": platform.platform(terse=True), "python": platform.python_version()}


def time_model(model, sample: np.ndarray, runs: int, warmup: int) -> list[float]:
    """Wall time in ms of ``runs`` single-input calls of a ``runtime.interpreter.Model``."""
    sample = np.asarray(sample)[:1]
    for _ in range(warmup):
        model.run(sample)
    out = []
    clock = time.perf_counter
    for _ in range(runs):
        t0 = clock()
        model.run(sample)
        out.append((clock() - t0) * 1e3)
    return out


def _inputs_array(inputs, preprocessor, limit: int = 200) -> tuple[np.ndarray | None, str]:
    """Head inputs from ``inputs`` (an array, or file/folder/glob specs), and a description."""
    if inputs is None:
        return None, "random (frame bytes on the wire not measured: give --inputs)"
    if isinstance(inputs, np.ndarray):
        x = preprocessor.arrays(inputs[:limit])
        return x, f"{len(x)} given arrays"
    from device import sources

    xs = []
    for s in sources.open_inputs([str(i) for i in inputs]):
        xs.append(preprocessor(s))
        if len(xs) >= limit:
            break
    if not xs:
        raise UsageError("--inputs matched no image", fix="give image files, folders or globs")
    return np.stack(xs), f"{len(xs)} images from {', '.join(map(str, inputs))}"


def _random_input(shape, value_range, rng) -> np.ndarray:
    lo, hi = value_range
    return (rng.random((1, *shape), dtype=np.float32) * (hi - lo) + lo).astype(np.float32)


def profile(bundles: Iterable[str | os.PathLike], *, runs: int = 200, warmup: int = 10, threads: int | None = 1,
            part: str = "both", inputs=None, interpreter: str | None = None) -> DeviceProfile:
    """Time the head (and/or tail) of each bundle here; see the module docstring.

    ``inputs``: images (paths/folders/globs, or a numpy batch of head inputs) used to time
    and to measure the frame bytes as really sent; without them a random input is timed.
    """
    from protocol.frame import Frame, encode_frame, header_size
    from protocol.manifest import load_bundle
    from runtime.interpreter import pick_backend
    from runtime.preprocess import Preprocessor
    from runtime.split import Head, Tail

    bundles = list(bundles)
    if not bundles:
        raise UsageError("no bundle to profile", fix="pass --bundle DIR_OR_TAR_GZ (several allowed)")
    if part not in PARTS:
        raise UsageError(f"--part {part!r} is unknown", fix=f"use one of {', '.join(PARTS)}")
    if runs < 1 or warmup < 0:
        raise UsageError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})", fix="e.g. --runs 200")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}", fix="e.g. --threads 1 (as on a busy Pi)")
    t_start = time.perf_counter()
    backend = pick_backend(interpreter)
    rng = np.random.default_rng(0)
    out: list[CutProfile] = []
    inputs_desc = "random"
    input_info: dict = {}
    for b_path in bundles:
        b = load_bundle(b_path)
        m = b.manifest
        pre = Preprocessor(m.input)
        x, inputs_desc = _inputs_array(inputs, pre)
        sample = x[:1] if x is not None else _random_input(m.input.shape, pre.value_range, rng)
        head = Head(b, num_threads=threads, backend=backend)
        spec = m.feature
        scale = spec.scale if spec.quantized else None
        zp = spec.zero_point if spec.quantized else None

        def frame_of(t, i=0):
            return Frame.features(t, request_id=i, device_id=_DEVICE_ID, bundle_id=b.bundle_id, seq=i, scale=scale,
                                  zero_point=zp)

        y = head.features(sample)[0]
        raw = len(encode_frame(frame_of(y), compress="raw"))
        wire = None
        if x is not None:
            feats = head.features(x)
            wire = float(np.mean([len(encode_frame(frame_of(f, i))) for i, f in enumerate(feats)]))
        probs = np.zeros(tuple(m.output.shape), np.float32)
        result_bytes = len(encode_frame(Frame.result(frame_of(y), probs, t_recv_us=1, t_done_us=2, label=0)))
        cp = CutProfile(model=m.model, cut=m.cut, quant=m.quant, bundle_id=b.bundle_id, source=str(b_path),
                        feature_shape=list(spec.shape), feature_dtype=spec.dtype, feature_bytes=spec.nbytes,
                        frame_bytes_raw=raw, frame_bytes_wire=wire, frame_header_bytes=header_size(frame_of(y)),
                        result_bytes=result_bytes, head_size_bytes=os.path.getsize(b.head_path),
                        tail_size_bytes=os.path.getsize(b.tail_path))
        if part in ("head", "both"):
            cp.head_ms = latency_stats(time_model(head.model, sample, runs, warmup))
        if part in ("tail", "both"):
            tail = Tail(b, num_threads=threads, backend=backend)
            cp.tail_ms = latency_stats(time_model(tail.model, tail.inputs(y[None]), runs, warmup))
        log.info("profiled %s cut %s (%s)", m.model, m.cut, m.quant)
        out.append(cp)
        if not input_info:
            pixels = np.zeros(tuple(m.input.shape), np.uint8)
            image_frame = Frame.features(pixels, request_id=0, device_id=_DEVICE_ID, bundle_id=b.bundle_id, seq=0)
            input_info = {"shape": list(m.input.shape), "bytes": int(pixels.nbytes),
                          "frame_bytes": len(encode_frame(image_frame, compress="raw"))}
    return DeviceProfile(machine=machine_info(), interpreter=backend.to_dict(), threads=threads, runs=runs,
                         warmup=warmup, part=part, inputs=inputs_desc, cuts=out, input=input_info,
                         created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=time.perf_counter() - t_start)


def run(bundles, *, out: str | os.PathLike | None = "edgesplit-profile.json", **options) -> DeviceProfile:
    """``edgesplit profile``: profile ``bundles`` and write the file ``out`` (None: do not write)."""
    prof = profile(bundles, **options)
    if out is not None:
        prof.write(out)
    return prof
