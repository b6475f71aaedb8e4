"""Frame sources by URI: ``open_source(uri)`` gives a :class:`FrameSource`
whose ``read`` returns one BGR frame or raises ``SourceLost``/``CorruptFrame``.
The thread that reads them, reconnects and keeps only the newest frame is
``armscope.edge.capture.Capture``.

URIs::

    v4l2:///dev/video0[?width=1600&height=1200&fps=30]   USB/V4L2 camera
    csi://0[?width=1920&height=1080&fps=30]              Jetson CSI camera (GStreamer nvarguscamerasrc)
    rtsp://host/stream                                   network camera (FFmpeg)
    file://video.mp4[?fps=max|N][&loop=1]                recorded video, at its own fps by default
    dir://frames/[?fps=N][&loop=1][&settle_ms=500]       image sequence replay (sorted by name), default 10 fps
    image://still.png[?fps=N]                            one image repeated, default 10 fps (fps=max: as fast as taken)
    watch://DIR[?fps=N&width=W&height=H]                 a camera watching a png:// display: its newest PNG, default 30 fps
                                                         (armscope.edge.watch_source; glass-to-glass measurement)

A source that cannot be opened or stops delivering frames is "lost": the
capture thread reports ``no_signal`` and reopens it with exponential backoff.
A finite source (file:// or dir:// without loop=1) that ends reports
``no_signal`` once, then the daemon exits (``exit_on_source_end``) or waits;
it is not replayed. A frame that cannot be decoded whole (a corrupt,
truncated, spliced or half-written file in a dir:// sequence) is skipped and
counted as corrupt, never classified and never fatal (``DirSource``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.core.imagefile import decode_image, read_image_file
from armscope.core.preprocess import IMAGE_SUFFIXES
from armscope.edge.source_base import CorruptFrame, FrameSource, SourceLost, SourceSpec, check_frame  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

DEFAULT_SETTLE_MS = 500   # dir://: a file modified more recently than this is not read yet
SCHEMES = ("v4l2", "csi", "rtsp", "rtsps", "file", "dir", "image", "watch")
_PATH_SCHEMES = ("file", "dir", "image", "watch")


def _split_path_uri(uri: str) -> tuple[str, str, str]:
    scheme, _, rest = uri.partition("://")
    path, _, query = rest.partition("?")
    return scheme, path, query


def parse_source(uri: str) -> SourceSpec:
    """Validate a source URI; raises ArmscopeError saying what is wrong with it."""
    if "://" not in uri:
        raise ArmscopeError(f"{uri!r} is not a source URI (expected one of {', '.join(s + '://' for s in SCHEMES)})")
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ArmscopeError(f"{uri!r}: unknown scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    if scheme in _PATH_SCHEMES:
        _, target, query = _split_path_uri(uri)
    elif scheme in ("rtsp", "rtsps"):
        target, query = uri, ""
    else:
        parts = urlsplit(uri)
        target = (parts.netloc + parts.path) if scheme == "v4l2" else parts.netloc
        query = parts.query
    if not target:
        raise ArmscopeError(f"{uri!r}: no device, path or address after {scheme}://")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    allowed = {"v4l2": {"width", "height", "fps"}, "csi": {"width", "height", "fps", "flip"},
               "rtsp": set(), "rtsps": set(), "file": {"fps", "loop"}, "dir": {"fps", "loop", "settle_ms"}, "image": {"fps"},
               "watch": {"fps", "width", "height"}}
    for key, value in params.items():
        if key not in allowed[scheme]:
            raise ArmscopeError(f"{uri!r}: unknown parameter {key!r} for {scheme}:// "
                                f"(allowed: {', '.join(sorted(allowed[scheme])) or 'none'})")
        if key == "fps" and value != "max":
            try:
                if not 0 < float(value) <= 1000:  # also NaN and inf
                    raise ValueError
            except ValueError:
                raise ArmscopeError(f"{uri!r}: parameter fps={value!r}: expected a number in (0, 1000] or 'max'") from None
        if key == "settle_ms" and not (value.isdigit() and int(value) <= 60000):
            raise ArmscopeError(f"{uri!r}: parameter settle_ms={value!r}: expected an integer in 0..60000")
        if key in ("width", "height", "flip") and not value.isdigit():
            raise ArmscopeError(f"{uri!r}: parameter {key}={value!r}: expected a non-negative integer")
        if key == "loop" and value not in ("0", "1", "true", "false"):
            raise ArmscopeError(f"{uri!r}: parameter loop={value!r}: expected 1 or 0")
    if "loop" in params:
        params["loop"] = params["loop"] in ("1", "true")
    if scheme == "csi" and not target.isdigit():
        raise ArmscopeError(f"{uri!r}: csi:// takes a sensor number, e.g. csi://0")
    return SourceSpec(scheme, target, params, uri)


def resolve_relative(uri: str, base: Path) -> str:
    """Make a relative file/dir/image path in ``uri`` relative to ``base`` (the config file's directory)."""
    if "://" not in uri:
        return uri
    scheme, path, query = _split_path_uri(uri)
    if scheme.lower() not in _PATH_SCHEMES or not path or Path(path).is_absolute():
        return uri
    resolved = str(Path(base) / path) + ("/" if path.endswith("/") else "")
    return f"{scheme}://{resolved}" + (f"?{query}" if query else "")


def gstreamer_csi_pipeline(sensor: int, width: int = 1920, height: int = 1080, fps: int = 30, flip: int = 0) -> str:
    """The nvarguscamerasrc pipeline for cv2.VideoCapture(..., cv2.CAP_GSTREAMER) on a Jetson:
    NVMM NV12 from the ISP -> nvvidconv to BGRx in system memory -> BGR for OpenCV; the
    appsink drops late buffers and keeps one, the same newest-wins policy as the daemon."""
    return (
        f"nvarguscamerasrc sensor-id={sensor} ! "
        f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, framerate=(fraction){fps}/1 ! "
        f"nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! "
        f"videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=true max-buffers=1 sync=false"
    )


class VideoCaptureSource(FrameSource):
    """v4l2, csi, rtsp and file sources through cv2.VideoCapture."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.cap = None
        self.failures = 0

    def _open_args(self):
        s, p = self.spec, self.spec.params
        if s.scheme == "v4l2":
            return (s.target, cv2.CAP_V4L2)
        if s.scheme == "csi":
            pipeline = gstreamer_csi_pipeline(int(s.target), int(p.get("width", 1920)), int(p.get("height", 1080)),
                                              int(float(p.get("fps", 30))), int(p.get("flip", 0)))
            return (pipeline, cv2.CAP_GSTREAMER)
        if s.scheme in ("rtsp", "rtsps"):
            return (s.target, cv2.CAP_FFMPEG)
        return (s.target, cv2.CAP_ANY)

    def open(self) -> None:
        if self.spec.scheme == "file" and not Path(self.spec.target).is_file():
            raise SourceLost(f"{self.spec.target}: no such video file")
        target, api = self._open_args()
        cap = cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceLost(self._open_failure(target))
        p = self.spec.params
        if self.spec.scheme == "v4l2":
            for key, prop in (("width", cv2.CAP_PROP_FRAME_WIDTH), ("height", cv2.CAP_PROP_FRAME_HEIGHT),
                              ("fps", cv2.CAP_PROP_FPS)):
                if key in p:
                    cap.set(prop, float(p[key]))
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)   # the driver's queue, not ours, would otherwise add latency
        if self.spec.scheme == "file":
            native = cap.get(cv2.CAP_PROP_FPS) or 0.0
            fps = self.spec.fps(native if native > 0 else 25.0)
            self.pace = None if fps is None else 1.0 / fps
        self.cap, self.failures = cap, 0

    def _open_failure(self, target: str) -> str:
        """What failed, in words (the capture thread's warning already names the URI)."""
        scheme = self.spec.scheme
        if scheme == "v4l2":
            if not Path(target).exists():
                return f"camera {target} not found (no such V4L2 device; is it plugged in?)"
            return (f"camera {target} exists but could not be opened for capture (in use by another program, "
                    "no permission: the video group, or not a capture device)")
        if scheme == "csi":
            return (f"CSI camera {target} could not be opened through GStreamer (nvarguscamerasrc; needs a Jetson "
                    "and an OpenCV built with GStreamer)")
        if scheme in ("rtsp", "rtsps"):
            return "stream could not be opened (host unreachable, wrong path or credentials, or refused)"
        return f"{target}: OpenCV could not open it as a video (unknown format or codec)"

    def read(self) -> np.ndarray:
        ok, frame = self.cap.read()
        if not ok:
            if self.spec.scheme == "file":
                if self.spec.params.get("loop"):
                    self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    ok, frame = self.cap.read()
                if not ok:
                    raise SourceLost("source ended")
            else:
                # A live camera that returns nothing a few times in a row is gone (unplugged, stream dropped).
                self.failures += 1
                if self.failures >= 3:
                    raise SourceLost("camera stopped delivering frames")
                raise CorruptFrame("camera returned no frame")
        self.failures = 0
        return check_frame(frame, self.spec.uri)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class DirSource(FrameSource):
    """An image sequence, replayed in name order at ``fps`` (default 10).

    Only whole frames: a file modified less than ``settle_ms`` ago (default
    500) is waited for until it has been left alone that long, and skipped as
    corrupt if it changes meanwhile or while being read; decoding is strict
    (``armscope.core.imagefile``), so a truncated or spliced file is corrupt, never
    classified. Writers should write elsewhere and rename into the folder.

    ``loop=0`` plays the folder once and ends. ``loop=1`` lists the folder
    again before every pass, so added and deleted files are seen; a pass in
    which no file was a whole image (all corrupt, deleted, or the folder
    emptied) loses the source (``no_signal``) until a whole image is back.
    """

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.root = Path(spec.target)
        self.files: list[Path] = []
        self.index = 0
        self.good_in_pass = 0
        fps = spec.fps(10.0)
        self.pace = None if fps is None else 1.0 / fps
        self.settle_s = float(spec.params.get("settle_ms", DEFAULT_SETTLE_MS)) / 1000.0

    def _list(self) -> None:
        try:
            names = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except FileNotFoundError:
            raise SourceLost(f"{self.root}: no such directory") from None
        except NotADirectoryError:
            raise SourceLost(f"{self.root}: not a directory") from None
        except OSError as exc:
            raise SourceLost(f"{self.root}: cannot list ({exc.strerror or exc})") from None
        if not names:
            raise SourceLost(f"{self.root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.files, self.index, self.good_in_pass = names, 0, 0

    def open(self) -> None:
        self._list()

    def _wait(self, seconds: float) -> None:
        if self.stop is not None:
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)

    def read(self) -> np.ndarray:
        while True:
            if self.index >= len(self.files):
                if not self.spec.params.get("loop"):
                    raise SourceLost("source ended")
                if not self.good_in_pass:
                    raise SourceLost(f"{self.root}: no whole image in a pass over the folder")
                self._list()
            path = self.files[self.index]
            self.index += 1
            try:
                before = path.stat()
            except FileNotFoundError:
                continue                    # deleted since the folder was listed: not a frame, not an error
            except OSError as exc:
                raise CorruptFrame(f"{path}: unreadable ({exc.strerror or exc})") from None
            age = time.time() - before.st_mtime
            if age < self.settle_s:
                self._wait(self.settle_s - max(age, 0.0))
                try:
                    settled = path.stat()
                except FileNotFoundError:
                    continue
                if (settled.st_mtime_ns, settled.st_size) != (before.st_mtime_ns, before.st_size):
                    raise CorruptFrame(f"{path}: still being written (changed within settle_ms)")
                before = settled
            try:
                data = path.read_bytes()
                after = path.stat()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise CorruptFrame(f"{path}: unreadable ({exc.strerror or exc})") from None
            if (after.st_mtime_ns, after.st_size) != (before.st_mtime_ns, before.st_size):
                raise CorruptFrame(f"{path}: changed while being read")
            try:
                image = decode_image(data, str(path))
            except ArmscopeError as exc:   # NotAnImage, CorruptImage
                raise CorruptFrame(str(exc)) from None
            self.good_in_pass += 1
            return check_frame(image, str(path))


class ImageSource(FrameSource):
    """One still image, delivered repeatedly (a copy each time, as a camera would)."""

    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.image = None
        fps = spec.fps(10.0)
        self.pace = None if fps is None else 1.0 / fps

    def open(self) -> None:
        try:
            self.image = read_image_file(self.spec.target)
        except ArmscopeError as exc:
            raise SourceLost(str(exc)) from None

    def read(self) -> np.ndarray:
        return self.image.copy()


def open_source(spec: SourceSpec | str) -> FrameSource:
    spec = parse_source(spec) if isinstance(spec, str) else spec
    if spec.scheme == "dir":
        return DirSource(spec)
    if spec.scheme == "image":
        return ImageSource(spec)
    if spec.scheme == "watch":
        from armscope.edge.watch_source import WatchSource

        return WatchSource(spec)
    return VideoCaptureSource(spec)
