"""Time the bridge's work per overlay on this machine: ``armscope bridge bench``.

Why: an integrator choosing a board and a microdisplay needs to know what the
eyepiece side costs there, per overlay, for their display's size and pixel
format, without the model, the daemon or the repository (the sample Grad-CAM
ships in the package). The path timed is the bridge's own (``bridge_path``:
``render_for``, ``SerialDisplay.prepare``, ``encode_frame_chunks``), on a
serial display whose controller is the in-process pty simulator; the pytest
suite ``benchmarks/bench_bridge.py`` times the same function.

Overlays:

* ``daemon``: the daemon's heat overlay (``armscope.core.overlay.heat_rgba`` of the
  demo ensemble's real CAM on CMU-1 frame 1, ``data/sample_cam.npy``) of the
  ``--crop`` square of a ``--camera`` frame, mapped to the display by the
  registration (or, without one, the uncalibrated whole-frame fit).
* ``fullscreen``: the same heat overlay at the display's size covering all of
  it (registered with a 1 degree rotation): the worst case, every pixel sent.

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

from . import link as L
from .bridge import overlay_to_display_matrix, render_for
from .displays import Display
from .registration import Registration

SAMPLE_CAM = Path(__file__).resolve().parent / "data" / "sample_cam.npy"
STAGES = ("render", "pack", "frame")


def sample_overlay(size: int) -> np.ndarray:
    """(size, size, 4) RGBA: the daemon's heat overlay of the bundled real CAM."""
    from armscope.core.overlay import heat_rgba  # numpy/OpenCV only, like the rest of the runtime

    return heat_rgba(np.load(SAMPLE_CAM), size)


def bridge_path(rgba: np.ndarray, matrix: np.ndarray, display: Display, *, seq0: int = 0,
                max_payload: int = 4096, clock=None) -> tuple[L.EncodedFrame, list[float]]:
    """Warp + convert + frame encode of one overlay, as the bridge does it for
    ``display``; with ``clock``, also the seconds each of ``STAGES`` took."""
    t = [clock()] if clock else []
    image, region = render_for(display, rgba, matrix, tuple(display.size))
    if clock:
        t.append(clock())
    data, send = display.prepare(image, region)
    if clock:
        t.append(clock())
    enc = L.encode_frame_chunks(data, seq0=seq0, frame_id=seq0 + 1, region=send, fmt=display.fmt,
                                max_payload=max_payload)
    if clock:
        t.append(clock())
    return enc, [b - a for a, b in zip(t, t[1:])]


def overlay_and_matrix(kind: str, display_size: tuple[int, int], registration: Registration | None,
                       camera: tuple[int, int], crop: int) -> tuple[np.ndarray, np.ndarray]:
    """The overlay ``kind`` (``daemon`` or ``fullscreen``) and its overlay -> display homography."""
    w, h = display_size
    if kind == "fullscreen":
        a = np.deg2rad(1.0)
        rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        centre = np.array([[1.0, 0.0, w / 2], [0.0, 1.0, h / 2], [0.0, 0.0, 1.0]])
        back = np.array([[1.0, 0.0, -w / 2], [0.0, 1.0, -h / 2], [0.0, 0.0, 1.0]])
        rgba = sample_overlay(max(w, h))[:h, :w].copy()
        return rgba, centre @ rot @ back
    if kind != "daemon":
        raise ValueError(f"overlay must be 'daemon' or 'fullscreen', got {kind!r}")
    cw, ch = camera
    if not 0 < crop <= min(cw, ch):
        raise ValueError(f"crop {crop} must fit the {cw}x{ch} camera frame")
    region = {"x": (cw - crop) // 2, "y": (ch - crop) // 2, "size": crop, "frame_width": cw, "frame_height": ch}
    return sample_overlay(crop), overlay_to_display_matrix(region, (crop, crop), registration, display_size)


@dataclasses.dataclass
class BenchResult:
    overlay: str
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
    display: dict
    frames: int
    region: list[int]
    stages_ms: dict  # "render", "show", "total" -> {"median", "p95", "min"}
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
            camera: tuple[int, int], crop: int, deadline: float = 60.0) -> DeliveryResult:
    """Show ``frames`` overlays (after ``warmup``) on ``display`` as the bridge
    does, timing the render and the delivery; sums the link's resends."""
    if frames < 1 or warmup < 0:
        raise ValueError(f"frames must be >= 1 and warmup >= 0, got {frames} and {warmup}")
    if display.size is None:
        raise ValueError("the display needs a fixed size (give width and height in its URI)")
    rgba, matrix = overlay_and_matrix(kind, tuple(display.size), registration, camera, crop)
    times, result = [], None
    for i in range(warmup + frames):
        t0 = time.perf_counter()
        image, region = render_for(display, rgba, matrix, tuple(display.size))
        t1 = time.perf_counter()
        report = display.show(image, region=region, deadline=deadline)
        t2 = time.perf_counter()
        if result is None:
            fmt = getattr(display, "fmt", None)
            result = DeliveryResult(overlay=kind, frames=frames, region=list(region), stages_ms={},
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
    return result


def run(display: Display, kind: str, *, frames: int, warmup: int, registration: Registration | None,
        camera: tuple[int, int], crop: int, max_payload: int = 4096) -> BenchResult:
    """Time ``frames`` overlays (after ``warmup``) through ``bridge_path``."""
    if frames < 1 or warmup < 0:
        raise ValueError(f"frames must be >= 1 and warmup >= 0, got {frames} and {warmup}")
    rgba, matrix = overlay_and_matrix(kind, tuple(display.size), registration, camera, crop)
    times = []
    for i in range(warmup + frames):
        enc, stage = bridge_path(rgba, matrix, display, seq0=i, max_payload=max_payload, clock=time.perf_counter)
        if i >= warmup:
            times.append(stage)
    t = np.array(times) * 1000.0
    stats = _stats(np.column_stack([t, t.sum(axis=1)]), STAGES + ("total",))
    x, y, w, h = L.parse_frame_body(L.unpack_message(L.cobs_decode(enc.chunk(0)[:-1])).body)[0][2:6]
    return BenchResult(overlay=kind, display={"width": display.size[0], "height": display.size[1],
                                              "format": display.fmt.slug},
                       frames=frames, region=[x, y, w, h], payload_bytes=enc.payload_bytes,
                       wire_bytes=int(enc.wire.size), stages_ms=stats)
