"""The diagnosis written in the eyepiece beside the overlay (armscope.firmware_bridge.label):
its text, where it goes, that it leaves the overlay's pixels alone, that a
serial display's partial update carries it, and that it goes dark with the
overlay. Real overlays of the H&E sample, the pty controller simulator."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("serial")

from bridge_runtime_support import DISPLAY, FakeDaemon, cam_of, read_rgb, registration  # noqa: E402
from armscope.firmware_bridge.bridge import Bridge  # noqa: E402
from armscope.firmware_bridge.displays import PngDisplay, open_display  # noqa: E402
from armscope.firmware_bridge.label import label_text, place  # noqa: E402
from armscope.firmware_bridge.simulator import ControllerCore, PtyController  # noqa: E402

BIG = (320, 240)  # room below the overlay's footprint for the label


def test_text_is_the_displayed_class_and_its_own_probability():
    binary_other = {"classes": ["other", "tumour"], "probs": [0.88, 0.12],
                    "decision": {"label": "other", "index": 0, "score": 0.12, "positive": False}}
    assert label_text(binary_other) == "other 0.88"  # not 0.12, the positive class's probability
    cascade = dict(binary_other, subtype={"classes": ["ADI", "STR", "MUS"], "probs": [0.1, 0.41, 0.49],
                                          "decision": {"label": "MUS", "index": 2, "score": 0.49}})
    assert label_text(cascade) == "other 0.88 > MUS 0.49"
    assert label_text(dict(binary_other, subtype=None)) == "other 0.88"
    accented = dict(binary_other, decision={"label": "myosite\u0301", "index": 0, "score": 0.12})
    assert label_text(accented) == "myosite? 0.88"  # the built-in font is ASCII


def test_placement_below_then_above_then_inside():
    assert place((50, 10), (20, 20, 100, 60), (200, 100)) == (20, 80)   # below
    assert place((50, 10), (20, 35, 100, 60), (200, 100)) == (20, 25)   # above: no room below
    assert place((50, 10), (0, 0, 200, 100), (200, 100)) == (0, 90)     # full screen: inside, bottom-left
    assert place((50, 10), (180, 20, 20, 60), (200, 100)) == (150, 80)  # kept on the display


def _show(display, header_override=None, label=True, rgba=None):
    """Feed a registered overlay (and running) to a bridge on ``display``; return the bridge (open)."""
    bridge = Bridge(display, registration=None, stats_interval=0, label=label)
    daemon = FakeDaemon(stale_after_ms=2000)
    bridge.start()
    assert bridge.feed(daemon.overlay_frames(rgba if rgba is not None else cam_of(0), **(header_override or {})))
    assert bridge.feed(daemon.status_frames("running"))
    daemon.close()
    assert bridge.stats()["shown"] == 1, bridge.stats()
    return bridge


def _lit_rows(image):
    rows = np.nonzero(image.any(axis=(1, 2)))[0]
    return rows.min(), rows.max()


def test_label_is_beside_the_overlay_and_leaves_it_alone(tmp_path):
    plain_display = PngDisplay(tmp_path / "plain", width=BIG[0], height=BIG[1])
    _show(plain_display, label=False).close()
    plain = read_rgb(plain_display.paths[-2])  # the last is the exit blank
    shown = {}
    for name, override in (("tumour", None),
                           ("long", {"probs": [0.88, 0.12], "decision": {"label": "other", "index": 0, "score": 0.12},
                                     "subtype": {"classes": ["ADI", "STR"], "probs": [0.3, 0.7],
                                                 "decision": {"label": "STR", "index": 1, "score": 0.7}}})):
        display = PngDisplay(tmp_path / name, width=BIG[0], height=BIG[1])
        bridge = _show(display, override)
        bridge.close()
        shown[name] = read_rgb(display.paths[-2])
        assert not read_rgb(display.paths[-1]).any(), "the label outlived the overlay: exit did not blank it"
    top, bottom = _lit_rows(plain)
    for name, got in shown.items():
        changed = np.nonzero((got != plain).any(axis=2))
        assert changed[0].size > 50, f"{name}: no label drawn"
        assert changed[0].min() > bottom, f"{name}: the label overlaps the overlay (room below it)"
        text = got[changed]
        assert (text[:, 0] == text[:, 1]).all() and (text[:, 1] == text[:, 2]).all(), "label is not white/grey"
        assert np.array_equal(got[: bottom + 1], plain[: bottom + 1]), f"{name}: overlay pixels changed"
    width = {n: np.ptp(np.nonzero((g != plain).any(axis=2))[1]) for n, g in shown.items()}
    assert width["long"] > 1.5 * width["tumour"], width  # "other 0.88 > STR 0.70" vs "tumour 0.70"


def _on_controller(tmp_path, label):
    """What the pty controller shows after one registered overlay, and after exit."""
    core = ControllerCore(DISPLAY[0], DISPLAY[1], "rgb888", png_dir=tmp_path / f"sim-{label}")
    with PtyController(core) as sim:
        display = open_display(f"serial://{sim.slave_path}?baud=921600&deadline=2.0")
        bridge = Bridge(display, registration=registration(), stats_interval=0, label=label)
        daemon = FakeDaemon(stale_after_ms=2000)
        try:
            bridge.start()
            assert bridge.feed(daemon.overlay_frames(cam_of(0)))
            assert bridge.feed(daemon.status_frames("running"))
            assert bridge.stats()["shown"] == 1
            shown = core.shown_rgb().copy()
        finally:
            bridge.close()
            daemon.close()
    return shown, core.shown_rgb()


def test_a_serial_displays_partial_update_carries_the_label(tmp_path):
    plain, _ = _on_controller(tmp_path, False)
    shown, after_exit = _on_controller(tmp_path, True)
    top, bottom = _lit_rows(plain)
    changed = np.nonzero((shown != plain).any(axis=2))
    assert changed[0].size > 20, "the controller never received the label (partial update too small?)"
    assert changed[0].min() > bottom and np.array_equal(shown[: bottom + 1], plain[: bottom + 1])
    assert not after_exit.any(), "exit did not blank the label on the controller"


def test_a_display_filling_overlay_gets_the_label_inside_on_a_see_through_box():
    from armscope.firmware_bridge.bench import overlay_and_matrix
    from armscope.firmware_bridge.bridge import render_for_display
    from armscope.firmware_bridge.label import add_label

    rgba, matrix = overlay_and_matrix("fullscreen", BIG, None, (640, 480), 480)
    plain, region = render_for_display(rgba, matrix, BIG)
    assert region == (0, 0) + BIG and plain.mean() > 20
    got, send = add_label(plain.copy(), region, "tumour 0.70", BIG)
    assert send == region
    changed = np.nonzero((got != plain).any(axis=2))
    assert changed[0].min() > BIG[1] * 0.8 and changed[1].max() < BIG[0] * 0.6  # bottom-left corner
    box = got[changed[0].min() :, : changed[1].max() + 1]
    assert (box.max(axis=2) == 0).mean() > 0.4, "no see-through box behind the text"
    lit = box[box.max(axis=2) > 0]
    assert (lit.max(axis=1) - lit.min(axis=1) <= 1).all()  # only white/grey text in it


def test_grey_one_bit_displays_get_a_byte_aligned_region_with_the_text():
    """MONO1/GRAY8 displays take luma (2-D) and, for 1 bpp, regions in whole bytes."""
    from armscope.firmware_bridge.bench import overlay_and_matrix
    from armscope.firmware_bridge.bridge import render_for_display
    from armscope.firmware_bridge.displays import align_to_bytes
    from armscope.firmware_bridge.label import add_label

    size = (250, 130)
    align = lambda r: align_to_bytes(r, size[0])  # noqa: E731
    rgba, matrix = overlay_and_matrix("daemon", size, None, (640, 480), 256)
    luma, region = render_for_display(rgba, matrix, size, luma=True, align=align)
    got, send = add_label(luma, region, "tumour 0.70", size, align=align)
    assert got.ndim == 2 and got.shape == (send[3], send[2])
    assert send[0] % 8 == 0 and (send[2] % 8 == 0 or send[0] + send[2] == size[0]) and send[1] % 8 == 0
    ox, oy = region[0] - send[0], region[1] - send[1]
    assert np.array_equal(got[oy : oy + luma.shape[0], ox : ox + luma.shape[1]], luma)
    below = got[oy + luma.shape[0] :]
    assert (below > 128).sum() > 30, "no text below the overlay"
