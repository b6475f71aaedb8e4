"""Pixel conversion: exact layouts, error bounds, MONO1 packing, LUT, on synthetic and H&E data."""


import cv2
import numpy as np
import pytest

from armscope.firmware_bridge import pixel_formats as pf
from armscope.firmware_bridge.pixel_formats import PixelFormat

from repo_paths import HE_FIELD as HE_IMAGE


@pytest.fixture(scope="module")
def he_rgba():
    """A 384x256 crop of a real H&E slide with a radial alpha ramp (skips if absent)."""
    bgr = cv2.imread(str(HE_IMAGE), cv2.IMREAD_COLOR)
    assert bgr is not None
    rgb = cv2.cvtColor(bgr[1000:1256, 800:1184], cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - w / 2, yy - h / 2) / (0.5 * np.hypot(w, h))
    alpha = np.clip(255 * (1.2 - r), 0, 255).astype(np.uint8)
    alpha[:, :20] = 0  # a fully transparent band
    return np.dstack([rgb, alpha]).copy()


def ref_premultiply(rgba):
    rgb = rgba[..., :3].astype(np.int64)
    a = rgba[..., 3:4].astype(np.int64)
    return ((rgb * a + 127) // 255).astype(np.uint8)  # round half up; cv2 rounds to nearest


def ref_rgb565(rgb):
    r, g, b = (rgb[..., i].astype(np.uint16) for i in range(3))
    return ((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3)


def test_frame_bytes_for_every_format():
    assert PixelFormat.RGB888.frame_bytes(13, 5) == 195
    assert PixelFormat.RGB565_LE.frame_bytes(13, 5) == 130
    assert PixelFormat.RGB565_BE.frame_bytes(13, 5) == 130
    assert PixelFormat.GRAY8.frame_bytes(13, 5) == 65
    assert PixelFormat.MONO1.frame_bytes(13, 5) == 10  # 13 px -> 2 bytes per row
    assert PixelFormat.MONO1.frame_bytes(16, 5) == 10
    assert PixelFormat.MONO1.row_bytes(17) == 3


@pytest.mark.parametrize("name,fmt", [("rgb565le", PixelFormat.RGB565_LE), ("RGB565_BE", PixelFormat.RGB565_BE),
                                      ("mono-1", PixelFormat.MONO1), ("Gray8", PixelFormat.GRAY8)])
def test_parse_names(name, fmt):
    assert PixelFormat.parse(name) is fmt
    assert PixelFormat.parse(fmt.slug) is fmt
    assert PixelFormat.from_wire(fmt.wire_code) is fmt


def test_parse_rejects_unknown_name():
    with pytest.raises(ValueError, match="rgb565le"):
        PixelFormat.parse("rgb444")


def test_composite_over_black_known_pixels():
    rgba = np.array([[[200, 100, 50, 128], [10, 20, 30, 255], [255, 255, 255, 0]]], np.uint8)
    out = pf.composite_over_black(rgba)
    assert out.tolist() == [[[100, 50, 25], [10, 20, 30], [0, 0, 0]]]


def test_rgb565_primary_colours_both_byte_orders():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    le = pf.encode(rgb, "rgb565le")
    be = pf.encode(rgb, "rgb565be")
    assert le.tobytes() == bytes([0x00, 0xF8, 0xE0, 0x07, 0x1F, 0x00, 0xFF, 0xFF])
    assert be.tobytes() == bytes([0xF8, 0x00, 0x07, 0xE0, 0x00, 0x1F, 0xFF, 0xFF])


def test_rgb565_matches_reference_and_error_bounds_random():
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (64, 96, 4), dtype=np.uint8)
    comp = pf.composite_over_black(rgba)
    assert np.abs(comp.astype(int) - ref_premultiply(rgba).astype(int)).max() <= 1
    for fmt, dt in ((PixelFormat.RGB565_LE, "<u2"), (PixelFormat.RGB565_BE, ">u2")):
        data = pf.encode(rgba, fmt)
        assert data.shape == (64, 96 * 2)
        assert np.array_equal(data.view(dt).reshape(64, 96), ref_rgb565(comp))
        back = pf.decode(data, fmt, 96, 64)
        err = np.abs(back.astype(int) - comp.astype(int))
        assert err[..., 0].max() <= 7 and err[..., 2].max() <= 7 and err[..., 1].max() <= 3


def test_rgb565_round_trip_on_he_image(he_rgba):
    h, w = he_rgba.shape[:2]
    comp = pf.composite_over_black(he_rgba)
    for fmt in (PixelFormat.RGB565_LE, PixelFormat.RGB565_BE):
        back = pf.decode(pf.encode(he_rgba, fmt), fmt, w, h)
        err = np.abs(back.astype(int) - comp.astype(int))
        assert err[..., 0].max() <= 7 and err[..., 1].max() <= 3 and err[..., 2].max() <= 7
        assert err.mean() < 4.0
    # The transparent band is dark on the display in every format.
    for fmt in PixelFormat:
        shown = pf.decode(pf.encode(he_rgba, fmt), fmt, w, h)
        assert not shown[:, :16].any(), fmt


def test_rgb888_and_gray8_on_he_image(he_rgba):
    h, w = he_rgba.shape[:2]
    comp = pf.composite_over_black(he_rgba)
    rgb = pf.encode(he_rgba, "rgb888")
    assert np.array_equal(rgb.reshape(h, w, 3), comp)
    gray = pf.encode(he_rgba, "gray8").astype(float)
    ref = comp[..., 0] * 0.299 + comp[..., 1] * 0.587 + comp[..., 2] * 0.114
    assert np.abs(gray - ref).max() <= 1.0


def test_mono1_packing_msb_first_with_row_padding():
    rgb = np.zeros((2, 10, 3), np.uint8)
    rgb[0, 0] = 255  # leftmost pixel -> MSB of byte 0
    rgb[0, 9] = 255  # 10th pixel -> bit 6 of byte 1
    rgb[1, 7] = 255  # 8th pixel -> LSB of byte 0
    data = pf.encode(rgb, "mono1")
    assert data.shape == (2, 2)
    assert data.tolist() == [[0x80, 0x40], [0x01, 0x00]]
    assert np.array_equal(pf.unpack_mono1(data, 10, 2), rgb[..., 0] > 0)


def test_mono1_threshold_on_premultiplied_luminance():
    # Same white colour, different alpha: only alpha >= ~50% lights up at threshold 128.
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[0, :, 3] = [0, 100, 128, 255]
    lit = pf.unpack_mono1(pf.encode(rgba, "mono1"), 4, 1)[0]
    assert lit.tolist() == [False, False, True, True]
    lit = pf.unpack_mono1(pf.encode(rgba, "mono1", threshold=90), 4, 1)[0]
    assert lit.tolist() == [False, True, True, True]


def test_mono1_round_trip_on_he_image(he_rgba):
    h, w = he_rgba.shape[:2]
    data = pf.encode(he_rgba, "mono1")
    assert data.shape == (h, (w + 7) // 8)
    luma = cv2.cvtColor(pf.composite_over_black(he_rgba), cv2.COLOR_RGB2GRAY)
    assert np.array_equal(pf.unpack_mono1(data, w, h), luma >= 128)
    shown = pf.decode(data, "mono1", w, h)
    assert set(np.unique(shown).tolist()) <= {0, 255}


@pytest.mark.parametrize("level", [0, 32, 64, 128, 200, 255])
def test_ordered_dither_density_tracks_level(level):
    rgb = np.full((64, 64, 3), level, np.uint8)
    lit = pf.unpack_mono1(pf.encode(rgb, "mono1", dither=True), 64, 64)
    assert abs(lit.mean() - level / 256) <= 1 / 64 + 1e-9


def test_lut_brightness_and_gamma():
    assert np.array_equal(pf.make_lut(1.0, 1.0), np.arange(256))
    assert pf.make_lut(0.5, 1.0)[255] == 128
    assert pf.make_lut(1.0, 2.0)[128] == round(255 * (128 / 255) ** 2)
    rgb = np.full((2, 2, 3), 255, np.uint8)
    assert pf.encode(rgb, "gray8", brightness=0.5).max() == 128
    assert pf.encode(rgb, "gray8", brightness=0.0).max() == 0
    with pytest.raises(ValueError, match="brightness"):
        pf.make_lut(1.5, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        pf.make_lut(1.0, 0.0)
    for gamma in (1e-9, float("inf"), float("nan")):  # 1e-9 rounded to 0 and lit black pixels at full white
        with pytest.raises(ValueError, match="gamma must be within"):
            pf.make_lut(1.0, gamma)
    for gamma in pf.GAMMA_RANGE:  # black stays black at both ends of the range
        assert pf.make_lut(1.0, gamma)[0] == 0 and pf.make_lut(1.0, gamma)[255] == 255


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        pf.encode(np.zeros((4, 4), np.uint8), "rgb565le")  # grey input only for grey formats
    with pytest.raises(ValueError, match="shape"):
        pf.encode(np.zeros((4, 4, 2), np.uint8), "gray8")
    with pytest.raises(TypeError):
        pf.encode(np.zeros((4, 4, 4), np.float32), "gray8")
    with pytest.raises(ValueError, match="needs 32 bytes"):
        pf.decode(b"\x00" * 31, "rgb565le", 4, 4)


@pytest.mark.parametrize("fmt,kw", [("gray8", {}), ("gray8", {"brightness": 0.7, "gamma": 2.2}),
                                    ("mono1", {}), ("mono1", {"dither": True})])
def test_grey_input_equals_its_rgb_for_grey_formats(he_rgba, fmt, kw):
    """A (H, W) luma (what the bridge renders for grey displays) encodes
    exactly like the composited RGB it is the luma of, and is not aliased."""
    import cv2

    rgb = pf.composite_over_black(he_rgba)
    luma = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    kept = luma.copy()
    got = pf.encode(luma, fmt, **kw)
    assert np.array_equal(got, pf.encode(rgb, fmt, **kw))
    got[...] = 0
    assert np.array_equal(luma, kept)
