"""Bridge hot path: warp + convert + frame encode into a 1280x720 display.

Run:  python -m pytest benchmarks/bench_bridge.py --benchmark-only
(add ``--benchmark-disable`` to run the assertions only).  The target is a
median <= 5 ms per overlay so the bridge keeps up with the daemon at video
rates on an edge CPU; link efficiency must be >= 95 % on full frames.

Two overlays, both through the bridge's own code (``render_for``,
``SerialDisplay.prepare`` on a simulated controller, ``encode_frame_chunks``):

* ``daemon``: what the daemon publishes, a 1024x1024 Grad-CAM heat overlay
  (``edge.overlay.heat_rgba``) of the demo ensemble's CAM on a real CMU-1
  frame, its centre crop registered into the display (scale 0.6, a slight
  rotation and perspective): the crop square covers ~40 % of the display, and
  the bridge warps and sends only that (a partial update).
* ``fullscreen``: a display-sized 1280x720 overlay covering the whole display
  (worst case: the whole 1.8 MB RGB565 frame is warped and sent).
"""

from pathlib import Path

import cv2
import numpy as np
import pytest

from firmware_bridge import link as L
from firmware_bridge import pixel_formats as pf
from firmware_bridge.bridge import overlay_to_display_matrix, render_for
from firmware_bridge.registration import Registration, warp

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
W, H = 1280, 720
MATRIX = np.array([[0.97, 0.012, 14.0], [-0.01, 0.975, 9.0], [1.5e-6, -1.0e-6, 1.0]])
# Camera (1600x1200) -> display: scale 0.6, 1 degree rotation, a little perspective, centred.
_A = np.deg2rad(1.0)
CAMERA_TO_DISPLAY = np.array([[0.6 * np.cos(_A), -0.6 * np.sin(_A), 170.0],
                              [0.6 * np.sin(_A), 0.6 * np.cos(_A), 2.0],
                              [1e-6, -2e-6, 1.0]])


@pytest.fixture(scope="module")
def overlay():
    """Display-sized Grad-CAM-like RGBA: JET heat blobs, alpha from heat, transparent elsewhere."""
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
def daemon_overlay():
    """(rgba, matrix): the demo ensemble's real CAM on a real frame, as the daemon renders it."""
    from armscope.bundle import load_bundle
    from armscope.preprocess import crop_box, preprocess_frame
    from edge.backends.onnxruntime_backend import OnnxRuntimeBackend
    from edge.overlay import heat_rgba

    bundle = load_bundle(SAMPLES / "demo_bundle")
    frame = cv2.imread(str(SAMPLES / "frames" / "cmu1_frame_1.jpg"), cv2.IMREAD_COLOR)
    spec = bundle.preprocessing
    with OnnxRuntimeBackend(bundle, "members") as backend:
        out = backend.infer(preprocess_frame(frame, spec)[None])
    probs, cam = out["probs"][0], out["cam"][0]
    cam = cam[..., int(np.argmax(probs))] if cam.ndim == 3 else cam
    top, left, size = crop_box(frame.shape, spec)
    rgba = heat_rgba(cam, size)
    region = {"x": left, "y": top, "size": size, "frame_width": frame.shape[1], "frame_height": frame.shape[0]}
    reg = Registration(CAMERA_TO_DISPLAY, (W, H), 0.0)
    return rgba, overlay_to_display_matrix(region, (size, size), reg, (W, H))


@pytest.fixture(scope="module", params=["rgb565le", "mono1", "mono1-dither"])
def display(request):
    """A SerialDisplay on the pty controller simulator, blanked (nothing lit).
    ``mono1-dither``: ordered dithering, what 1-bit displays use for heat maps."""
    pytest.importorskip("serial")
    from firmware_bridge.displays import open_display
    from firmware_bridge.simulator import ControllerCore, PtyController

    fmt, _, dither = request.param.partition("-")
    with PtyController(ControllerCore(W, H, fmt, max_payload=4096)) as sim:
        d = open_display(f"serial://{sim.slave_path}?baud=921600&deadline=5&dither={int(bool(dither))}")
        d.blank()
        yield d
        d.close()


def bridge_path(rgba, matrix, display):
    """Warp + convert + frame encode, as the bridge does it for one overlay."""
    image, region = render_for(display, rgba, matrix, (W, H))
    data, send = display.prepare(image, region)
    return L.encode_frame_chunks(data, seq0=0, frame_id=1, region=send, fmt=display.fmt, max_payload=4096)


@pytest.mark.benchmark(group="bridge-path")
@pytest.mark.parametrize("which", ["daemon", "fullscreen"])
def test_bridge_path(benchmark, which, display, daemon_overlay, overlay):
    rgba, matrix = daemon_overlay if which == "daemon" else (overlay, MATRIX)
    enc = benchmark(bridge_path, rgba, matrix, display)
    x, y, w, h = L.parse_frame_body(L.unpack_message(L.cobs_decode(enc.chunk(0)[:-1])).body)[0][2:6]
    benchmark.extra_info.update({"region": [x, y, w, h], "payload_bytes": enc.payload_bytes,
                                 "display_fraction": round(w * h / (W * H), 3)})
    assert enc.payload_bytes == display.fmt.frame_bytes(w, h)
    if which == "fullscreen":
        assert w * h > 0.95 * W * H
    else:
        assert w * h < 0.5 * W * H


def pipeline(rgba, reg, fmt, **kw):
    """Whole-display warp + convert + encode (``registration.warp``): the
    stage rows below and the link-efficiency check use it."""
    shown = warp(rgba, reg, premultiplied_out=True)
    data = pf.encode(shown, fmt, premultiplied=True, **kw)
    return L.encode_frame_chunks(data, seq0=0, frame_id=1, region=(0, 0, W, H), fmt=fmt, max_payload=4096)


@pytest.fixture(scope="module")
def registration():
    return Registration(MATRIX, (W, H), 0.0)


@pytest.mark.parametrize("stage", ["warp", "encode565", "encode565_gamma", "encode_mono1", "frame565",
                                   "frame565_one_thread", "frame_mono1"])
def test_stage(benchmark, overlay, registration, stage, monkeypatch):
    """Stages of the fullscreen path. ``encode565_gamma``: with a brightness/
    gamma LUT (0.8, 2.2), as a display matched to its optics would run;
    ``frame565_one_thread``: the frame encode without splitting over threads."""
    if stage == "frame565_one_thread":
        monkeypatch.setattr(L, "_ENCODER_THREADS", 1)
    shown = warp(overlay, registration, premultiplied_out=True)
    d565 = pf.encode(shown, "rgb565le", premultiplied=True)
    dmono = pf.encode(shown, "mono1", premultiplied=True)
    fn = {
        "warp": lambda: warp(overlay, registration, premultiplied_out=True),
        "encode565": lambda: pf.encode(shown, "rgb565le", premultiplied=True),
        "encode565_gamma": lambda: pf.encode(shown, "rgb565le", premultiplied=True, brightness=0.8, gamma=2.2),
        "encode_mono1": lambda: pf.encode(shown, "mono1", premultiplied=True),
        "frame565": lambda: L.encode_frame_chunks(d565, seq0=0, frame_id=1, region=(0, 0, W, H),
                                                  fmt="rgb565le", max_payload=4096),
        "frame565_one_thread": lambda: L.encode_frame_chunks(d565, seq0=0, frame_id=1, region=(0, 0, W, H),
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
