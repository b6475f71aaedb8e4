"""Helpers for tests/test_bridge_runtime_*.py: a stand-in daemon that speaks
docs/protocol.md through ``armscope.core.protocol.encode`` on a real PUB socket,
overlays made from the real H&E sample with a CAM-like heat map, the
expected display output computed independently of the bridge (paste into the
camera frame, then ``registration.warp``), and a bridge running in a thread.

Every wait is bounded."""
from __future__ import annotations

import contextlib
import secrets
import threading
import time

import cv2
import numpy as np
import zmq

from armscope.core import protocol
from armscope.core.overlay import focus_levels, heat_rgba
from armscope.firmware_bridge import pixel_formats as pf
from armscope.firmware_bridge.bridge import Bridge
from armscope.firmware_bridge.registration import Registration, warp

from repo_paths import HE_FIELD as HE_IMAGE
from repo_paths import REPO  # noqa: F401  (re-exported: test_bridge_runtime_e2e imports it from here)

CAMERA = (640, 480)                 # camera frame (w, h)
DISPLAY = (160, 120)                # eyepiece display (w, h)
BOX = (192, 112, 256)               # crop the "model" sees: x, y, size (camera px)
# Camera -> display: scale 1/4, a small rotation, a little perspective and an offset.
_a = np.deg2rad(3.0)
H_TRUE = np.array([[0.25 * np.cos(_a), -0.25 * np.sin(_a), 6.0],
                   [0.25 * np.sin(_a), 0.25 * np.cos(_a), -4.0],
                   [2e-5, -1e-5, 1.0]])


def registration() -> Registration:
    return Registration(matrix=H_TRUE, display_size=DISPLAY, rms_error=0.1, n_points=9, n_inliers=9)


_FRAME_CACHE: dict = {}


def he_camera_frame(offset: int = 0) -> np.ndarray:
    """A 640x480 BGR camera frame cut from the real H&E region (``offset`` pans it)."""
    if "full" not in _FRAME_CACHE:
        img = cv2.imread(str(HE_IMAGE), cv2.IMREAD_COLOR)
        assert img is not None, HE_IMAGE
        _FRAME_CACHE["full"] = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    full = _FRAME_CACHE["full"]
    y0, x0 = 40 + offset, 30 + offset
    frame = full[y0:y0 + CAMERA[1], x0:x0 + CAMERA[0]]
    assert frame.shape == (CAMERA[1], CAMERA[0], 3)
    return np.ascontiguousarray(frame)


def cam_of(offset: int = 0, box=BOX) -> np.ndarray:
    """A CAM-like (16, 16) map of the crop: haematoxylin density (darkness) at a
    CAM's resolution, above its median, scaled to 0..1."""
    x, y, s = box
    crop = he_camera_frame(offset)[y:y + s, x:x + s]
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY).astype(np.float32)
    cam = cv2.resize(255.0 - grey, (16, 16), interpolation=cv2.INTER_AREA)
    cam = np.maximum(cam - np.median(cam), 0)
    return (cam / max(float(cam.max()), 1e-6)).astype(np.float32)


def cam_overlay(offset: int = 0, size: int = 256, box=BOX) -> np.ndarray:
    """The daemon's RGBA bitmap of ``cam_of(offset)`` (``heat_rgba``: JET, alpha
    rising with the CAM, the focused region outlined): the v1 form of the overlay."""
    return heat_rgba(cam_of(offset, box), size)


def expected_display(rgba: np.ndarray, fmt, box=BOX, brightness=1.0, gamma=1.0, dither=False) -> np.ndarray:
    """What the display should emit, computed *without* the bridge's geometry:
    paste the overlay into a transparent camera-sized canvas at its crop (scale
    1 only), warp that with ``registration.warp``, composite, pack, unpack."""
    x, y, s = box
    if rgba.ndim == 2:  # a CAM: the v1 path, its bitmap at the crop's size, then the registration
        rgba = heat_rgba(rgba, s)
    assert rgba.shape[:2] == (s, s), "expected_display supports unscaled overlays only"
    canvas = np.zeros((CAMERA[1], CAMERA[0], 4), np.uint8)
    canvas[y:y + s, x:x + s] = rgba
    warped = warp(canvas, registration(), premultiplied_out=True)
    rgb = cv2.cvtColor(warped, cv2.COLOR_RGBA2RGB)
    data = pf.encode(rgb, fmt, brightness=brightness, gamma=gamma, dither=dither)
    return pf.decode(data, fmt, DISPLAY[0], DISPLAY[1])


def outline_pixels(image: np.ndarray, level: int = 90) -> np.ndarray:
    """The focus outline's pixels: white (all channels lit), which the
    premultiplied JET heat never is (one of its channels is always low)."""
    return (image.min(2) if image.ndim == 3 else image) > level


def assert_close_image(got: np.ndarray, want: np.ndarray, *, max_mean: float = 0.3, max_bad_frac: float = 0.002,
                       bad_level: int = 9) -> None:
    """Equal up to rounding, outline apart: the bridge composes the
    homographies in one matrix, the expected path applies them in two steps,
    so a few pixels may round to the neighbouring quantisation level (8 for
    RGB565's 5-bit channels). The bridge draws the focus outline in display
    pixels (protocol v2) where the expected path warps the bitmap's, so the
    outline is compared by position: the pixels within 1 px of either
    outline are left out of the pixel comparison, and each outline must lie
    within 1 px of the other (90 % of its pixels)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    kernel = np.ones((3, 3), np.uint8)
    if got.ndim == 3:
        line_got, line_want = outline_pixels(got), outline_pixels(want)
        near_got = cv2.dilate(line_got.astype(np.uint8), kernel).astype(bool)
        near_want = cv2.dilate(line_want.astype(np.uint8), kernel).astype(bool)
        assert line_got.any() == line_want.any(), "an outline on one side only"
        if line_want.any():
            # the warped bitmap's outline is thin and faint when the display shrinks the crop (it is drawn
            # 2 px wide at the crop's size): where it is lit, the bridge's is within 1 px; the bridge's
            # (at least 1 display px wide, all lit) lies within 2 px of it
            within2 = cv2.dilate(line_want.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            assert (near_got[line_want]).mean() >= 0.9 and (within2[line_got]).mean() >= 0.8, \
                ((near_got[line_want]).mean(), (within2[line_got]).mean())
        keep = ~(near_got | near_want)
    else:
        keep = np.ones(got.shape, bool)
    assert keep.mean() > 0.85, "the outline covers too much of the image to compare the heat"
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))[keep]
    bad = float((diff > bad_level).mean())
    assert diff.mean() <= max_mean and bad <= max_bad_frac, (float(diff.mean()), bad, int(diff.max()))
    assert want.max() > 100, "expected image is (nearly) black: the test would prove nothing"


def close_image(got: np.ndarray, want: np.ndarray, **kw) -> bool:
    """``assert_close_image`` as a predicate (for waits)."""
    try:
        assert_close_image(got, want, **kw)
    except AssertionError:
        return False
    return True


def read_rgb(path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class FakeDaemon:
    """Publishes like the edge daemon: real PUB socket on 127.0.0.1 (random
    port), headers with every documented key, frames from ``protocol.encode``."""

    def __init__(self, stale_after_ms: int = 600, curve_secret: str | None = None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, 8)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_secret:
            public, secret = protocol.load_keypair(curve_secret)
            self.sock.curve_server = True
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.stale_after_ms = stale_after_ms
        self.run_id = secrets.token_hex(8)
        self.seq = 0
        self.frame_id = 0
        self.closed = False

    def common(self, topic: str, encoding: str) -> dict:
        self.seq += 1
        mono, wall = protocol.now_pair()
        return {"run_id": self.run_id, "seq": self.seq, "publish_mono": mono, "publish_wall": wall,
                "model_id": "test@0123456789ab", "slide_id": None, "stale_after_ms": self.stale_after_ms,
                "encoding": encoding}

    def status_frames(self, state: str = "running", heartbeat: bool = True, reason=None) -> list[bytes]:
        header = dict(self.common("status", protocol.ENCODING_NONE), state=state, reason=reason,
                      heartbeat=heartbeat, frame_id=self.frame_id or None, detail={"fps": 5.0})
        return protocol.encode(protocol.TOPIC_STATUS, header, b"")

    def overlay_frames(self, cam: np.ndarray, box=BOX, frame_id: int | None = None, capture_age_s: float = 0.05,
                       dtype: str = "float16", outline: bool = True, **override) -> list[bytes]:
        """A v2 ``overlay`` of ``cam`` ((h, w), or (C, h, w) showing map 0) over the crop ``box``;
        ``outline=False``: the threshold at the peak, so nothing is outlined."""
        self.frame_id = self.frame_id + 1 if frame_id is None else frame_id
        maps = cam[None] if cam.ndim == 2 else cam
        payload, scale = protocol.cam_payload(maps, dtype)
        peak, threshold = focus_levels(maps[0])
        threshold = threshold if outline else peak
        x, y, s = box
        header = self.common("overlay", protocol.ENCODING_RAW)
        header.update({
            "frame_id": self.frame_id, "capture_mono": header["publish_mono"] - capture_age_s,
            "capture_wall": header["publish_wall"] - capture_age_s, "classes": ["other", "tumour"],
            "probs": [0.3, 0.7], "decision": {"label": "tumour", "index": 1, "score": 0.7, "positive": True,
                                              "threshold": 0.5},
            "region": {"frame_width": CAMERA[0], "frame_height": CAMERA[1], "x": x, "y": y, "size": s},
            "cam": {"dtype": dtype, "classes": maps.shape[0], "height": maps.shape[1], "width": maps.shape[2],
                    "index": 0, "scale": scale, "peak": peak, "threshold": threshold,
                    "box": {"x": x, "y": y, "size": s}, "max_alpha": 0.6},
            "focus_bbox": None, "measures": {"tissue_fraction": 0.8, "focus": 2000.0},
            "latency_ms": {"total": 50.0},
        })
        header.update(override)
        return protocol.encode(protocol.TOPIC_OVERLAY, header, payload)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def status(self, state: str = "running", **kw) -> None:
        self.send(self.status_frames(state, **kw))

    def overlay(self, rgba: np.ndarray, **kw) -> None:
        self.send(self.overlay_frames(rgba, **kw))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close(0)
            self.ctx.term()


def wait_for(pred, timeout: float, interval: float = 0.01, action=None) -> bool:
    """Poll ``pred`` until true or ``timeout``; ``action`` runs between polls (e.g. publish)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if action is not None:
            action()
        time.sleep(interval)
    return bool(pred())


@contextlib.contextmanager
def running_bridge(bridge: Bridge):
    """Run ``bridge`` in a thread; stop and join it (bounded) on exit."""
    errors: list[BaseException] = []

    def target():
        try:
            bridge.run()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    bridge.start()
    thread = threading.Thread(target=target, name="bridge", daemon=True)
    thread.start()
    try:
        yield bridge
    finally:
        bridge.stop()
        thread.join(10.0)
        assert not thread.is_alive(), "bridge thread did not stop"
        if errors:
            raise errors[0]


def publish_until(daemon: FakeDaemon, pred, rgba, timeout: float = 8.0, period: float = 0.05,
                  state: str = "running") -> bool:
    """Publish a status and an overlay every ``period`` s until ``pred()`` (covers ZMQ's slow joiner)."""
    last = [0.0]

    def action():
        if time.monotonic() - last[0] >= period:
            last[0] = time.monotonic()
            daemon.overlay(rgba)
            daemon.status(state)

    return wait_for(pred, timeout, action=action)
