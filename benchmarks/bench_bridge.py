"""Bridge hot path: warp + convert + frame encode of a 1280x720 overlay.

Run:  python -m pytest benchmarks/bench_bridge.py --benchmark-only
(add ``--benchmark-disable`` to run the assertions only).  The target is a
median <= 5 ms per overlay so the bridge keeps up with the daemon at video
rates on an edge CPU; link efficiency must be >= 95 % on full frames.
"""

import cv2
import numpy as np
import pytest

from firmware_bridge import link as L
from firmware_bridge import pixel_formats as pf
from firmware_bridge.registration import Registration, warp

W, H = 1280, 720
MATRIX = np.array([[0.97, 0.012, 14.0], [-0.01, 0.975, 9.0], [1.5e-6, -1.0e-6, 1.0]])


@pytest.fixture(scope="module")
def overlay():
    """Grad-CAM-like RGBA: JET heat blobs, alpha from heat, transparent elsewhere."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    heat = np.zeros((H, W), np.float32)
    for _ in range(6):
        cx, cy, s = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(40, 160)
        heat += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    heat = np.clip(heat, 0, 1)
    rgb = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    alpha = np.where(heat > 0.2, heat * 200, 0).astype(np.uint8)
    return np.dstack([rgb, alpha]).copy()


@pytest.fixture(scope="module")
def registration():
    return Registration(MATRIX, (W, H), 0.0)


def pipeline(rgba, reg, fmt, **kw):
    shown = warp(rgba, reg, premultiplied_out=True)
    data = pf.encode(shown, fmt, premultiplied=True, **kw)
    return L.encode_frame_chunks(data, seq0=0, frame_id=1, region=(0, 0, W, H), fmt=fmt, max_payload=4096)


@pytest.mark.parametrize("fmt,kw", [("rgb565le", {}), ("mono1", {}), ("mono1", {"dither": True})],
                         ids=["rgb565le", "mono1", "mono1-dither"])
def test_pipeline(benchmark, overlay, registration, fmt, kw):
    enc = benchmark(pipeline, overlay, registration, fmt, **kw)
    assert enc.payload_bytes == pf.PixelFormat.parse(fmt).frame_bytes(W, H)


@pytest.mark.parametrize("stage", ["warp", "encode565", "encode_mono1", "frame565", "frame_mono1"])
def test_stage(benchmark, overlay, registration, stage):
    shown = warp(overlay, registration, premultiplied_out=True)
    d565 = pf.encode(shown, "rgb565le", premultiplied=True)
    dmono = pf.encode(shown, "mono1", premultiplied=True)
    fn = {
        "warp": lambda: warp(overlay, registration, premultiplied_out=True),
        "encode565": lambda: pf.encode(shown, "rgb565le", premultiplied=True),
        "encode_mono1": lambda: pf.encode(shown, "mono1", premultiplied=True),
        "frame565": lambda: L.encode_frame_chunks(d565, seq0=0, frame_id=1, region=(0, 0, W, H),
                                                  fmt="rgb565le", max_payload=4096),
        "frame_mono1": lambda: L.encode_frame_chunks(dmono, seq0=0, frame_id=1, region=(0, 0, W, H),
                                                     fmt="mono1", max_payload=4096),
    }[stage]
    benchmark(fn)


@pytest.mark.parametrize("fmt", ["rgb565le", "rgb888", "mono1"])
def test_link_efficiency_full_frame(overlay, registration, fmt):
    """Payload bytes / bytes on the wire (host -> controller) for one full frame."""
    enc = pipeline(overlay, registration, fmt)
    efficiency = enc.payload_bytes / enc.wire.size
    print(f"{fmt}: {enc.n_chunks} chunks, {enc.payload_bytes} payload bytes, "
          f"{enc.wire.size} wire bytes, efficiency {efficiency:.4f}")
    assert efficiency >= 0.95
