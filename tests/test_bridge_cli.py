"""``register_main``: from point files and from a camera image of the dot grid."""

import json
from pathlib import Path

import cv2
import numpy as np

from armscope.firmware_bridge import registration as R
from armscope.cli.bridge import main, register_main, simulate_main

H_TRUE = np.array([[0.9, 0.02, 15.0], [-0.015, 0.88, 7.0], [1.0e-5, 0.5e-5, 1.0]])


def test_register_from_points(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cam = rng.uniform(0, 500, (10, 2))  # all of them map onto the 640x480 display
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

    from armscope.firmware_bridge import link as L
    from armscope.firmware_bridge import pixel_formats as pf
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController

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


def test_register_refuses_fits_that_would_put_the_heat_on_the_wrong_tissue(tmp_path, capsys):
    """A dot grid given as ROWSxCOLS fits with zero error but mirrors the image;
    display points off the display, a textured image (which sent OpenCV's grid
    search into minutes of work) and --grid/--margin with --points are refused."""
    pattern = R.render_dot_grid(5, 4, (640, 480))
    img = tmp_path / "cam.png"
    cv2.imwrite(str(img), cv2.GaussianBlur(cv2.warpPerspective(pattern, np.linalg.inv(H_TRUE), (800, 600)), (5, 5), 1.0))
    out = tmp_path / "reg.json"
    common = ["--display-size", "640x480", "--out", str(out)]
    assert register_main(["--camera-image", str(img), "--grid", "4x5", *common]) == 2
    assert "mirrors" in capsys.readouterr().err and not out.exists()
    assert register_main(["--camera-image", str(img), "--grid", "5x4", "--mirrored", *common]) == 2
    assert "does not mirror" in capsys.readouterr().err and not out.exists()
    assert register_main(["--camera-image", str(img), "--grid", "5x4", *common]) == 0
    assert not R.mirrors(R.load_registration(out).matrix, (400, 300))
    flipped = np.diag([-1.0, 1.0, 1.0]) @ np.array([[1.0, 0, -400], [0, 1, 0], [0, 0, 1]])  # a mirror in the path
    assert R.mirrors(flipped, (0, 0)) and not R.mirrors(np.eye(3), (0, 0))

    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(1).integers(0, 256, (480, 640), dtype=np.uint8))
    assert register_main(["--camera-image", str(noise), "--grid", "5x4", *common, "--force"]) == 2
    assert "dot-like spots" in capsys.readouterr().err

    pts = tmp_path / "pts.json"
    cam = np.array([[10, 10], [300, 12], [310, 200], [12, 210], [150, 100]], float)
    disp = cam * 2.0
    disp[2] = [900, 400]  # x well beyond the 640 px display
    pts.write_text(json.dumps({"camera": cam.tolist(), "display": disp.tolist()}))
    assert register_main(["--points", str(pts), *common, "--force"]) == 2
    assert "display point 3 (900, 400) lies outside the 640x480 display" in capsys.readouterr().err
    assert register_main(["--points", str(pts), "--grid", "5x4", *common, "--force"]) == 2
    assert "do not apply to --points" in capsys.readouterr().err
    for bad in (["--margin", "-1"], ["--margin", "0.9"], ["--ransac-threshold", "-3"], ["--ransac-threshold", "nan"]):
        assert register_main(["--camera-image", str(img), "--grid", "5x4", *bad, *common, "--force"]) == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err


def test_bridge_commands_refuse_bad_numbers_and_endpoints_before_starting(tmp_path, capsys):
    """Values that used to run forever, crash a thread later or paint the display
    white are refused by name, before any display is opened."""
    png = f"png://{tmp_path}/eyepiece"
    cases = [
        (["--connect", "127.0.0.1:5556"], "--connect"),
        (["--connect", "tcp://127.0.0.1:99999"], "PORT 1..65535"),
        (["--connect", "tcp://*:5556"], "wildcard"),
        (["--connect", "tcp://127.0.0.1:5556", "--duration", "-5"], "--duration"),
        (["--connect", "tcp://127.0.0.1:5556", "--duration", "nan"], "--duration"),
        (["--connect", "tcp://127.0.0.1:5556", "--gamma", "1e-9"], "--gamma"),
        (["--connect", "tcp://127.0.0.1:5556", "--max-stale-ms", "inf"], "--max-stale-ms"),
        (["--connect", "tcp://127.0.0.1:5556", "--poll-ms", "0"], "--poll-ms"),
        (["--connect", "tcp://127.0.0.1:5556", "--stats-interval", "-5"], "--stats-interval"),
    ]
    for args, named in cases:
        assert main([*args, "--display", png]) == 2, args
        assert named in capsys.readouterr().err, args
    assert not (tmp_path / "eyepiece").exists()  # refused before the display was opened
    assert main(["--connect", "tcp://127.0.0.1:5556", "--display", f"{png}?brightness=abc", "--brightness", "0.8"]) == 2
    assert "brightness='abc' is not a number" in capsys.readouterr().err
    for args, named in [(["--max-payload", "-1"], "--max-payload"), (["--max-payload", "100000"], "--max-payload"),
                        (["--duration", "-1"], "--duration"), (["--seed", "-1"], "--seed")]:
        assert simulate_main(["--pty", "--width", "10", "--height", "10", *args]) == 2
        assert f"argument {named}" in capsys.readouterr().err
    assert main(["bench", "--size", "64x48", "--max-payload", "-1"]) == 2
    assert "argument --max-payload" in capsys.readouterr().err
    assert main(["bench", "--display", f"{png}-bench?width=64&height=48", "--frames", "0"]) == 2
    assert "argument --frames" in capsys.readouterr().err and not (tmp_path / "eyepiece-bench").exists()
    reg = tmp_path / "reg.json"
    R.save_registration(R.Registration(np.eye(3), (320, 240), 0.0), reg)
    assert main(["--connect", "tcp://127.0.0.1:5556", "--display", f"{png}?width=64&height=48",
                 "--registration", str(reg)]) == 2
    assert f"{reg}: registration is for a 320x240 display, but {png}?width=64&height=48 is 64x48" in capsys.readouterr().err
    assert main(["bench", "--size", "64x48", "--frames", "1", "--warmup", "0", "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["bench", "--size", "64x48", "--json", str(tmp_path / "f" / "r.json")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
