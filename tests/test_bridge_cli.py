"""``register_main``: from point files and from a camera image of the dot grid."""

import json
from pathlib import Path

import cv2
import numpy as np

from firmware_bridge import registration as R
from firmware_bridge.cli import main, register_main, simulate_main

H_TRUE = np.array([[0.9, 0.02, 15.0], [-0.015, 0.88, 7.0], [1.0e-5, 0.5e-5, 1.0]])


def test_register_from_points(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cam = rng.uniform(0, 700, (10, 2))
    disp = cv2.perspectiveTransform(cam.reshape(-1, 1, 2), H_TRUE).reshape(-1, 2)
    pts = tmp_path / "pts.json"
    pts.write_text(json.dumps({"camera": cam.tolist(), "display": disp.tolist()}))
    out = tmp_path / "reg.json"
    assert register_main(["--points", str(pts), "--display-size", "640x480", "--out", str(out)]) == 0
    reg = R.load_registration(out)
    assert reg.rms_error < 0.01 and np.allclose(reg.matrix, H_TRUE, atol=1e-6)
    assert "rms error" in capsys.readouterr().out
    # the registration in use is not replaced unasked (a worse calibration run must not overwrite it)
    before = out.read_text()
    pts.write_text(json.dumps({"camera": cam.tolist(), "display": (disp + 3.0).tolist()}))
    assert register_main(["--points", str(pts), "--display-size", "640x480", "--out", str(out)]) == 2
    assert "reg.json: already exists (use --force to replace it)" in capsys.readouterr().err
    assert out.read_text() == before
    assert register_main(["--points", str(pts), "--display-size", "640x480", "--out", str(out), "--force"]) == 0
    assert out.read_text() != before


def test_register_from_camera_image(tmp_path):
    pattern = R.render_dot_grid(7, 5, (640, 480))
    cam = cv2.warpPerspective(pattern, np.linalg.inv(H_TRUE), (800, 600))
    img = tmp_path / "cam.png"
    cv2.imwrite(str(img), cv2.GaussianBlur(cam, (5, 5), 1.0))
    out = tmp_path / "reg.json"
    rc = register_main(["--camera-image", str(img), "--grid", "7x5", "--display-size", "640x480", "--out", str(out)])
    assert rc == 0
    reg = R.load_registration(out)
    assert reg.rms_error < 0.5 and reg.n_points == 35


def test_register_errors_exit_2_and_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("camera_x,camera_y,display_x\n1,2,3\n")
    rc = register_main(["--points", str(bad), "--display-size", "640x480", "--out", str(tmp_path / "r.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "display_y" in err
    assert not (tmp_path / "r.json").exists()
    assert register_main(["--display-size", "640x480", "--out", "x.json"]) == 2  # no source given
    assert register_main(["--camera-image", str(bad), "--display-size", "64x48", "--out", "x.json"]) == 2


def test_simulate_rejects_bad_arguments(capsys):
    assert simulate_main(["--pty", "--width", "10", "--height", "10", "--format", "rgb444"]) == 2
    assert simulate_main(["--pty", "--width", "10", "--height", "10", "--drop", "1.5"]) == 2
    assert "rgb444" in capsys.readouterr().err


def test_blank_command_clears_a_controller_that_still_shows_a_frame(tmp_path):
    """'armscope bridge blank' (the service's ExecStopPost) on a real pty
    controller left showing an overlay by a bridge that died."""
    import numpy as np
    import serial

    from firmware_bridge import link as L
    from firmware_bridge import pixel_formats as pf
    from firmware_bridge.simulator import ControllerCore, PtyController

    core = ControllerCore(32, 16, "rgb565le")
    with PtyController(core) as sim:
        port = serial.Serial(sim.slave_path, 921600, timeout=0.01, write_timeout=2.0)
        L.LinkSender(port, deadline=3.0).send_frame(pf.encode(np.full((16, 32, 3), 200, np.uint8), "rgb565le"))
        port.close()
        assert core.front.any()
        assert main(["blank", "--display", f"serial://{sim.slave_path}?baud=921600&watchdog=0"]) == 0
        assert not core.front.any() and core.history[-1][0] == "blank"
    assert main(["blank", "--display", "nope://x"]) == 2


def test_bridge_service_unit_blanks_after_the_bridge_stops(tmp_path):
    """deploy/armscope-bridge.service: its ExecStopPost is the blank command
    on the same display as ExecStart, and that command line runs."""
    import shlex

    unit = (Path(__file__).resolve().parents[1] / "deploy" / "armscope-bridge.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if line.startswith(("ExecStart=", "ExecStopPost=")))
    start, post = shlex.split(lines["ExecStart"]), shlex.split(lines["ExecStopPost"])
    assert start[1:3] == ["bridge", "--connect"] and post[1:3] == ["bridge", "blank"]
    assert start[start.index("--display") + 1] == post[post.index("--display") + 1] == "${DISPLAY_URI}"
    args = [a.replace("${DISPLAY_URI}", f"png://{tmp_path}/eyepiece") for a in post[2:]]
    assert main(args) == 0 and any((tmp_path / "eyepiece").glob("*_blank.png"))
