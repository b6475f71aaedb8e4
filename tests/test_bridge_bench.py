"""armscope bridge bench: runs the bridge's own path on the bundled real CAM,
reports what a frame costs on the link, and rejects bad input clearly."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("serial")

from firmware_bridge import bench  # noqa: E402
from firmware_bridge.cli import main  # noqa: E402
from firmware_bridge.pixel_formats import PixelFormat  # noqa: E402
from firmware_bridge.registration import Registration, save_registration  # noqa: E402


def test_sample_overlay_is_the_real_cam():
    cam = np.load(bench.SAMPLE_CAM)
    assert cam.shape == (20, 20) and cam.max() > 0 and 0.3 < (cam > 0).mean() < 1.0
    rgba = bench.sample_overlay(256)
    assert rgba.shape == (256, 256, 4) and rgba[..., 3].max() > 100 and (rgba[..., 3] == 0).any()


@pytest.mark.parametrize("fmt", ["rgb565le", "mono1"])
def test_bench_reports_both_overlays(tmp_path, capsys, fmt):
    out = tmp_path / "bench.json"
    assert main(["bench", "--size", "160x120", "--format", fmt, "--frames", "3", "--warmup", "1",
                 "--camera", "640x480", "--crop", "256", "--baud", "115200", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "160x120 " + fmt in printed and "daemon" in printed and "fullscreen" in printed
    data = json.loads(out.read_text())
    daemon, full = data["results"]
    assert full["region"] == [0, 0, 160, 120]
    x, y, w, h = daemon["region"]
    assert 0 <= x and 0 <= y and x + w <= 160 and y + h <= 120 and w * h < 0.5 * 160 * 120
    for r in (daemon, full):
        w, h = r["region"][2:]
        assert r["payload_bytes"] == PixelFormat.parse(fmt).frame_bytes(w, h)
        assert r["link_efficiency"] >= 0.95 and r["frames"] == 3
        assert r["wire_seconds_at_baud"] == pytest.approx(r["wire_bytes"] * 10 / 115200, abs=1e-3)
        assert all(r["stages_ms"][s]["median"] > 0 for s in bench.STAGES + ("total",))


def test_bench_rejects_bad_input(tmp_path, capsys):
    reg = tmp_path / "reg.json"
    save_registration(Registration(np.eye(3), (320, 240), 0.0), reg)
    assert main(["bench", "--size", "160x120", "--registration", str(reg), "--frames", "1"]) == 2
    assert "registration is for a 320x240 display, --size is 160x120" in capsys.readouterr().err
    assert main(["bench", "--size", "160x120", "--camera", "640x480", "--crop", "1024", "--frames", "1"]) == 2
    assert "crop 1024 must fit the 640x480 camera frame" in capsys.readouterr().err
    assert main(["bench", "--size", "160x120", "--frames", "0"]) == 2
    assert "frames must be >= 1" in capsys.readouterr().err
