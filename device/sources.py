"""Where the device's inputs come from: image files, folders, globs, a camera.

Every source yields :class:`Sample` objects in a deterministic order (sorted
paths), so two runs over the same folder send the same requests in the same
order.  The camera goes through ``picamera2`` (installed with apt on Raspberry
Pi OS, never with pip) and is imported only when asked for.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from protocol.errors import UsageError

log = logging.getLogger(__name__)

#: File endings read as images (lower case); others in a folder are skipped.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

_GLOB_CHARS = set("*?[")
DEFAULT_CAMERA_SIZE = (640, 480)
CAMERA_PREFIX = "camera"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One input: a name for reports and what to preprocess (a path, a PIL image or an array)."""

    name: str
    data: Any


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _folder(path: Path) -> list[Path]:
    # Recursive so a dataset laid out as <class>/<file>.png works; hidden files skipped.
    found = [p for p in path.rglob("*")
             if p.is_file() and _is_image(p) and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    return sorted(found)


def expand_paths(specs: Iterable[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of image paths.

    The order is the order of ``specs``, each expanded in sorted order.  A spec
    that matches nothing raises :class:`UsageError` naming it.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if any(c in _GLOB_CHARS for c in spec) and not os.path.exists(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            paths = [p for p in matches if p.is_file() and _is_image(p)]
            for d in (p for p in matches if p.is_dir()):
                paths.extend(_folder(d))
            if not paths:
                raise UsageError(f"the pattern {spec!r} matches no image file",
                                 fix=f"check the pattern; image endings read: {', '.join(sorted(IMAGE_SUFFIXES))}")
        else:
            path = Path(spec)
            if path.is_dir():
                paths = _folder(path)
                if not paths:
                    raise UsageError(f"the folder {spec} holds no image file",
                                     fix=f"put images there ({', '.join(sorted(IMAGE_SUFFIXES))})")
            elif path.is_file():
                paths = [path]
            else:
                raise UsageError(f"input {spec} does not exist",
                                 fix="give an image file, a folder, a glob such as 'imgs/*.png', or 'camera'")
        for p in paths:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def file_samples(specs: Iterable[str]) -> Iterator[Sample]:
    """Samples for image files, folders and globs (paths are checked up front)."""
    for p in expand_paths(specs):
        yield Sample(name=str(p), data=p)


def _import_picamera2():
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise UsageError(
            f"the camera needs picamera2, which is not importable here ({exc})",
            fix="on Raspberry Pi OS: `sudo apt install python3-picamera2`, then create the venv with "
                "`python3 -m venv --system-site-packages .venv` so it can see the apt package "
                "(picamera2 is not installed with pip)") from exc
    return Picamera2


def camera_samples(count: int | None = None, interval: float = 0.0, size: tuple[int, int] | None = None,
                   camera_index: int = 0) -> Iterator[Sample]:
    """Frames from the Raspberry Pi camera as PIL images (``count`` frames, or forever).

    ``capture_image`` is used rather than ``capture_array`` because picamera2's
    array formats name their channel order backwards (``RGB888`` is B, G, R in
    memory); a PIL image has no such trap.
    """
    Picamera2 = _import_picamera2()
    cam = Picamera2(camera_index)
    # A preview-sized stream, not a full-resolution still: the head wants a few hundred
    # pixels, and a 12 MP capture would cost a second per frame on a Pi.
    cam.configure(cam.create_preview_configuration(main={"size": tuple(size or DEFAULT_CAMERA_SIZE)}))
    cam.start()
    log.info("camera %d started", camera_index)
    try:
        i = 0
        while count is None or i < count:
            t0 = time.monotonic()
            image = cam.capture_image("main")
            yield Sample(name=f"camera{camera_index}:{i}", data=image)
            i += 1
            if interval > 0:
                time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    finally:
        cam.stop()
        cam.close()


def parse_camera_spec(spec: str) -> int | None | bool:
    """``camera`` → None (forever), ``camera:N`` → N frames; anything else → False."""
    if spec == CAMERA_PREFIX:
        return None
    if spec.startswith(CAMERA_PREFIX + ":"):
        tail = spec[len(CAMERA_PREFIX) + 1:]
        if tail.isdigit() and int(tail) > 0:
            return int(tail)
        raise UsageError(f"bad camera input {spec!r}", fix="write 'camera' (until stopped) or 'camera:N' (N frames)")
    return False


def open_inputs(specs: Iterable[str], *, camera_interval: float = 0.0,
                camera_size: tuple[int, int] | None = None) -> Iterator[Sample]:
    """All samples for the command line's INPUTS, in order.

    Files, folders and globs are expanded (and checked) before the first sample
    is yielded, so a typo fails at once rather than after an hour of camera frames.
    A spec naming an existing path is always a path, even if it is called ``camera``.
    """
    specs = [str(s) for s in specs]
    if not specs:
        raise UsageError("no inputs given", fix="give image files, folders, globs, or 'camera'")
    plan: list[tuple[str, Any]] = []
    for spec in specs:
        cam = False if os.path.exists(spec) else parse_camera_spec(spec)
        if cam is not False:
            _import_picamera2()   # fail now, with the install hint, not mid-run
            plan.append(("camera", cam))
        else:
            plan.append(("files", expand_paths([spec])))
    return _iterate(plan, camera_interval, camera_size)


def _iterate(plan, camera_interval, camera_size) -> Iterator[Sample]:
    for kind, what in plan:
        if kind == "camera":
            yield from camera_samples(count=what, interval=camera_interval, size=camera_size)
        else:
            for p in what:
                yield Sample(name=str(p), data=p)
