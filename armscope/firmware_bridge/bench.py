"""Time the bridge's work per overlay on this machine: ``armscope bridge bench``.

Why: an integrator choosing a board and a microdisplay needs to know what the
eyepiece side costs there, per overlay, for their display's size and pixel
format, without the model, the daemon or the repository (the sample Grad-CAM
ships in the package). The path timed is the bridge's own (``bridge_path``:
``protocol.decode`` with its schema checks, the render, ``SerialDisplay.prepare``,
``encode_frame_chunks``), from the message as it arrives off the socket, on a
serial display whose controller is the in-process pty simulator; the pytest
suite ``benchmarks/bench_bridge.py`` times the same function.

Two protocol forms of the same overlay (docs/protocol.md 1.2, 1.3):

* ``v2``: the ``overlay`` topic, the CAM as data (a few KB), drawn in display
  pixels (``render.render_cam_for``): what the bridge runs.
* ``v1``: the opt-in ``rendered`` topic, the daemon's RGBA bitmap (4 MiB for
  a 1024 crop), warped into the display (``render.render_for``): what the
  bridge did before protocol v2, kept for comparison.

Overlays:

* ``daemon``: the demo ensemble's real CAM on CMU-1 frame 1
  (``data/sample_cam.npy``) over the ``--crop`` square of a ``--camera``
  frame, mapped to the display by the registration (or, without one, the
  uncalibrated whole-frame fit).
* ``fullscreen``: the same CAM over a square as wide as the display covering
  all of it (registered with a 1 degree rotation): the worst case, every
  pixel sent.

With a real output (``deliver``; ``armscope bridge bench --display URI``) the
overlays are shown on it instead, timing ``display.show``: for ``serial://``
the whole delivery to the controller (link speed, ACKs, resends), which is
what an integrator's cable and controller firmware decide.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from armscope.core import protocol

from . import link as L
from .bridge import overlay_to_display_matrix, render_cam_for, render_for
from .displays import Display
from .registration import Registration
from .validation import check_message

SAMPLE_CAM = Path(__file__).resolve().parent / "data" / "sample_cam.npy"
STAGES = ("decode", "render", "pack", "frame")
PROTOCOLS = ("v2", "v1")   # v2: the overlay topic (CAM as data); v1: the opt-in rendered topic (bitmap)
KINDS = ("daemon", "fullscreen")


def sample_overlay(size: int) -> np.ndarray:
    """(size, size, 4) RGBA: the daemon's heat overlay of the bundled real CAM."""
    from armscope.core.overlay import heat_rgba  # numpy/OpenCV only, like the rest of the runtime

    return heat_rgba(np.load(SAMPLE_CAM), size)


def _geometry(kind: str, display_size: tuple[int, int], registration: Registration | None,
              camera: tuple[int, int], crop: int) -> tuple[dict, Registration | None]:
    """(region, registration) of the overlay ``kind``: the camera square it covers and the map to the display."""
    w, h = display_size
    if kind == "fullscreen":
        side = max(w, h)
        a = np.deg2rad(1.0)
        rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        centre = np.array([[1.0, 0.0, w / 2], [0.0, 1.0, h / 2], [0.0, 0.0, 1.0]])
        back = np.array([[1.0, 0.0, -w / 2], [0.0, 1.0, -h / 2], [0.0, 0.0, 1.0]])
        region = {"x": 0, "y": 0, "size": side, "frame_width": side, "frame_height": side}
        return region, Registration(centre @ rot @ back, (w, h), 0.0)
    if kind != "daemon":
        raise ValueError(f"overlay must be 'daemon' or 'fullscreen', got {kind!r}")
    cw, ch = camera
    if not 0 < crop <= min(cw, ch):
        raise ValueError(f"crop {crop} must fit the {cw}x{ch} camera frame")
    region = {"x": (cw - crop) // 2, "y": (ch - crop) // 2, "size": crop, "frame_width": cw, "frame_height": ch}
    return region, registration


def overlay_and_matrix(kind: str, display_size: tuple[int, int], registration: Registration | None,
                       camera: tuple[int, int], crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The v1 overlay ``kind`` (``daemon`` or ``fullscreen``) as a bitmap and its overlay -> display homography."""
    region, registration = _geometry(kind, display_size, registration, camera, crop)
    if kind == "fullscreen":   # the bitmap cut to the display, as the display-sized overlay it stands for
        w, h = display_size
        return sample_overlay(region["size"])[:h, :w].copy(), registration.matrix
    size = region["size"]
    return sample_overlay(size), overlay_to_display_matrix(region, (size, size), registration, display_size)


def _header(region: dict, frame_id: int) -> dict:
    """The keys the daemon's publisher and overlay builder fill, for the sample CAM."""
    now_mono, now_wall = time.monotonic(), time.time()
    return {"run_id": "bench", "seq": frame_id, "model_id": "sample@000000000000", "slide_id": None,
            "stale_after_ms": 600000, "publish_mono": now_mono, "publish_wall": now_wall,
            "frame_id": frame_id, "capture_mono": now_mono, "capture_wall": now_wall,
            "classes": ["non-tumour", "tumour"], "probs": [0.29, 0.71],
            "decision": {"label": "tumour", "index": 1, "score": 0.71, "positive": True, "threshold": 0.3},
            "region": dict(region), "subtype": None, "measures": {}}


def sample_messages(kind: str, display_size: tuple[int, int], registration: Registration | None,
                    camera: tuple[int, int], crop: int, *, cam_dtype: str = "float16"
                    ) -> tuple[dict[str, list[bytes]], Registration | None]:
    """``({"v2": frames, "v1": frames}, registration)``: the overlay ``kind`` as
    the daemon publishes it on each topic (``protocol.encode``, as sent), and
    the registration the bridge maps it with."""
    from armscope.core.overlay import focus_levels

    region, registration = _geometry(kind, display_size, registration, camera, crop)
    cam = np.load(SAMPLE_CAM)
    peak, threshold = focus_levels(cam)
    payload, scale = protocol.cam_payload(cam[None], cam_dtype)
    v2 = _header(region, 1) | {
        "encoding": protocol.ENCODING_RAW,
        "cam": {"dtype": cam_dtype, "classes": 1, "height": cam.shape[0], "width": cam.shape[1], "index": 0,
                "scale": scale, "peak": peak, "threshold": threshold, "max_alpha": 0.6,
                "box": {"x": region["x"], "y": region["y"], "size": region["size"]}}}
    size = region["size"]
    v1 = _header(region, 1) | {"width": size, "height": size, "format": protocol.FORMAT_RGBA8,
                               "encoding": protocol.ENCODING_RAW}
    return ({"v2": protocol.encode(protocol.TOPIC_OVERLAY, v2, payload),
             "v1": protocol.encode(protocol.TOPIC_RENDERED, v1, sample_overlay(size).tobytes())}, registration)


def decode_and_render(frames: list[bytes], display: Display, registration: Registration | None,
                      clock=None) -> tuple[tuple[np.ndarray, tuple], list[float]]:
    """A received message to the display's pixels, as the bridge does it:
    decode and validate, then draw (v2, ``overlay``) or warp (v1, ``rendered``);
    with ``clock``, also the seconds the two took."""
    t0 = clock() if clock else 0.0
    msg = protocol.decode(frames)
    if msg.is_overlay:
        maps = check_message(msg)
        t1 = clock() if clock else 0.0
        out = render_cam_for(display, msg.header, maps, registration, tuple(display.size))
    else:
        rgba = protocol.overlay_image(msg)
        t1 = clock() if clock else 0.0
        matrix = overlay_to_display_matrix(msg.header["region"], (rgba.shape[1], rgba.shape[0]), registration,
                                           tuple(display.size))
        out = render_for(display, rgba, matrix, tuple(display.size))
    return out, ([t1 - t0, clock() - t1] if clock else [])


def bridge_path(frames: list[bytes], display: Display, registration: Registration | None = None, *,
                seq0: int = 0, max_payload: int = 4096, clock=None,
                encode: bool = True) -> tuple[L.EncodedFrame | None, list[float]]:
    """Decode + render + convert + frame encode of one received overlay
    message, as the bridge does it for ``display``; with ``clock``, also the
    seconds each of ``STAGES`` took. ``encode=False``: the first three only
    (no EncodedFrame), where the link's codec (the ``[serial]`` extra) is absent."""
    (image, region), times = decode_and_render(frames, display, registration, clock)
    t = [clock()] if clock else []
    data, send = display.prepare(image, region)
    if clock:
        t.append(clock())
    enc = None
    if encode:
        enc = L.encode_frame_chunks(data, seq0=seq0, frame_id=seq0 + 1, region=send, fmt=display.fmt,
                                    max_payload=max_payload)
        if clock:
            t.append(clock())
    return enc, times + [b - a for a, b in zip(t, t[1:])]


@dataclasses.dataclass
class BenchResult:
    overlay: str
    protocol: str   # "v2" (overlay topic, CAM as data) or "v1" (rendered topic, bitmap)
    message_bytes: int   # the message on the ZeroMQ wire: header + payload
    display: dict
    frames: int
    region: list[int]
    payload_bytes: int
    wire_bytes: int
    stages_ms: dict  # stage -> {"median", "p95", "min"}

    @property
    def link_efficiency(self) -> float:
        return self.payload_bytes / self.wire_bytes

    def wire_seconds(self, baud: int) -> float:
        """Time on a UART at ``baud`` (8N1: 10 bits a byte) for one such overlay."""
        return self.wire_bytes * 10 / baud

    def as_dict(self, baud: int) -> dict:
        out = dataclasses.asdict(self)
        out.update(link_efficiency=round(self.link_efficiency, 4), baud=baud,
                   wire_seconds_at_baud=round(self.wire_seconds(baud), 3))
        return out


@dataclasses.dataclass
class DeliveryResult:
    """Overlays shown on a real output: render, then ``display.show`` (for
    ``serial://``: encode, send, and wait for the controller's ACKs)."""

    overlay: str
    protocol: str
    display: dict
    frames: int
    region: list[int]
    stages_ms: dict  # "render" (decode included), "show", "total" -> {"median", "p95", "min"}
    payload_bytes: int = 0   # per overlay, serial only
    wire_bytes: int = 0      # all overlays, resends included, serial only
    resent_chunks: int = 0
    naks: int = 0
    timeouts: int = 0

    @property
    def payload_mb_per_s(self) -> float:
        """Pixel bytes delivered per second of ``show`` (median)."""
        return self.payload_bytes / 1e6 / (self.stages_ms["show"]["median"] / 1000.0)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["payload_mb_per_s"] = round(self.payload_mb_per_s, 3) if self.payload_bytes else None
        return out


def _stats(columns: np.ndarray, names) -> dict:
    return {name: {"median": round(float(np.median(col)), 3), "p95": round(float(np.percentile(col, 95)), 3),
                   "min": round(float(col.min()), 3)} for name, col in zip(names, columns.T)}


def deliver(display: Display, kind: str, *, frames: int, warmup: int, registration: Registration | None,
            camera: tuple[int, int], crop: int, deadline: float = 60.0,
            protocols: tuple[str, ...] = PROTOCOLS) -> list[DeliveryResult]:
    """Show ``frames`` overlays (after ``warmup``) on ``display`` as the bridge
    does, per protocol form, timing the decode and render and the delivery;
    sums the link's resends."""
    if frames < 1 or warmup < 0:
        raise ValueError(f"frames must be >= 1 and warmup >= 0, got {frames} and {warmup}")
    if display.size is None:
        raise ValueError("the display needs a fixed size (give width and height in its URI)")
    messages, registration = sample_messages(kind, tuple(display.size), registration, camera, crop)
    results = []
    for form in protocols:
        times, result = [], None
        for i in range(warmup + frames):
            t0 = time.perf_counter()
            (image, region), _ = decode_and_render(messages[form], display, registration)
            t1 = time.perf_counter()
            report = display.show(image, region=region, deadline=deadline)
            t2 = time.perf_counter()
            if result is None:
                fmt = getattr(display, "fmt", None)
                result = DeliveryResult(overlay=kind, protocol=form, frames=frames, region=list(region), stages_ms={},
                                        display={"width": display.size[0], "height": display.size[1],
                                                 "format": fmt.slug if fmt is not None else "rgb"})
            if i < warmup:
                continue
            times.append((t1 - t0, t2 - t1))
            if isinstance(report, L.SendReport):
                result.payload_bytes = report.payload_bytes
                result.wire_bytes += report.wire_bytes
                result.resent_chunks += report.resent_chunks
                result.naks += report.naks
                result.timeouts += report.timeouts
        t = np.array(times) * 1000.0
        result.stages_ms = _stats(np.column_stack([t, t.sum(axis=1)]), ("render", "show", "total"))
        results.append(result)
    return results


def run(display: Display, kind: str, *, frames: int, warmup: int, registration: Registration | None,
        camera: tuple[int, int], crop: int, max_payload: int = 4096,
        protocols: tuple[str, ...] = PROTOCOLS) -> list[BenchResult]:
    """Time ``frames`` overlays (after ``warmup``) through ``bridge_path``, one
    result per protocol form, the forms interleaved overlay by overlay (so a
    busy machine slows both alike)."""
    if frames < 1 or warmup < 0:
        raise ValueError(f"frames must be >= 1 and warmup >= 0, got {frames} and {warmup}")
    messages, registration = sample_messages(kind, tuple(display.size), registration, camera, crop)
    times: dict[str, list] = {form: [] for form in protocols}
    encoded: dict[str, L.EncodedFrame] = {}
    for i in range(warmup + frames):
        for form in protocols:
            enc, stage = bridge_path(messages[form], display, registration, seq0=i, max_payload=max_payload,
                                     clock=time.perf_counter)
            encoded[form] = enc
            if i >= warmup:
                times[form].append(stage)
    results = []
    for form in protocols:
        t = np.array(times[form]) * 1000.0
        enc = encoded[form]
        x, y, w, h = L.parse_frame_body(L.unpack_message(L.cobs_decode(enc.chunk(0)[:-1])).body)[0][2:6]
        results.append(BenchResult(
            overlay=kind, protocol=form, message_bytes=sum(len(f) for f in messages[form][1:]),
            display={"width": display.size[0], "height": display.size[1], "format": display.fmt.slug},
            frames=frames, region=[x, y, w, h], payload_bytes=enc.payload_bytes, wire_bytes=int(enc.wire.size),
            stages_ms=_stats(np.column_stack([t, t.sum(axis=1)]), STAGES + ("total",))))
    return results
