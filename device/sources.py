"""Where the device's inputs come from: image files, folders, globs, a camera, and folders watched.

Every source yields :class:`Sample` objects in a deterministic order (sorted
paths), so two runs over the same folder send the same requests in the same
order.  :class:`FolderWatcher` finds the images that arrive in watched folders
(the service), with the same rules as a one-off run (:func:`expand_paths`).  The
camera goes through ``picamera2`` (installed with apt on Raspberry Pi OS, never
with pip) and is imported only when asked for.
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


def _folder(path: Path, skip: frozenset[Path] = frozenset()) -> list[Path]:
    """Image files under ``path``, sorted; hidden files and folders, and the folders in ``skip``, left out."""
    # Recursive so a dataset laid out as <class>/<file>.png works.
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not n.startswith(".") and (not skip or (d / n).resolve() not in skip)]
        found += [d / f for f in filenames if not f.startswith(".") and _is_image(Path(f))]
    return sorted(p for p in found if p.is_file())


def _is_glob(spec: str) -> bool:
    return any(c in _GLOB_CHARS for c in spec) and not os.path.exists(spec)


def _glob(spec: str, skip: frozenset[Path] = frozenset()) -> list[Path]:
    matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
    paths = [p for p in matches if p.is_file() and _is_image(p) and not p.name.startswith(".")]
    for d in (p for p in matches if p.is_dir() and (not skip or p.resolve() not in skip)):
        paths.extend(_folder(d, skip))
    return paths


def expand_paths(specs: Iterable[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of image paths.

    The order is the order of ``specs``, each expanded in sorted order.  A spec
    that matches nothing raises :class:`UsageError` naming it.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for spec in specs:
        spec = os.path.expanduser(str(spec))
        if _is_glob(spec):
            paths = _glob(spec)
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


class FolderWatcher:
    """New images in watched folders and globs, each handed out once; what is done is moved or deleted.

    An image is new when it is an image file (:data:`IMAGE_SUFFIXES`), not hidden,
    not in flight, and left unchanged for ``settle`` seconds: a writer that copies
    slowly is not read half-written (the safe way to write one is to a hidden name,
    then rename it into place).  When its answer is in, :meth:`done` moves it under
    ``done_dir`` (``after="delete"``: deletes it) or, if it failed, under
    ``failed_dir`` so it is not retried for ever; both keep its path below the
    watched folder.
    """

    def __init__(self, specs: Iterable[str], *, done_dir: Path, failed_dir: Path, settle: float = 1.0,
                 after: str = "move"):
        self.specs = [os.path.expanduser(str(s)) for s in specs]
        self.done_dir, self.failed_dir = Path(done_dir), Path(failed_dir)
        self.settle = settle
        self.after = after
        self.in_flight: set[str] = set()
        self._skip = frozenset({self.done_dir.resolve(), self.failed_dir.resolve()})

    @property
    def roots(self) -> list[Path]:
        return [Path(s) for s in self.specs if Path(s).is_dir()]

    def hold(self, names: Iterable[str]) -> None:
        """Treat these as in flight (what the outbox re-sends after a restart)."""
        self.in_flight.update(names)

    def scan(self) -> list[Path]:
        """The images that are new since the last scan, in sorted order per spec; they are then in flight."""
        now = time.time()
        found: dict[str, Path] = {}
        for spec in self.specs:
            if _is_glob(spec):
                candidates = _glob(spec, self._skip)
            elif Path(spec).is_dir():
                candidates = _folder(Path(spec), self._skip)
            else:
                candidates = [Path(spec)] if _is_image(Path(spec)) else []
            for p in candidates:
                name = str(p)
                if name in found or name in self.in_flight:
                    continue
                try:
                    st = p.stat()
                except OSError:        # gone since it was listed
                    continue
                if p.is_file() and now - st.st_mtime >= self.settle:
                    found[name] = p
        self.in_flight.update(found)
        return list(found.values())

    def done(self, name: str, ok: bool) -> None:
        """The answer for ``name`` is in: move (or delete) the image, and forget it."""
        try:
            self._dispose(Path(name), ok)
        finally:
            self.in_flight.discard(name)

    def _dispose(self, src: Path, ok: bool) -> None:
        if not src.is_file():
            return
        if ok and self.after == "delete":
            src.unlink(missing_ok=True)
            return
        rel = Path(src.name)
        for root in self.roots:
            try:
                rel = src.resolve().relative_to(root.resolve())
                break
            except ValueError:
                continue
        dest = (self.done_dir if ok else self.failed_dir) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while dest.exists():
            dest = dest.with_name(f"{src.stem}.{n}{src.suffix}")
            n += 1
        try:
            os.replace(src, dest)
        except OSError as exc:
            log.warning("cannot move %s to %s: %s", src, dest, exc)
