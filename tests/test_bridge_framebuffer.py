"""fb:// channel order and visible window from the kernel's fb_var_screeninfo:
layouts by bitfields, packing checked against bit arithmetic written here,
a double-buffered framebuffer written only where it is shown."""
from __future__ import annotations

import os

import numpy as np
import pytest

from armscope.firmware_bridge import framebuffer as fb
from armscope.firmware_bridge import pixel_formats as pf
from armscope.firmware_bridge.displays import FramebufferDisplay

RGB565 = ((11, 5, 0), (5, 6, 0), (0, 5, 0))
BGR565 = ((0, 5, 0), (5, 6, 0), (11, 5, 0))
XRGB = ((16, 8, 0), (8, 8, 0), (0, 8, 0))
XBGR = ((0, 8, 0), (8, 8, 0), (16, 8, 0))


def info(bpp, channels, w=40, h=30, vh=None, yoffset=0, grayscale=0):
    r, g, b = channels
    return fb.VarScreenInfo(w, h, w, vh or h, 0, yoffset, bpp, grayscale, r, g, b)


def fake_fb(tmp_path, bpp, w=40, vh=30, fill=0xAB):
    sysfs = tmp_path / "sys"
    (sysfs / "fb1").mkdir(parents=True)
    (sysfs / "fb1" / "virtual_size").write_text(f"{w},{vh}\n")
    (sysfs / "fb1" / "bits_per_pixel").write_text(f"{bpp}\n")
    (sysfs / "fb1" / "stride").write_text(f"{w * bpp // 8}\n")
    dev = tmp_path / "dev" / "fb1"
    dev.parent.mkdir()
    dev.write_bytes(bytes([fill]) * (w * bpp // 8) * vh)
    return sysfs, dev


def test_screeninfo_round_trips_the_kernel_struct():
    i = info(16, BGR565, vh=60, yoffset=30)
    raw = i.pack()
    assert len(raw) == 160  # sizeof(struct fb_var_screeninfo)
    assert fb.VarScreenInfo.unpack(raw) == i


@pytest.mark.parametrize("bpp,channels,layout", [
    (16, RGB565, "rgb565le"), (16, BGR565, "bgr565le"), (32, XRGB, "bgrx8888"), (32, XBGR, "rgbx8888"),
    (24, XRGB, "bgr888"), (24, XBGR, "rgb888"),
])
def test_layout_follows_the_bitfields(bpp, channels, layout):
    assert fb.layout_for(info(bpp, channels)) == layout


def test_layouts_that_would_show_wrong_colours_are_refused():
    with pytest.raises(ValueError, match=r"16 bits per pixel.*\(10, 5, 0\)"):
        fb.layout_for(info(16, ((10, 5, 0), (5, 5, 0), (0, 5, 0))))  # RGB555
    with pytest.raises(ValueError, match="unsupported pixel layout"):
        fb.layout_for(info(32, ((16, 8, 1), (8, 8, 0), (0, 8, 0))))  # msb_right
    with pytest.raises(ValueError, match="palette"):
        fb.layout_for(info(8, XRGB))
    assert fb.layout_for(info(8, XRGB, grayscale=1)) == "gray8"


def test_pack_matches_bit_arithmetic():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    bgr565 = ((b >> 3) << 11) | ((g >> 2) << 5) | (r >> 3)
    assert np.array_equal(fb.pack(rgb, "bgr565le").view("<u2"), bgr565.astype("<u2"))
    rgb565 = ((r >> 3) << 11) | ((g >> 2) << 5) | (b >> 3)
    assert np.array_equal(fb.pack(rgb, "rgb565le").view("<u2"), rgb565.astype("<u2"))
    xbgr = r | (g << 8) | (b << 16) | (0xFF << 24)  # XBGR8888 as a little-endian word: bytes R, G, B, X
    assert np.array_equal(fb.pack(rgb, "rgbx8888").view("<u4"), xbgr.astype("<u4"))
    xrgb = b | (g << 8) | (r << 16) | (0xFF << 24)
    assert np.array_equal(fb.pack(rgb, "bgrx8888").view("<u4"), xrgb.astype("<u4"))
    assert np.array_equal(fb.pack(rgb, "rgb888").reshape(5, 7, 3), rgb)
    assert np.array_equal(fb.pack(rgb, "bgr888").reshape(5, 7, 3), rgb[..., ::-1])


def test_double_buffered_bgr565_is_written_where_it_is_shown(tmp_path):
    """Virtual screen 40x60, the kernel showing rows 30..59 (yoffset 30), BGR565."""
    sysfs, dev = fake_fb(tmp_path, 16, vh=60)
    d = FramebufferDisplay(dev, sysfs_root=sysfs, screeninfo=info(16, BGR565, vh=60, yoffset=30))
    assert d.size == (40, 30) and d.layout == "bgr565le"
    mem = lambda: np.frombuffer(dev.read_bytes(), np.uint8).reshape(60, 80)  # noqa: E731
    img = np.random.default_rng(1).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    d.show(img)
    rgb = pf.composite_over_black(img).astype(np.uint32)
    want = ((rgb[..., 2] >> 3) << 11) | ((rgb[..., 1] >> 2) << 5) | (rgb[..., 0] >> 3)
    assert np.array_equal(mem()[30:].copy().view("<u2"), want.astype("<u2"))
    assert (mem()[:30] == 0xAB).all()  # the hidden buffer is not touched
    d.blank()
    assert not mem()[30:].any() and (mem()[:30] == 0xAB).all()
    d.close()


def test_bad_screeninfo_names_the_device(tmp_path):
    sysfs, dev = fake_fb(tmp_path, 16)
    with pytest.raises(ValueError, match=rf"{dev}: unsupported pixel layout"):
        FramebufferDisplay(dev, sysfs_root=sysfs, screeninfo=info(16, ((10, 5, 0), (5, 5, 0), (0, 5, 0))))
    with pytest.raises(ValueError, match=rf"{dev}: visible 40x30 at row 10 does not fit"):
        FramebufferDisplay(dev, sysfs_root=sysfs, screeninfo=info(16, RGB565, yoffset=10))


def test_a_regular_file_does_not_answer_the_ioctl(tmp_path):
    path = tmp_path / "fb1"
    path.write_bytes(bytes(100))
    fd = os.open(path, os.O_RDWR)
    try:
        assert fb.query_var_screeninfo(fd) is None  # ENOTTY: sysfs and the usual layout are used
    finally:
        os.close(fd)


def lsb_first(lit: np.ndarray) -> np.ndarray:
    """Pack a boolean (h, w) image into bytes, leftmost pixel in bit 0 (fbdev on a little-endian CPU)."""
    h, w = lit.shape
    padded = np.zeros((h, -(-w // 8) * 8), bool)
    padded[:, :w] = lit
    weights = (1 << np.arange(8)).astype(np.uint8)
    return (padded.reshape(h, -1, 8) * weights).sum(axis=2).astype(np.uint8)


@pytest.mark.skipif(__import__("sys").byteorder != "little", reason="fbdev bit order is CPU-endian")
@pytest.mark.parametrize("visual,layout", [(fb.FB_VISUAL_MONO10, "mono10"), (fb.FB_VISUAL_MONO01, "mono01")])
def test_one_bit_oled_framebuffer(tmp_path, visual, layout):
    """A 1-bpp framebuffer (ssd1307fb-style, 44x16: rows of 6 bytes, the last
    one partial): pixels LSB-first, set = lit (MONO10) or dark (MONO01), blank
    dark in both, partial updates grown to whole bytes with the dither anchored."""
    w, h = 44, 16
    sysfs, dev = fake_fb(tmp_path, 1, w=48, vh=h)  # stride 6 bytes
    d = FramebufferDisplay(dev, sysfs_root=sysfs, dither=True, visual=visual,
                           screeninfo=fb.VarScreenInfo(w, h, w, h, 0, 0, 1, 0, (0, 1, 0), (0, 1, 0), (0, 1, 0)))
    assert d.layout == layout and d.size == (w, h) and d.luma_input
    mem = lambda: np.frombuffer(dev.read_bytes(), np.uint8).reshape(h, 6)  # noqa: E731
    ramp = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    d.show(ramp)
    lit = ramp >= np.tile(pf._BAYER8_THRESH, (2, 6))[:h, :w]  # ordered dither, anchored at the display origin
    want = lsb_first(lit)
    got = mem() if layout == "mono10" else ~mem()
    assert np.array_equal(got[:, :5], want[:, :5]) and np.array_equal(got[:, 5] & 0x0F, want[:, 5] & 0x0F)
    assert 0.3 < lit.mean() < 0.7
    d.blank()
    dark = 0x00 if layout == "mono10" else 0xFF
    assert ((mem()[:, :5] == dark).all() and ((mem()[:, 5] & 0x0F) == (dark & 0x0F)).all())
    # partial update at x=10: written from byte 1 (x 8..), rows from 0, same dither phase as a full frame
    part = ramp[3:9, 10:30]
    d.show(part, region=(10, 3, 20, 6))
    assert d.align((10, 3, 20, 6)) == (8, 0, 24, 9)
    canvas = np.zeros((h, w), np.uint8)
    canvas[3:9, 10:30] = part
    want = lsb_first(canvas >= np.tile(pf._BAYER8_THRESH, (2, 6))[:h, :w])
    got = mem() if layout == "mono10" else ~mem()
    assert np.array_equal(got[:, :5], want[:, :5])
    d.close()


@pytest.mark.parametrize("layout", ["mono10", "mono01"])
def test_one_bit_bit_order_follows_the_cpu(layout):
    """fbdev packs 1-bpp pixels in CPU-endian bit order: leftmost pixel in bit
    0 on little-endian CPUs, in bit 7 on big-endian ones. Both orders, whatever
    this CPU is, against numpy's own packing of the same lit pixels."""
    w, h = 21, 5  # a partial last byte per row
    grey = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    grey[2] = grey[2, ::-1]  # a row lit from the other side
    lit = grey >= 128
    for order, want in (("little", lsb_first(lit)), ("big", np.packbits(lit, axis=1, bitorder="big"))):
        got = fb.pack(grey, layout, byteorder=order)
        got = got if layout == "mono10" else ~got
        assert np.array_equal(got[:, :2], want[:, :2]), order
        keep = 0x1F if order == "little" else 0xF8  # the 5 pixels of the last byte
        assert np.array_equal(got[:, 2] & keep, want[:, 2] & keep), order
    assert not np.array_equal(fb.pack(grey, layout, byteorder="big"), fb.pack(grey, layout, byteorder="little"))
