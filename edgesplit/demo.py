"""The main job: the whole split-inference path on this machine, as a user runs it.

``edgesplit demo`` trains (or loads from the cache) ``paper-cnn``, converts it
at a cut, starts a broker (the embedded one unless ``--broker`` names one), a
cloud worker and a device as separate processes through the same ``edgesplit``
verbs a user would type, sends MNIST test images end to end, and prints what a
user wants to know: accuracy against the parity check, latency percentiles,
throughput, and the bytes sent per image against the raw image.

``edgesplit demo --model my.keras --data D [--cut C]`` does the same with the user's
model and images: the device reads the user's own test-split files (JPEG, PNG...).

The device and the cloud run as their own processes (``python -m edgesplit``),
so nothing here shares memory with them: what is measured crosses the broker.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from deploy.broker import free_port, port_accepts
from protocol.errors import CheckFailed, UsageError
from protocol.stats import percentiles

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


@dataclass
class DemoResult:
    """What the demo measured; ``summary()`` is the table it prints."""

    model: str
    cut: str
    quant: str
    broker: str
    images: int
    answered: int
    correct: int
    parity_accuracy: float
    expected_correct: int
    latency_ms: dict
    seconds: float
    frame_bytes: int
    raw_frame_bytes: int
    raw_image_bytes: int
    png_bytes_mean: float
    out_dir: str
    files: dict = field(default_factory=dict)
    keras_correct: int | None = None      # the Keras model on the same images (as the device decodes them)
    image_format: str = "PNG"             # what the device read
    data: str | None = None               # the user's images and their split
    cut_note: str = ""                    # how the cut was chosen, when --cut was not given

    @property
    def accuracy(self) -> float:
        return self.correct / self.images if self.images else 0.0

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        lat = self.latency_ms
        rows = [
            ("model / cut / quant", f"{self.model} / {self.cut} / {self.quant}"),
            ("broker", self.broker),
            ("images sent / answered", f"{self.images} / {self.answered}"),
            ("accuracy (end to end)", f"{self.accuracy:.4f}"),
            ("accuracy (head+tail run here)", f"{self.expected_correct / max(self.images, 1):.4f}"
                                              f"  (parity check: {self.parity_accuracy:.4f})"),
            *([("accuracy (Keras model)", f"{self.keras_correct / max(self.images, 1):.4f}  (the same images)")]
              if self.keras_correct is not None else []),
            ("latency p50 / p95 / p99", f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} ms"
                                        f"  (up to 64 requests in flight)" if lat else "no answer"),
            ("throughput", f"{self.throughput:.1f} images/s"),
            ("bytes sent per image (frame)", f"{self.frame_bytes} B  (raw frame {self.raw_frame_bytes} B)"),
            (f"raw image (uint8) / {self.image_format}", f"{self.raw_image_bytes} B / {self.png_bytes_mean:.0f} B"),
        ]
        if self.data:
            rows.insert(1, ("data", self.data))
        if self.cut_note:
            rows[0] = (rows[0][0], rows[0][1] + f"  ({self.cut_note})")
        width = max(len(k) for k, _ in rows)
        lines = ["edgesplit demo: split inference end to end", ""]
        lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
        if self.frame_bytes > self.png_bytes_mean:
            lines += ["", f"  note: at this cut a frame ({self.frame_bytes} B) is larger than the PNG of the image "
                          f"({self.png_bytes_mean:.0f} B); the split pays off in privacy and device compute, not "
                          f"bytes. See `edgesplit cuts` and `edgesplit audit`."]
        lines += ["", f"  results in {self.out_dir}/"]
        lines += [f"    {name:<14} {path}" for name, path in self.files.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(accuracy=self.accuracy, throughput=self.throughput)
        return d


def _edgesplit(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgesplit", *args]


def _wait_for_line(proc: subprocess.Popen, needle: str, what: str, log_path: Path) -> None:
    """Block until ``needle`` appears in the process's log file, or fail clearly."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"the {what} exited with code {proc.returncode} before it was ready",
                              fix=f"read its log: {log_path}")
        if log_path.exists() and needle in log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise CheckFailed(f"the {what} was not ready after {READY_TIMEOUT_S:.0f} s",
                      fix=f"read its log: {log_path}")


def _wait_for_port(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(f"the broker exited with code {proc.returncode}", fix=f"read its log: {log_path}")
        if port_accepts("127.0.0.1", port, timeout=0.5):
            return
        time.sleep(0.1)
    raise CheckFailed(f"the broker did not listen on port {port}", fix=f"read its log: {log_path}")


def _stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _write_images(x: np.ndarray, y: np.ndarray, folder: Path, pre=None) -> float:
    """Write test images as PNG files named ``<index>_<label>.png``; return mean size.

    ``x`` is the model's input (``pre``, the manifest's preprocess, maps it back to pixels;
    MNIST's k / 255 when None) or uint8 pixels.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = []
    for i, (img, label) in enumerate(zip(x, y)):
        path = folder / f"{i:05d}_{int(label)}.png"
        img = np.asarray(img)
        if img.dtype != np.uint8:
            img = pre.to_pixels(img) if pre is not None else img
            img = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
        pixels = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
        Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else ("RGBA" if pixels.shape[-1] == 4 else "RGB")) \
            .save(path, optimize=True)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes))


def _copy_files(files, y: np.ndarray, folder: Path) -> tuple[float, str]:
    """The user's own image files, as they are, named ``<index>_<label><suffix>``; mean size and format."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes, suffixes = [], set()
    for i, (src, label) in enumerate(zip(files, y)):
        src = Path(src)
        dst = folder / f"{i:05d}_{int(label)}{src.suffix.lower()}"
        try:
            os.link(src, dst)     # the same bytes the user has, without a copy when the disk allows
        except OSError:
            shutil.copyfile(src, dst)
        sizes.append(dst.stat().st_size)
        suffixes.add(src.suffix.lower().lstrip("."))
    fmt = "/".join(sorted("JPEG" if s in ("jpg", "jpeg") else s.upper() for s in suffixes))
    return float(np.mean(sizes)), fmt


def default_cut(model) -> tuple[str, str]:
    """A cut for a model when none is given: the fewest bytes sent within the first half of the compute."""
    from converter import cuts as cuts_mod

    found = [c for c in cuts_mod.list_cuts(model) if c.tail_macs > 0] or cuts_mod.list_cuts(model)
    total = max(1, max(c.head_macs + c.tail_macs for c in found))
    early = [c for c in found if c.head_macs <= total / 2] or found[:1]
    pick = min(early, key=lambda c: (c.bytes_int8, c.index))
    return pick.name, (f"chosen: the fewest bytes sent ({pick.bytes_int8} B) with at most half the compute on "
                       "the device; --cut to choose")


def _frame_bytes(manifest) -> int:
    """Size of one features frame as the device publishes it for this bundle."""
    from protocol import frame as wire

    spec = manifest.feature
    tensor = np.zeros(tuple(spec.shape), dtype=np.dtype(spec.dtype))
    fr = wire.Frame.features(request_id=2**63 - 1, device_id="demo-pi", bundle_id=manifest.bundle_id, seq=1,
                             tensor=tensor, scale=spec.scale, zero_point=spec.zero_point)
    return len(wire.encode_frame(fr, compress="raw"))


def _expected_correct(bundle_dir, x: np.ndarray, y: np.ndarray, batch: int = 250) -> int:
    """How many of these images the split model gets right when run here, in-process (``runtime.split``)."""
    from protocol.manifest import load_bundle
    from runtime.split import Head, Tail

    bundle = load_bundle(bundle_dir)
    head, tail = Head(bundle), Tail(bundle)
    right = 0
    for s in range(0, len(x), batch):
        right += int((np.argmax(tail.run(head.features(x[s:s + batch])), axis=-1) == y[s:s + batch]).sum())
    return right


def _device_inputs(bundle_dir, folder: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The files the device will read, their labels (from the names) and the head's input as it decodes them."""
    from protocol.manifest import load_bundle
    from runtime.preprocess import Preprocessor

    files = sorted(p for p in folder.iterdir() if p.is_file())
    y = np.asarray([int(p.stem.split("_")[1]) for p in files], np.int64)
    return files, y, Preprocessor(load_bundle(bundle_dir).manifest.input).batch(files)


def _latency_png(latencies: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.hist(latencies, bins=60, color="#3a6ea5")
    lat = percentiles(latencies)
    for q, style in ((50, "-"), (95, "--"), (99, ":")):
        v = lat[f"p{q}"]
        ax.axvline(v, color="k", linestyle=style, linewidth=1, label=f"p{q} {v:.1f} ms")
    ax.set_xlabel("end-to-end latency per image (ms)")
    ax.set_ylabel("images")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(*, model: str = "paper-cnn", cut: str | None = None, quant: str = "int8", n: int = 1000,
             broker: str | None = None, out: str | os.PathLike = "demo-out", workers: int = 1,
             data=None, test_split: float | None = None, data_seed: int = 0, preprocess=None,
             progress: bool = True) -> DemoResult:
    """Run the whole path end to end and return what was measured.

    ``data`` (the ``--data`` SPEC) brings the user's images for a model of their own; the device
    reads the test side of the split (the user's files themselves, for a folder).
    """
    from converter import bundle as bundles
    from converter import datasets, userdata, zoo

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}", fix="pass --n 1000 (the default)")
    out_dir = Path(out).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory", fix="pass another --out")
    images_data = userdata.load_data(data, test_split=test_split, seed=data_seed) if data is not None else None
    cut_note = ""
    if cut is None:
        if model == "paper-cnn":
            cut = "pool2"
        else:
            cut, cut_note = default_cut(zoo.load_model(model))
    out_dir.mkdir(parents=True, exist_ok=True)
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)

    print(f"[1/4] model {model}: {'load' if images_data is not None else 'train or load from the cache'}, "
          f"convert at {cut} ({quant})", flush=True)
    conv = bundles.convert(model, cut=cut, quant=quant, out=out_dir / "bundle", data=images_data,
                           preprocess=preprocess)
    manifest = conv.manifest
    print(f"      bundle {manifest.bundle_id}: parity agreement {conv.agreement:.4f}, "
          f"accuracy {conv.accuracy:.4f}", flush=True)

    images = out_dir / "images"
    shutil.rmtree(images, ignore_errors=True)
    fmt = "PNG"
    if images_data is not None:
        side = images_data.test
        n = min(n, len(side.y))
        if images_data.files:
            print(f"[2/4] taking {n} of your test images ({images_data.split.describe()})", flush=True)
            png_mean, fmt = _copy_files(side.items[:n], side.y[:n], images)
        else:
            print(f"[2/4] writing {n} of your test images as PNG", flush=True)
            png_mean = _write_images(side.items[:n], side.y[:n], images, manifest.input.preprocess)
    else:
        print(f"[2/4] writing {n} MNIST test images as PNG", flush=True)
        mnist = datasets.load_mnist()
        n = min(n, len(mnist.x_test))
        png_mean = _write_images(mnist.x_test[:n], mnist.y_test[:n], images)
    # what the device will compute from these files, run here: the end-to-end answers must equal it
    _, y_files, x_files = _device_inputs(conv.bundle_dir, images)
    expected_correct = _expected_correct(conv.bundle_dir, x_files, y_files)
    keras_model = zoo.load_model(model)
    keras_correct = int((np.argmax(keras_model.predict(x_files, batch_size=64, verbose=0), -1) == y_files).sum())

    procs: list[subprocess.Popen] = []
    broker_proc = cloud_proc = device_proc = None
    try:
        if broker is None:
            port = free_port()
            broker_url = f"mqtt://127.0.0.1:{port}"
            blog = logs / "broker.log"
            print(f"[3/4] starting the embedded broker on 127.0.0.1:{port}, a cloud worker and a device",
                  flush=True)
            broker_proc = subprocess.Popen(_edgesplit("broker", "--port", str(port)),
                                           stdout=open(blog, "w"), stderr=subprocess.STDOUT)
            procs.append(broker_proc)
            _wait_for_port(port, broker_proc, blog)
        else:
            broker_url = broker
            print(f"[3/4] using broker {broker_url}; starting a cloud worker and a device", flush=True)

        clog = logs / "cloud.log"
        cloud_proc = subprocess.Popen(
            _edgesplit("cloud", "--bundle", str(conv.bundle_dir), "--broker", broker_url,
                       "--workers", str(workers)),
            stdout=open(clog, "w"), stderr=subprocess.STDOUT)
        procs.append(cloud_proc)
        _wait_for_line(cloud_proc, "ready", "cloud worker", clog)

        print(f"[4/4] sending {n} images device -> broker -> cloud -> device", flush=True)
        dlog = logs / "device.log"
        results_path = out_dir / "results.jsonl"
        stats_path = out_dir / "device-stats.json"
        t0 = time.monotonic()
        device_proc = subprocess.Popen(
            _edgesplit("device", "run", "--bundle", str(conv.bundle_dir), "--broker", broker_url,
                       "--device-id", "demo-pi", "--fleet", "demo", "--stats-json", str(stats_path), str(images)),
            stdout=subprocess.PIPE, stderr=open(dlog, "w"), text=True)
        procs.append(device_proc)
        answered, correct, latencies = 0, 0, []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="img", desc="end to end", file=sys.stderr)
        with open(results_path, "w") as sink:
            for line in device_proc.stdout:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                sink.write(line + "\n")
                rec = json.loads(line)
                if rec.get("error"):
                    continue
                answered += 1
                truth = int(Path(rec["input"]).stem.split("_")[1])
                correct += int(rec["index"]) == truth   # the class index (labels may be names)
                latencies.append(float(rec["latency_ms"]))
                if bar is not None:
                    bar.update(1)
        device_proc.wait()
        seconds = time.monotonic() - t0
        if bar is not None:
            bar.close()
        if device_proc.returncode not in (0,):
            raise CheckFailed(f"the device exited with code {device_proc.returncode} "
                              f"after {answered} of {n} answers", fix=f"read its log: {dlog}")
    finally:
        for proc in (device_proc, cloud_proc, broker_proc):
            _stop(proc)

    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    if stats.get("seconds"):
        seconds = float(stats["seconds"])  # first send to last answer, as the device saw it
    raw_frame = _frame_bytes(manifest)
    result = DemoResult(model=model if images_data is None else manifest.model, cut=cut, quant=quant,
                        broker=broker_url, images=n, answered=answered,
                        correct=correct, parity_accuracy=float(conv.accuracy), expected_correct=expected_correct,
                        latency_ms=percentiles(latencies), seconds=seconds,
                        frame_bytes=round(stats.get("bytes_per_frame") or raw_frame), raw_frame_bytes=raw_frame,
                        raw_image_bytes=int(np.prod(manifest.input.shape)), png_bytes_mean=png_mean,
                        out_dir=str(out_dir), keras_correct=keras_correct, image_format=fmt,
                        data=images_data.split.describe() if images_data is not None else None, cut_note=cut_note)
    files = {"bundle": conv.bundle_dir, "results": results_path, "logs": logs}
    if latencies:
        _latency_png(latencies, out_dir / "latency.png")
        files["latency plot"] = out_dir / "latency.png"
    summary_path = out_dir / "summary.json"
    files["summary"] = summary_path
    result.files = {k: str(v) for k, v in files.items()}
    summary_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if answered < n:
        raise CheckFailed(f"only {answered} of {n} requests were answered", fix=f"read the logs in {logs}")
    if correct != expected_correct:
        raise CheckFailed(f"end to end, {correct} of {n} images were right, but the same head+tail run here gets "
                          f"{expected_correct}: something between device and cloud changes the data",
                          fix=f"compare {results_path} with the bundle's parity check; read the logs in {logs}")
    return result
