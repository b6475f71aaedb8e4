"""Display outputs by URI: png://, fb:// (fake sysfs + regular file), serial:// (simulator), bad URIs."""

import cv2
import numpy as np
import pytest

from armscope.firmware_bridge import pixel_formats as pf
from armscope.firmware_bridge.displays import DisplayURIError, FramebufferDisplay, PngDisplay, open_display


def rgba(seed=0, w=40, h=30):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img[:, :5, 3] = 0
    return img


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_png_display_writes_what_the_display_shows(tmp_path):
    with open_display(f"png://{tmp_path}/out?format=mono1&dither=1") as d:
        assert isinstance(d, PngDisplay)
        img = rgba()
        d.show(img)
        d.blank()
    first, second = sorted((tmp_path / "out").glob("*.png"))
    expected = pf.decode(pf.encode(img, "mono1", dither=True), "mono1", 40, 30)
    assert np.array_equal(read_rgb(first), expected)
    blank = read_rgb(second)
    assert blank.shape == (30, 40, 3) and not blank.any()
    assert "blank" in second.name


def test_png_display_without_format_composites_over_black(tmp_path):
    d = open_display(f"png://{tmp_path}?width=40&height=30&brightness=0.5")
    img = rgba(1)
    d.show(img)
    expected = cv2.LUT(pf.composite_over_black(img), pf.make_lut(0.5, 1.0))
    assert np.array_equal(read_rgb(d.paths[0]), expected)
    with pytest.raises(ValueError, match="warp it to display coordinates"):
        d.show(rgba(2, 20, 20))


def fake_fb(tmp_path, bpp, w=40, h=30, stride=None, fill=0xAB):
    sysfs = tmp_path / "sys"
    (sysfs / "fb1").mkdir(parents=True)
    (sysfs / "fb1" / "virtual_size").write_text(f"{w},{h}\n")
    (sysfs / "fb1" / "bits_per_pixel").write_text(f"{bpp}\n")
    stride = stride or w * bpp // 8
    (sysfs / "fb1" / "stride").write_text(f"{stride}\n")
    dev = tmp_path / "dev" / "fb1"
    dev.parent.mkdir()
    dev.write_bytes(bytes([fill]) * stride * h)
    return sysfs, dev, stride


def test_framebuffer_rgb565_with_padded_stride(tmp_path):
    sysfs, dev, stride = fake_fb(tmp_path, 16, stride=96)
    d = open_display(f"fb://{dev}", sysfs_root=sysfs)
    assert isinstance(d, FramebufferDisplay) and d.size == (40, 30)
    img = rgba(3)
    d.show(img)
    d.close()
    mem = np.frombuffer(dev.read_bytes(), np.uint8).reshape(30, stride)
    assert np.array_equal(mem[:, :80], pf.encode(img, "rgb565le"))
    assert (mem[:, 80:] == 0xAB).all()  # padding bytes untouched


def test_framebuffer_32bpp_bgrx_and_blank(tmp_path):
    sysfs, dev, stride = fake_fb(tmp_path, 32)
    d = FramebufferDisplay(dev, sysfs_root=sysfs)
    img = rgba(4)
    d.show(img)
    mem = np.frombuffer(dev.read_bytes(), np.uint8).reshape(30, 40, 4)
    comp = pf.composite_over_black(img)
    assert np.array_equal(mem[..., 2::-1], comp)  # B, G, R order
    assert (mem[..., 3] == 255).all()
    d.blank()
    mem = np.frombuffer(dev.read_bytes(), np.uint8).reshape(30, 40, 4)
    assert not mem[..., :3].any() and (mem[..., 3] == 255).all()  # black; X as show() writes it
    d.close()


def test_framebuffer_bad_sysfs(tmp_path):
    sysfs, dev, _ = fake_fb(tmp_path, 12)
    with pytest.raises(ValueError, match="bits_per_pixel"):
        FramebufferDisplay(dev, sysfs_root=sysfs)
    with pytest.raises(ValueError, match="missing"):
        FramebufferDisplay(dev, sysfs_root=tmp_path / "nowhere")


@pytest.mark.parametrize(
    "uri,needle",
    [
        ("ftp://x", "unknown scheme"),
        ("png://", "missing the path"),
        ("png://d?widht=3", "unknown option 'widht'"),
        ("png://d?width=abc", "width='abc'"),
        ("png://d?format=rgb444", "unknown pixel format"),
        ("fb://dev/fb1", "fb:///dev/fbN"),
        ("fb:///dev/sda", "fb:///dev/fbN"),
        ("serial://ttyUSB0", "three slashes"),
        ("serial:///dev/ttyUSB0?bauds=9600", "unknown option 'bauds'"),
        ("png://d?width=99999&height=99999", "width='99999' must be within 1..8192"),  # 28 GiB asked, not refused
        ("png://d?gamma=inf", "must be a finite number"),
        ("png://d?gamma=1e-9", "gamma='1e-9' must be within 0.1..10"),  # used to light every pixel white
        ("serial:///dev/ttyUSB0?baud=0", "baud='0' must be within"),  # B0 hangs a real UART up
        ("serial:///dev/ttyUSB0?max_payload=0", "max_payload='0' must be within 19..65535"),
        ("serial:///dev/ttyUSB0?deadline=nan", "must be a finite number"),
        ("serial:///dev/ttyUSB0?ack_timeout=0", "ack_timeout='0' must be within"),
    ],
)
def test_bad_uris_name_the_uri_and_the_expectation(uri, needle):
    with pytest.raises(DisplayURIError) as exc:
        open_display(uri)
    assert repr(uri) in str(exc.value) and needle in str(exc.value)


def test_serial_display_through_simulator():
    serial = pytest.importorskip("serial")
    from armscope.firmware_bridge.link import LinkProtocolError
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController

    core = ControllerCore(40, 30, "rgb565be")
    with PtyController(core) as sim:
        d = open_display(f"serial://{sim.slave_path}?baud=115200&format=rgb565be&deadline=2")
        assert d.size == (40, 30)
        img = rgba(5)
        d.show(img)
        assert np.array_equal(core.front, pf.encode(img, "rgb565be"))
        d.blank()
        assert not core.front.any()
        d.close()
        with pytest.raises(LinkProtocolError, match="64x30"):
            open_display(f"serial://{sim.slave_path}?width=64&height=30").close()
        port = serial.Serial(sim.slave_path, 115200, timeout=0.01, write_timeout=1)
        with pytest.raises(LinkProtocolError, match="mono1"):
            open_display("serial:///dev/null?format=mono1", port=port)
        port.close()


def _on_black(img, region, size):
    """The whole display: ``img`` at ``region``, black elsewhere (composited RGB)."""
    x, y, w, h = region
    full = np.zeros((size[1], size[0], 3), np.uint8)
    full[y:y + h, x:x + w] = pf.composite_over_black(img)
    return full


@pytest.mark.parametrize("fmt,dither", [("rgb565le", False), ("mono1", True)])
def test_serial_partial_updates_show_exactly_the_full_frame(fmt, dither):
    """Regions that move, grow and shrink, with a blank between: after every
    step the controller holds what a full-frame update of the same picture
    would give (the old region cleared, MONO1 dither anchored to the display),
    and the link carried only the region plus what had to be cleared."""
    pytest.importorskip("serial")
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController

    W, H = 64, 48
    core = ControllerCore(W, H, fmt)
    steps = [(3, 5, 20, 17), (30, 20, 25, 20), (33, 22, 10, 9), "blank", (11, 2, 9, 40), (0, 0, W, H), (50, 40, 14, 8)]
    with PtyController(core) as sim:
        d = open_display(f"serial://{sim.slave_path}?baud=115200&format={fmt}&dither={int(dither)}&deadline=2")
        d.blank()
        lit = None
        for i, step in enumerate(steps):
            if step == "blank":
                d.blank()
                assert not core.front.any()
                lit = None
                continue
            x, y, w, h = step
            img = rgba(10 + i, w, h)
            report = d.show(img, region=step)
            full = _on_black(img, step, (W, H))
            assert np.array_equal(core.front, pf.encode(full, fmt, dither=dither)), step
            sent = d.align(step if lit is None else (min(x, lit[0]), min(y, lit[1]),
                                                      max(x + w, lit[0] + lit[2]) - min(x, lit[0]),
                                                      max(y + h, lit[1] + lit[3]) - min(y, lit[1])))
            assert report.payload_bytes == pf.PixelFormat.parse(fmt).frame_bytes(sent[2], sent[3]), step
            lit = step
        d.close()


def test_grey_outputs_take_luma(tmp_path):
    """Grey framebuffers and grey/mono PNG outputs accept the (H, W) luma the
    bridge renders for grey displays (one channel warped, not four), and show
    exactly what they show for the RGBA it came from."""
    from armscope.firmware_bridge.bridge import render_for

    img = rgba(30)
    luma = cv2.cvtColor(pf.premultiply(img), cv2.COLOR_RGBA2GRAY)
    sysfs, dev, stride = fake_fb(tmp_path, 8, stride=48)
    d = FramebufferDisplay(dev, sysfs_root=sysfs)
    assert d.luma_input
    mem = lambda: np.frombuffer(dev.read_bytes(), np.uint8).reshape(30, stride)[:, :40]  # noqa: E731
    d.show(img)
    from_rgba = mem().copy()
    d.blank()
    d.show(luma)
    assert np.array_equal(mem(), from_rgba) and from_rgba.any()
    image, region = render_for(d, img, np.eye(3), (40, 30))
    assert image.ndim == 2 and region == (0, 0, 40, 30)
    d.close()

    png = open_display(f"png://{tmp_path}/png?width=40&height=30&format=mono1&dither=1")
    assert png.luma_input
    png.show(img)
    png.show(luma[5:20, 10:30], region=(10, 5, 20, 15))
    first, second = (read_rgb(p) for p in png.paths)
    assert np.array_equal(first, pf.decode(pf.encode(img, "mono1", dither=True), "mono1", 40, 30))
    canvas = np.zeros((30, 40), np.uint8)
    canvas[5:20, 10:30] = luma[5:20, 10:30]
    want = pf.decode(pf.encode(canvas, "mono1", dither=True), "mono1", 40, 30)
    assert np.array_equal(second, want)
    assert not open_display(f"png://{tmp_path}/rgb").luma_input and not FramebufferDisplay(
        fake_fb(tmp_path / "b", 16)[1], sysfs_root=tmp_path / "b" / "sys").luma_input


def test_framebuffer_partial_update_clears_the_previous_region(tmp_path):
    sysfs, dev, stride = fake_fb(tmp_path, 16, w=40, h=30, stride=96)
    d = FramebufferDisplay(dev, sysfs_root=sysfs)
    mem = lambda: np.frombuffer(dev.read_bytes(), np.uint8).reshape(30, stride)  # noqa: E731
    first, second = rgba(20, 12, 10), rgba(21, 8, 6)
    d.show(first, region=(2, 3, 12, 10))  # also clears what was on the framebuffer before (0xAB)
    assert np.array_equal(mem()[:, :80], pf.encode(_on_black(first, (2, 3, 12, 10), (40, 30)), "rgb565le"))
    d.show(second, region=(25, 15, 8, 6))
    assert np.array_equal(mem()[:, :80], pf.encode(_on_black(second, (25, 15, 8, 6), (40, 30)), "rgb565le"))
    assert (mem()[:, 80:] == 0xAB).all()
    with pytest.raises(ValueError, match="not inside the 40x30 display"):
        d.show(second, region=(35, 15, 8, 6))
    with pytest.raises(ValueError, match="its region is 9x6"):
        d.show(second, region=(25, 15, 9, 6))
    d.close()


def test_first_frame_on_a_cold_numba_cache_meets_its_deadline(tmp_path):
    """On a fresh install the COBS kernels are not compiled yet; compiling them
    inside the first frame's delivery deadline made it time out (seen in a fresh
    CI clone). Both link ends compile when they are created instead."""
    import os
    import subprocess
    import sys

    pytest.importorskip("serial")
    code = """
import numpy as np
from armscope.firmware_bridge.displays import open_display
from armscope.firmware_bridge.simulator import ControllerCore, PtyController
core = ControllerCore(40, 30, "rgb565le")
with PtyController(core) as sim:
    d = open_display(f"serial://{sim.slave_path}?baud=115200&deadline=0.5")
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    report = d.show(img)
    assert report.chunks >= 1 and core.front.any()
    d.close()
print("ok")
"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))  # empty: nothing compiled yet
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(tmp_path))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_png_display_numbers_on_after_an_earlier_run(tmp_path):
    """The newest PNG is always what the display shows now: a run killed
    mid-frame and then `bridge blank` must not leave a lit frame as the
    highest-numbered file (numbering used to restart at 1)."""
    first = PngDisplay(tmp_path, width=8, height=4)
    for _ in range(3):
        first.show(np.full((4, 8, 3), 200, np.uint8))
    PngDisplay(tmp_path, width=8, height=4).blank()
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["000001_frame.png", "000002_frame.png", "000003_frame.png", "000004_blank.png"]
    assert cv2.imread(str(tmp_path / names[-1])).max() == 0
    (tmp_path / "file").write_text("x")
    with pytest.raises(DisplayURIError, match="not a directory"):
        open_display(f"png://{tmp_path}/file")
