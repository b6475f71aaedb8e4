"""armscope bridge bench: runs the bridge's own path on the bundled real CAM,
reports what a frame costs on the link, and rejects bad input clearly."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

pytest.importorskip("serial")

from armscope.firmware_bridge import bench  # noqa: E402
from armscope.cli.bridge import main  # noqa: E402
from armscope.firmware_bridge.pixel_formats import PixelFormat  # noqa: E402
from armscope.firmware_bridge.registration import Registration, save_registration, slow_warp_warning  # noqa: E402


def test_sample_overlay_is_the_real_cam():
    cam = np.load(bench.SAMPLE_CAM)
    assert cam.shape == (20, 20) and cam.max() > 0 and 0.3 < (cam > 0).mean() < 1.0
    rgba = bench.sample_overlay(256)
    assert rgba.shape == (256, 256, 4) and rgba[..., 3].max() > 100 and (rgba[..., 3] == 0).any()


def test_an_opencv_with_the_slow_warp_is_named(monkeypatch):
    """OpenCV 4.x warps at about half the speed of 5.x (BENCHMARKS.md): the
    bench and the bridge's log say so, naming the version and where it came from."""
    assert slow_warp_warning() is None
    monkeypatch.setattr(cv2, "__version__", "4.8.0")  # e.g. JetPack 6's system OpenCV
    warning = slow_warp_warning()
    assert warning is not None and "OpenCV 4.8.0" in warning and cv2.__file__ in warning
    monkeypatch.setattr(cv2, "__version__", "5.1.0-dev")
    assert slow_warp_warning() is None


@pytest.mark.parametrize("fmt", ["rgb565le", "mono1"])
def test_bench_reports_both_overlays(tmp_path, capsys, fmt):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "160x120", "--format", fmt, "--frames", "3", "--warmup", "1",
                 "--camera", "640x480", "--crop", "256", "--baud", "115200", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "160x120 " + fmt in printed and "daemon" in printed and "fullscreen" in printed
    data = json.loads(out.read_text())
    assert data["crc"] == "ISA-L, in the encoder threads" and "frame CRCs: ISA-L, in the encoder threads)" in printed
    assert data["opencv"] == f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads" and data["opencv"] in printed
    assert "warning" not in printed  # the install under test has the fast warp (pyproject: OpenCV >= 5)
    assert [(r["overlay"], r["protocol"]) for r in data["results"]] == [
        ("daemon", "v2"), ("daemon", "v1"), ("fullscreen", "v2"), ("fullscreen", "v1")]
    assert "v2 overlay" in printed and "v1 rendered" in printed
    by = {(r["overlay"], r["protocol"]): r for r in data["results"]}
    for form in ("v2", "v1"):
        daemon, full = by["daemon", form], by["fullscreen", form]
        assert full["region"] == [0, 0, 160, 120]
        x, y, w, h = daemon["region"]
        assert 0 <= x and 0 <= y and x + w <= 160 and y + h <= 120 and w * h < 0.5 * 160 * 120
        for r in (daemon, full):
            w, h = r["region"][2:]
            assert r["payload_bytes"] == PixelFormat.parse(fmt).frame_bytes(w, h)
            assert r["link_efficiency"] >= 0.95 and r["frames"] == 3
            assert r["wire_seconds_at_baud"] == pytest.approx(r["wire_bytes"] * 10 / 115200, abs=1e-3)
            assert all(r["stages_ms"][s]["median"] > 0 for s in bench.STAGES + ("total",))
    # the same overlay sent the same way to the display, whichever form it crossed the socket in
    assert by["daemon", "v2"]["region"] == by["daemon", "v1"]["region"]
    # v2 carries the CAM (a 20x20 float16 map and its header: a few KB), v1 the 256x256 RGBA bitmap
    assert by["daemon", "v2"]["message_bytes"] < 4096 < 256 * 256 * 4 < by["daemon", "v1"]["message_bytes"]


def test_bench_rejects_bad_input(tmp_path, capsys):
    reg = tmp_path / "reg.json"
    save_registration(Registration(np.eye(3), (320, 240), 0.0), reg)
    assert main(["bench", "--size", "160x120", "--registration", str(reg), "--frames", "1"]) == 2
    assert "registration is for a 320x240 display, but --size is 160x120" in capsys.readouterr().err
    assert main(["bench", "--size", "160x120", "--camera", "640x480", "--crop", "1024", "--frames", "1"]) == 2
    assert "crop 1024 must fit the 640x480 camera frame" in capsys.readouterr().err
    assert main(["bench", "--size", "160x120", "--frames", "0"]) == 2
    assert "argument --frames: must be >= 1" in capsys.readouterr().err


def test_bench_delivers_to_a_real_serial_controller(tmp_path, capsys):
    """--display: the overlays go over the link to the (simulated) controller
    and back; the bench reports the delivery and leaves the display blank."""
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController

    core = ControllerCore(160, 120, "rgb565le")
    out = tmp_path / "deliver.json"
    with PtyController(core) as sim:
        assert main(["bench", "--display", f"serial://{sim.slave_path}?baud=921600", "--frames", "3",
                     "--warmup", "1", "--camera", "640x480", "--crop", "256", "--json", str(out)]) == 0
        assert core.stats.frames_shown >= 2 * 2 * 4  # two overlays x two forms x (warmup + frames), each acknowledged
        assert not core.shown_rgb().any()          # blanked when done
    data = json.loads(out.read_text())
    assert sorted(r["protocol"] for r in data["results"]) == ["v1", "v1", "v2", "v2"]
    for r in data["results"]:
        w, h = r["region"][2:]
        assert r["payload_bytes"] == PixelFormat.RGB565_LE.frame_bytes(w, h)
        assert r["wire_bytes"] >= 3 * r["payload_bytes"] and r["resent_chunks"] == 0
        assert r["stages_ms"]["show"]["median"] > 0 and r["payload_mb_per_s"] > 0
    assert "MB/s" in capsys.readouterr().out


def test_bench_display_needs_a_size(tmp_path, capsys):
    assert main(["bench", "--display", f"png://{tmp_path}/png", "--frames", "1"]) == 2
    assert "give width and height in its URI" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly():
    """``armscope bridge bench | head -1`` closes the pipe while the bench
    still prints: that ends the command quietly with the shell's SIGPIPE status,
    not a BrokenPipeError traceback (seen before the fix, from `head -1`)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "armscope.cli", "bridge", "bench", "--size", "160x120",
                             "--frames", "2", "--warmup", "0", "--overlay", "daemon", "--camera", "640x480",
                             "--crop", "256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_the_bridge_logs_a_slow_warp_at_start(tmp_path, monkeypatch, caplog):
    from armscope.firmware_bridge.bridge import Bridge
    from armscope.firmware_bridge.displays import PngDisplay

    monkeypatch.setattr(cv2, "__version__", "4.8.0")
    bridge = Bridge(PngDisplay(tmp_path, width=64, height=48), stats_interval=0)
    with caplog.at_level("WARNING", logger="armscope.firmware_bridge.bridge"):
        bridge.start()
    bridge.close()
    assert any("OpenCV 4.8.0" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
