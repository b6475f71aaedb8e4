"""The bridge runtime: daemon overlays (ZeroMQ) -> registered, converted -> eyepiece display.

Why this module exists
----------------------
The edge daemon publishes Grad-CAM overlays in *camera* pixels; the eyepiece
microdisplay needs them in *display* pixels and in its own pixel format, and
it must never show an overlay that is stale or wrong: the pathologist looks
through the eyepiece at the specimen and cannot tell an old heat map from a
current one.  This module is the loop that sits between the two, and its
design is driven by that safety requirement rather than by throughput:

* **Fail dark.**  On an additive microdisplay black is transparent, so
  "blank" is always the safe state.  The display is blanked on start-up,
  on exit (also SIGTERM/SIGINT, via :meth:`Bridge.stop`), and whenever any
  of the rules below fires.  Every blanking is counted with its reason
  (:data:`BLANK_REASONS`, :meth:`Bridge.stats`).
* **Every message is validated** (``armscope.core.protocol.decode`` plus the
  stricter checks in :func:`check_message` on every key the bridge uses,
  the PNG header before decoding, and strictly increasing ``frame_id`` per
  ``run_id``).  A rejected message is counted with a reason and blanks the
  display: a stream that produced one malformed message is not trusted to
  have produced a correct overlay just before it.
* **Overlays are shown only while the daemon says ``running``.**  Any other
  state blanks immediately and discards overlays published before it.  An
  overlay that arrives while the state is not (yet) ``running`` is *held*:
  the daemon publishes the first overlay after recovering and then the
  ``running`` status (edge/daemon.py), so the held overlay is shown as soon
  as that status arrives, if it is still fresh.  Before the first status
  the state is unknown and nothing is shown.
* **Staleness** (docs/protocol.md 1.4): ``stale_after_ms`` bounds the age of
  what the eyepiece shows *from the capture of the camera frame*, not from
  its publication: a daemon frozen for seconds (SIGSTOP, swapping) must not
  hand over a fresh-looking message about an old field.  So an overlay
  expires at the earliest of: receipt + ``stale_after_ms`` minus the age the
  capture already had when the daemon published it (``publish_mono -
  capture_mono``, one clock, valid across hosts), measured on the bridge's
  own monotonic clock; on the same host (``clock="mono"``; ``auto`` picks it
  for loopback/ipc endpoints) ``capture_mono + stale_after_ms``, which also
  sees time spent frozen after publishing, in transit and in the receive
  queue; with ``clock="wall"`` (hosts with synchronised clocks)
  ``capture_wall + stale_after_ms``.  The daemon itself never publishes an
  overlay older than the window.  ``stale_after_ms`` from the header is
  capped at ``max_stale_ms``.
* **Silence**: if no message of any topic arrives for ``stale_after_ms``
  (heartbeats are 2 Hz), the daemon is presumed dead and the display is
  blanked (reason ``silent``), whatever is on it.
* **Bounded waits.**  The loop polls the socket with a timeout of at most
  ``poll_interval`` (and never past the next expiry), so expiry is detected
  even when nothing arrives.  A frame sent over the serial link gets a
  deadline no later than the expiry of what is on screen now (the old frame
  stays visible until the new one's last chunk lands); if the link cannot
  deliver in time (``LinkTimeout``/``LinkError``) the display is blanked
  (reason ``link``).  A blank that fails is retried on every tick.

The loop is single-threaded on purpose: every decision about what the
eyepiece shows is made in one place, in order, with no locks.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import json
import logging
import math
import struct
import threading
import time
import urllib.parse
from typing import Callable

import cv2
import numpy as np

from armscope.core import protocol

from .displays import Display, paste_on_black
from .label import add_label, label_text
from .link import LinkError
from .registration import Registration, slow_warp_warning
from .stamping import add_stamp

__all__ = [
    "Bridge",
    "BLANK_REASONS",
    "CLOCK_MODES",
    "check_message",
    "overlay_to_display_matrix",
    "overlay_footprint",
    "render_for",
    "render_for_display",
    "same_host_endpoint",
]

log = logging.getLogger(__name__)

# Why the display was blanked (keys of stats()["blanks"]); "state:<state>" for daemon states.
BLANK_STARTUP = "startup"        # bridge starting: clear whatever the display held
BLANK_EXIT = "exit"              # bridge stopping (normal exit, SIGTERM, SIGINT, error)
BLANK_STALE = "stale"            # the shown overlay passed its stale_after_ms
BLANK_SILENT = "silent"          # no message at all for stale_after_ms: daemon presumed dead
BLANK_INVALID = "invalid"        # a message failed validation
BLANK_LINK = "link"              # the display link could not deliver a frame in time
BLANK_DISPLAY = "display"        # any other error while showing a frame
BLANK_RUN = "run_change"         # a new daemon run_id (the daemon restarted)
BLANK_REASONS = (BLANK_STARTUP, BLANK_EXIT, BLANK_STALE, BLANK_SILENT, BLANK_INVALID, BLANK_LINK,
                 BLANK_DISPLAY, BLANK_RUN) + tuple(f"state:{s}" for s in protocol.STATES if s != protocol.STATE_RUNNING)

CLOCK_MODES = ("auto", "receipt", "mono", "wall")

MAX_OVERLAY_SIDE = 4096          # larger overlays are rejected (and PNGs are checked before decoding)
MAX_FRAME_SIDE = 65535
_MIN_SEND_BUDGET_S = 0.02        # below this a frame cannot be delivered before what is shown expires
_DRAIN_LIMIT = 256               # messages per wake-up, so a flood cannot starve the watchdog


# ---------------------------------------------------------------- validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_message(msg: protocol.Message) -> None:
    """Checks beyond ``protocol.decode`` on every key the bridge relies on.

    ``decode`` checks structure (keys present, sizes); this checks types and
    ranges, so nothing malformed can reach the arithmetic, the warp or the
    display.  Raises ``protocol.ProtocolError`` naming the key.
    """
    h = msg.header

    def bad(key, what):
        raise protocol.ProtocolError(f"header key {key}: {str(h.get(key))[:60]!r} {what}")

    if not isinstance(h["run_id"], str) or not 0 < len(h["run_id"]) <= 128:
        bad("run_id", "is not a non-empty string")
    if not _is_int(h["seq"]) or h["seq"] < 0:
        bad("seq", "is not a non-negative integer")
    for key in ("publish_mono", "publish_wall"):
        if not _is_num(h[key]):
            bad(key, "is not a finite number")
    if not _is_num(h["stale_after_ms"]) or h["stale_after_ms"] <= 0:
        bad("stale_after_ms", "is not a positive number")
    if msg.is_overlay:
        if not _is_int(h["frame_id"]) or h["frame_id"] < 0:
            bad("frame_id", "is not a non-negative integer")
        for key in ("capture_mono", "capture_wall"):
            if not _is_num(h[key]):
                bad(key, "is not a finite number")
        for key in ("width", "height"):
            if not 1 <= h[key] <= MAX_OVERLAY_SIDE:
                bad(key, f"is outside 1..{MAX_OVERLAY_SIDE}")
        if not all(_is_num(p) for p in h["probs"]) or not all(isinstance(c, str) for c in h["classes"]):
            raise protocol.ProtocolError("header keys probs/classes: expected finite numbers / strings")
        _check_decision(h["decision"], len(h["classes"]), "decision")
        if h.get("subtype") is not None:  # cascade bundles; decode checked its lists
            _check_decision(h["subtype"]["decision"], len(h["subtype"]["classes"]), "subtype.decision")
            if not all(_is_num(p) for p in h["subtype"]["probs"]):
                raise protocol.ProtocolError("header key subtype.probs: expected finite numbers")
        r = h["region"]
        if not isinstance(r, dict):
            bad("region", "is not an object")
        for key in ("frame_width", "frame_height", "x", "y", "size"):
            if not _is_int(r.get(key)):
                raise protocol.ProtocolError(f"header key region.{key}: {str(r.get(key))[:40]!r} is not an integer")
        fw, fh, x, y, size = r["frame_width"], r["frame_height"], r["x"], r["y"], r["size"]
        if not (1 <= fw <= MAX_FRAME_SIDE and 1 <= fh <= MAX_FRAME_SIDE):
            raise protocol.ProtocolError(f"header key region: frame size {fw}x{fh} outside 1..{MAX_FRAME_SIDE}")
        if not (size >= 1 and 0 <= x and 0 <= y and x + size <= fw and y + size <= fh):
            raise protocol.ProtocolError(f"header key region: crop x={x} y={y} size={size} is not inside the "
                                         f"{fw}x{fh} frame")
        if h["encoding"] == protocol.ENCODING_PNG:
            _check_png_header(msg.payload, h["width"], h["height"])
    else:
        if not isinstance(h["heartbeat"], bool):
            bad("heartbeat", "is not a boolean")
        if h["frame_id"] is not None and (not _is_int(h["frame_id"]) or h["frame_id"] < 0):
            bad("frame_id", "is not null or a non-negative integer")
        if h.get("reason") is not None and not isinstance(h.get("reason"), str):
            bad("reason", "is not null or a string")


def _check_decision(d, n_classes: int, key: str) -> None:
    """What the eyepiece label reads of a decision: a short label and the
    index of its class."""
    if not isinstance(d, dict):
        raise protocol.ProtocolError(f"header key {key}: {str(d)[:60]!r} is not an object")
    if not isinstance(d.get("label"), str) or not 0 < len(d["label"]) <= 64:
        raise protocol.ProtocolError(f"header key {key}.label: {str(d.get('label'))[:60]!r} is not a string of 1-64 characters")
    if not _is_int(d.get("index")) or not 0 <= d["index"] < n_classes:
        raise protocol.ProtocolError(f"header key {key}.index: {str(d.get('index'))[:40]!r} is not an index into "
                                     f"its {n_classes} classes")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_header(payload: bytes, width: int, height: int) -> None:
    """Read the PNG's IHDR before decoding it: the size must match the header
    (a tiny malicious PNG could otherwise claim gigapixels) and it must be
    8-bit RGBA (colour type 6), as the protocol says."""
    if len(payload) < 33 or payload[:8] != _PNG_SIGNATURE or payload[12:16] != b"IHDR":
        raise protocol.ProtocolError("PNG payload: not a PNG file (bad signature or no IHDR)")
    w, h, depth, ctype = struct.unpack(">IIBB", payload[16:26])
    if (w, h) != (width, height):
        raise protocol.ProtocolError(f"PNG payload: is {w}x{h}, header says {width}x{height}")
    if (depth, ctype) != (8, 6):
        raise protocol.ProtocolError(f"PNG payload: bit depth {depth}, colour type {ctype}; expected 8-bit RGBA (6)")


def _reject_category(exc: BaseException) -> str:
    """Short counter key for a rejection (the full text is logged and kept)."""
    text = str(exc)
    if not isinstance(exc, protocol.ProtocolError):
        return "malformed"
    if text.startswith("header key schema"):
        return "schema"
    if text.startswith(("expected 3 frames", "frame 0")):
        return "framing"
    if text.startswith("PNG payload") or "payload" in text.split(":")[0]:
        return "payload"
    if "width/height" in text:
        return "payload"
    return "header"


# ---------------------------------------------------------------- geometry


def overlay_to_display_matrix(region: dict, overlay_size: tuple[int, int],
                              registration: Registration | None, display_size: tuple[int, int]) -> np.ndarray:
    """3x3 homography from overlay pixels to display pixels.

    The overlay covers the square crop ``region`` of the camera frame
    (docs/protocol.md 1.2), scaled by ``size / width``; pixel centres map to
    pixel centres (the convention of ``cv2.resize``).  That is composed with
    the camera -> display registration.  Without a registration the display
    is assumed to show the whole camera frame, scaled uniformly to fit and
    centred (an uncalibrated default; the CLI warns about it).
    """
    w, h = overlay_size
    sx, sy = region["size"] / w, region["size"] / h
    to_camera = np.array([[sx, 0.0, region["x"] + 0.5 * sx - 0.5],
                          [0.0, sy, region["y"] + 0.5 * sy - 0.5],
                          [0.0, 0.0, 1.0]])
    if registration is not None:
        cam_to_display = registration.matrix
    else:
        fw, fh = region["frame_width"], region["frame_height"]
        dw, dh = display_size
        s = min(dw / fw, dh / fh)
        cam_to_display = np.array([[s, 0.0, (dw - s * fw) / 2 + 0.5 * s - 0.5],
                                   [0.0, s, (dh - s * fh) / 2 + 0.5 * s - 0.5],
                                   [0.0, 0.0, 1.0]])
    return cam_to_display @ to_camera


def overlay_footprint(matrix: np.ndarray, overlay_size: tuple[int, int],
                      display_size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Display pixels (x, y, w, h) the warped overlay can touch, or None if it
    misses the display: the bounding box of the overlay's corners (pixel edges,
    -0.5 .. size-0.5) mapped through ``matrix``, grown by one pixel for the
    bilinear footprint and clipped. Outside it the warp is the transparent
    border by construction, so nothing outside needs computing or sending."""
    w, h = overlay_size
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]], np.float64)
    pts = cv2.perspectiveTransform(corners[None], matrix)[0]
    if not np.isfinite(pts).all():
        return (0, 0, int(display_size[0]), int(display_size[1]))  # through the horizon: be safe, whole display
    dw, dh = (int(v) for v in display_size)
    x0 = max(0, int(np.floor(pts[:, 0].min())) - 1)
    y0 = max(0, int(np.floor(pts[:, 1].min())) - 1)
    x1 = min(dw, int(np.ceil(pts[:, 0].max())) + 2)
    y1 = min(dh, int(np.ceil(pts[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def render_for_display(rgba: np.ndarray, matrix: np.ndarray, display_size: tuple[int, int], *,
                       luma: bool = False, align=None) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Warp a straight-alpha RGBA overlay to the display and composite it over
    black: ``(image, region)``, the (h, w, 3) RGB the additive display should
    emit inside ``region`` = (x, y, w, h) before its brightness/gamma and pixel
    packing (done by the ``Display``); everything outside ``region`` is black.

    Only the overlay's footprint is warped (a display shows the crop square,
    about half its pixels) and the display sends only that region plus what
    it must clear (partial update): at 1280x720 RGB565 a full frame is 1.8 MB,
    20 s on a 921600-baud UART. Warped in premultiplied form, as
    ``registration.warp`` does, so colour hidden under alpha 0 never bleeds
    into visible pixels.

    ``align``: the display's ``Display.align``, so the region is already one
    the display can address (MONO1: whole bytes) and needs no padding copy.
    ``luma``: for grey displays (``Display.luma_input``), return the (h, w)
    Rec.601 luma instead of RGB; it is computed before the warp, which is
    linear, so one channel is warped instead of four (within 1 grey level of
    warping RGB first)."""
    rgba = np.ascontiguousarray(rgba)
    region = overlay_footprint(matrix, (rgba.shape[1], rgba.shape[0]), display_size)
    if region is None:  # the overlay misses the display entirely: show black
        region = (0, 0, 1, 1) if align is None else align((0, 0, 1, 1))
        return np.zeros((region[3], region[2]) if luma else (region[3], region[2], 3), np.uint8), region
    if align is not None:
        region = align(region)
    x, y, w, h = region
    shift = np.array([[1.0, 0.0, -x], [0.0, 1.0, -y], [0.0, 0.0, 1.0]])
    premult = cv2.cvtColor(rgba, cv2.COLOR_RGBA2mRGBA)
    src = cv2.cvtColor(premult, cv2.COLOR_RGBA2GRAY) if luma else premult
    out = cv2.warpPerspective(src, shift @ matrix, (w, h), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    return (out if luma else cv2.cvtColor(out, cv2.COLOR_RGBA2RGB)), region


def render_for(display: Display, rgba: np.ndarray, matrix: np.ndarray,
               display_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``render_for_display`` as ``display`` wants it (its alignment, luma for
    grey displays): what the bridge does for every overlay."""
    return render_for_display(rgba, matrix, display_size, luma=display.luma_input, align=display.align)


def same_host_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// to a loopback address: then the
    daemon's CLOCK_MONOTONIC is the bridge's and ``publish_mono`` can be compared."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- runtime


@dataclasses.dataclass
class _Overlay:
    msg: protocol.Message
    rgba: np.ndarray
    received: float   # bridge monotonic seconds
    expiry: float     # bridge monotonic seconds


class Bridge:
    """Subscribe to the daemon and drive one display, failing dark.

    ``display`` is an open :class:`~armscope.firmware_bridge.displays.Display`.  With
    ``connect`` the bridge owns a ``protocol.Subscriber`` (``curve`` as for
    it); without, messages are fed with :meth:`feed` (tests, replays).
    ``start()`` blanks the display; ``run()`` loops until :meth:`stop`;
    ``close()`` blanks and releases everything.  Not thread-safe except
    :meth:`stop` and :meth:`stats` (a consistent-enough snapshot).
    ``label``: write the decision (and a cascade's subtype) beside the
    overlay in display pixels (``armscope.firmware_bridge.label``); ``armscope bridge``
    turns it on unless ``--no-label``.
    ``stamp``: draw the overlay's ``frame_id`` in the display's bottom-left corner
    (``armscope.core.stamp``), for glass-to-glass latency measurement (``--stamp``, docs/latency.md).
    """

    def __init__(
        self,
        display: Display,
        *,
        connect: str | None = None,
        registration: Registration | None = None,
        curve: dict | None = None,
        context=None,
        poll_interval: float = 0.05,
        max_stale_ms: float = 5000.0,
        clock_mode: str = "auto",
        stats_interval: float = 10.0,
        label: bool = False,
        stamp: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        if clock_mode not in CLOCK_MODES:
            raise ValueError(f"clock_mode {clock_mode!r}: expected one of {CLOCK_MODES}")
        if not 0 < poll_interval <= 1.0:
            raise ValueError(f"poll_interval must be within (0, 1] s, got {poll_interval}")
        if not max_stale_ms > 0:
            raise ValueError(f"max_stale_ms must be > 0, got {max_stale_ms}")
        self.display = display
        self.connect = connect
        self.registration = registration
        self.curve = curve
        self.context = context
        self.poll_interval = float(poll_interval)
        self.max_stale_s = float(max_stale_ms) / 1000.0
        if clock_mode == "auto":
            clock_mode = "mono" if connect is not None and same_host_endpoint(connect) else "receipt"
        self.clock_mode = clock_mode
        self.stats_interval = float(stats_interval)
        self.label = bool(label)
        self.stamp = bool(stamp)   # frame_id drawn in a corner, for glass-to-glass measurement (armscope.core.stamp)
        self.clock = clock
        self.wall_clock = wall_clock
        if registration is not None and display.size is not None and tuple(display.size) != registration.display_size:
            raise ValueError(f"registration is for a {registration.display_size[0]}x{registration.display_size[1]} "
                             f"display, but the display is {display.size[0]}x{display.size[1]}")
        self._stop = threading.Event()
        self.subscriber: protocol.Subscriber | None = None
        # what the daemon told us
        self.run_id: str | None = None
        self.state: str | None = None      # None = no status seen yet (nothing is shown)
        self.last_frame_id: int | None = None
        self.last_seq: int | None = None
        self.last_message: float | None = None
        self.stale_s = self.max_stale_s    # silence window; the newest message's stale_after_ms once one arrived
        # what the display shows: "unknown" (start-up or a failed blank), "blank" or "overlay"
        self.displayed = "unknown"
        self.current: _Overlay | None = None
        self.pending: _Overlay | None = None
        self._blank_retry_reason: str | None = None
        self._silent = False
        self._closed = False
        # counters
        self.received = collections.Counter()
        self.rejected = collections.Counter()
        self.blanks = collections.Counter()
        self.counts = collections.Counter()   # shown, accepted, superseded, expired_unshown, seq_gaps, ...
        self.link = collections.Counter()     # frames, resent_chunks, naks, timeouts, resyncs, errors
        self.last_rejections: collections.deque = collections.deque(maxlen=20)
        self.started_at = self.clock()
        self._last_stats_log = self.started_at
        self._last_shown_latency_ms: float | None = None   # clock "mono" only: capture -> on the display
        self._max_shown_latency_ms: float | None = None    # the oldest capture ever shown, when it landed

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Blank the display (whatever it held is unknown), then connect."""
        self._blank(BLANK_STARTUP, force=True)
        if (warning := slow_warp_warning()) is not None:
            log.warning("bridge: %s", warning)
        if self.connect is not None and self.subscriber is None:
            self.subscriber = protocol.Subscriber(self.connect, context=self.context, curve=self.curve)
            log.info("bridge subscribed to %s (clock check: %s)", self.connect, self.clock_mode)

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from signal handlers and other threads)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, duration: float | None = None) -> None:
        """Loop until :meth:`stop` (or ``duration`` seconds); always blanks and closes on the way out."""
        if self.connect is None:
            raise ValueError("run() needs an endpoint (connect=...); use feed() without one")
        if self.subscriber is None:
            self.start()
        end = None if duration is None else self.clock() + duration
        try:
            while not self._stop.is_set():
                if end is not None and self.clock() >= end:
                    break
                self.step()
        finally:
            self.close()

    def step(self) -> None:
        """One loop iteration: wait (bounded), drain the socket, show the newest, watchdog."""
        import zmq

        sock = self.subscriber.socket
        timeout_ms = max(0, int(math.ceil(self._poll_timeout() * 1000)))
        if sock.poll(timeout_ms, zmq.POLLIN):
            for _ in range(_DRAIN_LIMIT):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._ingest(frames, self.clock())
        self._apply()
        self.tick()

    def close(self) -> None:
        """Blank (reason ``exit``) and release the display and the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._blank(BLANK_EXIT, force=True)
        finally:
            try:
                if self.subscriber is not None:
                    self.subscriber.close()
            finally:
                self.subscriber = None
                self.display.close()
                log.info("bridge stopped: %s", json.dumps(self.stats(), default=str))

    def __enter__(self) -> "Bridge":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- input -----------------------------------------------------------------

    def feed(self, frames: list[bytes], received: float | None = None) -> bool:
        """Process one received multipart message as the loop does (validate,
        show if appropriate, watchdog). Returns True if it was accepted."""
        ok = self._ingest(frames, self.clock() if received is None else received)
        self._apply()
        self.tick()
        return ok

    def _reject(self, category: str, text: str) -> bool:
        self.rejected[category] += 1
        self.last_rejections.append(f"{category}: {text}")
        total = sum(self.rejected.values())
        if total <= 10 or total % 100 == 0:
            log.warning("bridge: rejected message #%d (%s): %s", total, category, text)
        # A stream that just produced a bad message is not trusted for what it sent before it.
        self.pending = None
        self._blank(BLANK_INVALID)
        return False

    def _ingest(self, frames: list[bytes], received: float) -> bool:
        self.received["messages"] += 1
        try:
            msg = protocol.decode(frames)
            check_message(msg)
        except Exception as exc:  # ProtocolError, and anything a malformed message might still trigger
            return self._reject(_reject_category(exc), str(exc)[:300])
        h = msg.header
        self.received[msg.topic] += 1
        self.last_message = received
        self.stale_s = min(float(h["stale_after_ms"]) / 1000.0, self.max_stale_s)
        if h["run_id"] != self.run_id:
            if self.run_id is not None:
                self.counts["run_changes"] += 1
                log.info("bridge: daemon run changed %s -> %s", self.run_id, h["run_id"])
                self.pending = None
                self._blank(BLANK_RUN)
            self.run_id, self.last_frame_id, self.last_seq, self.state = h["run_id"], None, None, None
        if self.last_seq is not None:
            gap = h["seq"] - self.last_seq - 1
            if gap > 0:
                self.counts["seq_gaps"] += gap
            elif gap < 0:
                self.counts["seq_out_of_order"] += 1
        self.last_seq = h["seq"]
        if msg.is_overlay:
            return self._ingest_overlay(msg, received)
        self.counts["accepted"] += 1
        state = h["state"]
        if state != self.state:
            log.info("bridge: daemon state %s%s", state, f" ({h.get('reason')})" if h.get("reason") else "")
        self.state = state
        if state != protocol.STATE_RUNNING:
            # Overlays published before this status are void.
            if self.pending is not None:
                self.counts["discarded_by_state"] += 1
            self.pending = None
            self._blank(f"state:{state}")
        return True

    def _ingest_overlay(self, msg: protocol.Message, received: float) -> bool:
        h = msg.header
        fid = h["frame_id"]
        if self.last_frame_id is not None and fid <= self.last_frame_id:
            return self._reject("frame_id", f"frame_id {fid} after {self.last_frame_id} in run {self.run_id}")
        self.last_frame_id = fid
        try:
            rgba = protocol.overlay_image(msg)
        except Exception as exc:
            return self._reject("payload", str(exc)[:300])
        self.counts["accepted"] += 1
        if self.pending is not None:
            self.counts["superseded"] += 1
        self.pending = _Overlay(msg, rgba, received, self._expiry(msg, received))
        return True

    def _expiry(self, msg: protocol.Message, received: float) -> float:
        """When this overlay stops being valid, on the bridge's monotonic clock (see the module docstring)."""
        h = msg.header
        stale = min(float(h["stale_after_ms"]) / 1000.0, self.max_stale_s)
        # The capture's age when the daemon published it, measured on the daemon's one clock:
        # valid on any host, whatever the clocks say.
        age_at_publish = max(0.0, float(h["publish_mono"]) - float(h["capture_mono"]))
        expiry = received + stale - age_at_publish
        if self.clock_mode == "mono":
            expiry = min(expiry, float(h["capture_mono"]) + stale)
        elif self.clock_mode == "wall":
            remaining = float(h["capture_wall"]) + stale - self.wall_clock()
            expiry = min(expiry, self.clock() + remaining)
        return expiry

    # -- output ----------------------------------------------------------------

    def _display_size(self, overlay: _Overlay) -> tuple[int, int]:
        if self.display.size is not None:
            return tuple(self.display.size)
        if self.registration is not None:
            return self.registration.display_size
        r = overlay.msg.header["region"]
        return r["frame_width"], r["frame_height"]

    def _apply(self) -> None:
        """Show the pending overlay if the daemon is running and it is still fresh."""
        ov = self.pending
        if ov is None or self.state != protocol.STATE_RUNNING:
            return
        self.pending = None
        now = self.clock()
        if now >= ov.expiry:
            self.counts["expired_unshown"] += 1
            return
        # The old overlay stays on screen until the new one's last chunk lands,
        # so delivery must finish before the old one expires.
        if self.displayed == "overlay" and self.current is not None and self.current.expiry - now < _MIN_SEND_BUDGET_S:
            self._blank(BLANK_STALE)
        limit = ov.expiry
        if self.displayed != "blank" and self.current is not None:
            limit = min(limit, self.current.expiry)
        budget = limit - now
        if budget < _MIN_SEND_BUDGET_S:
            self.counts["expired_unshown"] += 1
            return
        try:
            h = ov.msg.header
            size = self._display_size(ov)
            matrix = overlay_to_display_matrix(h["region"], (h["width"], h["height"]), self.registration, size)
            rgb, region = render_for(self.display, ov.rgba, matrix, size)
            if self.label:
                rgb, region = add_label(rgb, region, label_text(h), size, align=self.display.align)
            if self.stamp:
                rgb, region = add_stamp(rgb, region, int(h["frame_id"]), size, align=self.display.align)
            if self.display.size is None:  # e.g. png:// without a size: hand it the whole picture
                rgb, region = paste_on_black(rgb, region[0], region[1], *size), None
            report = self.display.show(rgb, region=region, deadline=budget)
        except LinkError as exc:
            self.link["errors"] += 1
            rep = getattr(exc, "report", None)
            self._add_report(rep)
            log.warning("bridge: display link failed for frame %s: %s", ov.msg.header["frame_id"], exc)
            self.displayed = "unknown"  # a partial frame may be pending on the controller
            self._blank(BLANK_LINK)
            return
        except Exception as exc:
            self.counts["display_errors"] += 1
            log.error("bridge: display error for frame %s: %r", ov.msg.header["frame_id"], exc)
            self.displayed = "unknown"
            self._blank(BLANK_DISPLAY)
            return
        self._add_report(report)
        self.current = ov
        self.displayed = "overlay"
        self.counts["shown"] += 1
        if self.clock_mode == "mono":
            self._last_shown_latency_ms = (self.clock() - float(ov.msg.header["capture_mono"])) * 1000.0
            self._max_shown_latency_ms = max(self._max_shown_latency_ms or 0.0, self._last_shown_latency_ms)

    def _add_report(self, report) -> None:
        if report is None or not hasattr(report, "resent_chunks"):
            return
        self.link["frames"] += 1
        for key in ("resent_chunks", "naks", "timeouts", "resyncs"):
            self.link[key] += int(getattr(report, key))

    def _blank(self, reason: str, force: bool = False) -> bool:
        """Blank unless already blank (``force``: always). Counts the reason.
        On failure the display state becomes unknown and :meth:`tick` retries."""
        self.current = None
        if self.displayed == "blank" and not force:
            return True
        self.blanks[reason] += 1
        log.info("bridge: blank (%s)", reason)
        return self._do_blank(reason)

    def _do_blank(self, reason: str) -> bool:
        try:
            self.display.blank()
        except Exception as exc:
            self.counts["blank_failures"] += 1
            self.displayed = "unknown"
            self._blank_retry_reason = reason
            log.error("bridge: blank (%s) failed: %r; retrying", reason, exc)
            return False
        self.displayed = "blank"
        self._blank_retry_reason = None
        return True

    # -- watchdog ------------------------------------------------------------

    def _poll_timeout(self) -> float:
        """Seconds to wait for messages: at most ``poll_interval``, never past the next expiry."""
        now = self.clock()
        t = self.poll_interval
        if self.displayed == "overlay" and self.current is not None:
            t = min(t, self.current.expiry - now)
            if self.last_message is not None:
                t = min(t, self.last_message + self.stale_s - now)
        return max(0.0, t)

    def tick(self, now: float | None = None) -> None:
        """Watchdog: blank when the daemon went silent or the shown overlay expired;
        retry a failed blank; feed the display's own watchdog (``keepalive``);
        log the counters every ``stats_interval``."""
        now = self.clock() if now is None else now
        if self.displayed == "unknown" and self._blank_retry_reason is not None:
            self.counts["blank_retries"] += 1
            self._do_blank(self._blank_retry_reason)
        silent = self.last_message is None or now - self.last_message > self.stale_s
        if silent and self.last_message is not None and not self._silent:
            self.counts["silences"] += 1
            log.warning("bridge: no message from the daemon for %.0f ms", (now - self.last_message) * 1000)
        self._silent = silent
        if self.displayed == "overlay":
            if silent:
                self._blank(BLANK_SILENT)
            elif self.current is None or now >= self.current.expiry:
                self._blank(BLANK_STALE)
        if self.pending is not None and now >= self.pending.expiry:
            self.counts["expired_unshown"] += 1
            self.pending = None
        try:
            self.display.keepalive()  # the controller's own watchdog blanks if this loop stops
        except Exception as exc:
            self.counts["keepalive_failures"] += 1
            log.warning("bridge: display keepalive failed: %r", exc)
        if self.display.quit_requested and not self.stopping:
            log.info("bridge: the display was closed by its user; stopping")
            self.stop()
        if self.stats_interval > 0 and now - self._last_stats_log >= self.stats_interval:
            self._last_stats_log = now
            log.info("bridge stats: %s", json.dumps(self.stats(), default=str))

    # -- counters --------------------------------------------------------------

    def stats(self) -> dict:
        """Counters and state, JSON-serialisable. ``blanks`` is keyed by reason.
        Safe to call from another thread (retried if a counter grows meanwhile)."""
        for _ in range(5):
            try:
                return self._stats()
            except RuntimeError:  # "dictionary changed size during iteration"
                time.sleep(0.001)
        return self._stats()

    def _stats(self) -> dict:
        now = self.clock()
        counts = dict(self.counts)
        cur = self.current
        return {
            "uptime_s": round(now - self.started_at, 3),
            "displayed": self.displayed,
            "shown_frame_id": cur.msg.header["frame_id"] if cur is not None else None,
            "shown_age_ms": round((now - cur.received) * 1000, 1) if cur is not None else None,
            "daemon": {"run_id": self.run_id, "state": self.state, "last_frame_id": self.last_frame_id,
                       "silent_ms": None if self.last_message is None else round((now - self.last_message) * 1000, 1)},
            "clock_mode": self.clock_mode,
            "received": dict(self.received),
            "accepted": counts.pop("accepted", 0),
            "shown": counts.pop("shown", 0),
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "last_rejections": list(self.last_rejections)[-5:],
            "blanks": dict(self.blanks),
            "blanks_total": sum(self.blanks.values()),
            "link": dict(self.link),
            "capture_to_shown_ms": None if self._last_shown_latency_ms is None else round(self._last_shown_latency_ms, 1),
            "capture_to_shown_max_ms": (None if self._max_shown_latency_ms is None
                                        else round(self._max_shown_latency_ms, 1)),
            **counts,
        }
