"""Bridge hot path: decode + render + convert + frame encode into a 1280x720 display.

Run:  python -m pytest benchmarks/bench_bridge.py --benchmark-only
(add ``--benchmark-disable`` to run the assertions only).  The target is a
median <= 5 ms per overlay so the bridge keeps up with the daemon at video
rates on an edge CPU; link efficiency must be >= 95 % on full frames.

The same function and messages as ``armscope bridge bench``
(``armscope.firmware_bridge.bench``: ``protocol.decode``, the render,
``SerialDisplay.prepare`` on a simulated controller, ``encode_frame_chunks``),
from the demo ensemble's real CAM on CMU-1 frame 1, in both protocol forms:
``v2`` (the ``overlay`` topic, the CAM as data, drawn in display pixels: what
the bridge runs) and ``v1`` (the opt-in ``rendered`` topic's bitmap, warped):

* ``daemon``: the CAM over the camera frame's 1024 centre crop, registered
  into the display (scale 0.6, a slight rotation and perspective): the crop
  covers ~40 % of the display, and the bridge draws and sends only that.
* ``fullscreen``: the CAM over a square as wide as the display, covering all
  of it, registered with a 1 degree rotation (worst case: the whole 1.8 MB
  RGB565 frame is drawn and sent).

``test_header_validation`` times the header check alone (``protocol.decode``
of a v2 overlay: JSON, the compiled schema, the cross-key rules).
"""

import numpy as np
import pytest

from armscope.firmware_bridge import link as L
from armscope.firmware_bridge import pixel_formats as pf
from armscope.core import protocol
from armscope.firmware_bridge.bench import bridge_path, overlay_and_matrix, sample_messages
from armscope.firmware_bridge.registration import Registration, warp

W, H = 1280, 720
CAMERA, CROP = (1600, 1200), 1024
# Camera (1600x1200) -> display: scale 0.6, 1 degree rotation, a little perspective, centred.
_A = np.deg2rad(1.0)
CAMERA_TO_DISPLAY = np.array([[0.6 * np.cos(_A), -0.6 * np.sin(_A), 170.0],
                              [0.6 * np.sin(_A), 0.6 * np.cos(_A), 2.0],
                              [1e-6, -2e-6, 1.0]])


@pytest.fixture(scope="module")
def overlays():
    """{kind: (rgba, overlay -> display matrix)} for ``daemon`` and ``fullscreen``."""
    reg = Registration(CAMERA_TO_DISPLAY, (W, H), 0.0)
    return {kind: overlay_and_matrix(kind, (W, H), reg, CAMERA, CROP) for kind in ("daemon", "fullscreen")}


@pytest.fixture(scope="module", params=["rgb565le", "mono1", "mono1-dither"])
def display(request):
    """A SerialDisplay on the pty controller simulator, blanked (nothing lit).
    ``mono1-dither``: ordered dithering, what 1-bit displays use for heat maps."""
    pytest.importorskip("serial")
    from armscope.firmware_bridge.displays import open_display
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController

    fmt, _, dither = request.param.partition("-")
    with PtyController(ControllerCore(W, H, fmt, max_payload=4096)) as sim:
        d = open_display(f"serial://{sim.slave_path}?baud=921600&deadline=5&dither={int(bool(dither))}")
        d.blank()
        yield d
        d.close()


@pytest.fixture(scope="module")
def messages():
    """{kind: ({"v2": frames, "v1": frames}, registration)} for ``daemon`` and ``fullscreen``."""
    reg = Registration(CAMERA_TO_DISPLAY, (W, H), 0.0)
    return {kind: sample_messages(kind, (W, H), reg, CAMERA, CROP) for kind in ("daemon", "fullscreen")}


@pytest.mark.benchmark(group="bridge-path")
@pytest.mark.parametrize("form", ["v2", "v1"])
@pytest.mark.parametrize("which", ["daemon", "fullscreen"])
def test_bridge_path(benchmark, which, form, display, messages):
    frames, reg = messages[which]
    enc, _ = benchmark(bridge_path, frames[form], display, reg)
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
def overlay(overlays):
    return overlays["fullscreen"][0]


@pytest.fixture(scope="module")
def registration(overlays):
    return Registration(overlays["fullscreen"][1], (W, H), 0.0)


@pytest.mark.parametrize("stage", ["warp", "encode565", "encode565_gamma", "encode_mono1", "frame565",
                                   "frame565_one_thread", "frame_mono1"])
def test_stage(benchmark, overlay, registration, stage, monkeypatch):
    """Stages of the fullscreen path. ``encode565_gamma``: with a brightness/
    gamma LUT (0.8, 2.2), as a display matched to its optics would run;
    ``frame565_one_thread``: the frame encode without splitting over threads."""
    if stage == "frame565_one_thread":
        from armscope.firmware_bridge.link import chunks

        monkeypatch.setattr(chunks, "_ENCODER_THREADS", 1)
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


@pytest.mark.benchmark(group="header")
def test_header_validation(benchmark, messages):
    """protocol.decode of a v2 overlay (what the bridge does first with every message)."""
    frames = messages["daemon"][0]["v2"]
    message = benchmark(protocol.decode, frames)
    assert message.header["cam"]["classes"] == 1 and len(frames[1]) + len(frames[2]) < 4096
