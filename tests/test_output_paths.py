"""Outputs the system refuses, and what the user sees then: the path they gave and the cause in words (not a
temporary sibling the output was staged under, not a bare errno, not OpenCV's own log lines); and outputs that
are made are readable by the other lab accounts, as a plain mkdir would make them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from armscope.cli import main
from armscope.core.bundle import staged_directory
from armscope.core.errors import ArmscopeError

from repo_paths import DEMO_BUNDLE as BUNDLE
from repo_paths import FRAMES, REPO

FRAME = str(FRAMES[1])
PROCFS = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a directory that refuses files)")


def _daemon_stderr(*extra: str, settle_s: float = 2.5) -> str:
    """stderr of ``armscope run`` on a V4L2 device that does not exist: started, left to retry the camera a few
    times (0.5 s, 1 s backoff), stopped with SIGINT."""
    proc = subprocess.Popen([sys.executable, "-m", "armscope.cli", "run", "--bundle", str(BUNDLE),
                             "--source", "v4l2:///dev/video_armscope_absent", "--publish", "tcp://127.0.0.1:*",
                             "--control", "tcp://127.0.0.1:*", "--log-format", "text", *extra],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO,
                            env={k: v for k, v in {**os.environ, "PYTHONPATH": str(REPO)}.items()
                                 if k != "OPENCV_LOG_LEVEL"})
    lines = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            lines.append(line)
            if "state no_signal" in line or time.monotonic() > deadline:
                break
        time.sleep(settle_s)
        proc.send_signal(signal.SIGINT)
        lines.extend(proc.stderr)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines)


def test_run_without_a_camera_prints_no_opencv_log_lines_and_says_what_failed():
    err = _daemon_stderr()
    assert "state no_signal" in err, err[-3000:]
    assert "[ WARN" not in err, err[-3000:]
    # one warning from the capture thread, in words, naming the URI once
    failures = [line for line in err.splitlines() if "/dev/video_armscope_absent not found" in line]
    assert len(failures) == 1 and "backend 200" not in err, err[-3000:]
    assert failures[0].count("v4l2:///dev/video_armscope_absent") == 1, failures[0]
    # debug logging asks for OpenCV's own warnings back: the check above can see them when they are printed
    loud = _daemon_stderr("--log-level", "debug", settle_s=1.0)
    assert "[ WARN" in loud and "VIDEOIO(V4L2)" in loud, loud[-3000:]


@PROCFS
def test_unwritable_classify_outputs_name_the_path_given_and_the_cause(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    cases = [
        (["--overlay-dir", "/proc/armscope_ov"], "--overlay-dir /proc/armscope_ov: cannot create it: /proc does "
                                                 "not accept new files"),
        (["--json", "/proc/armscope.json"], "--json /proc/armscope.json: /proc does not accept new files"),
        (["--contact-sheet", "/proc/armscope.png"], "--contact-sheet /proc/armscope.png: /proc does not accept"),
        (["--overlay-dir", str(a_file / "ov")], f"--overlay-dir {a_file / 'ov'}: cannot create it: its parent "
                                                f"{a_file} is a file"),
    ]
    for extra, expected in cases:
        assert main(["classify", "--bundle", str(BUNDLE), FRAME, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert expected in err and ".tmp" not in err and "Errno" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing made, no probe left


@PROCFS
def test_staged_directory_and_png_display_refusals_name_the_output(tmp_path):
    from armscope.firmware_bridge.displays.base import DisplayURIError
    from armscope.firmware_bridge.displays.png import PngDisplay

    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(ArmscopeError) as exc:
        with staged_directory(a_file / "ov"):
            pass
    assert str(exc.value) == f"cannot create {a_file / 'ov'}: its parent {a_file} is a file"
    with pytest.raises(ArmscopeError, match=r"^cannot create /proc/armscope_ov: /proc does not accept new files"):
        with staged_directory(Path("/proc/armscope_ov")):
            pass
    with pytest.raises(DisplayURIError, match=r"^png:///proc/eye: cannot create /proc/eye: /proc does not accept"):
        PngDisplay("/proc/eye")
    with pytest.raises(DisplayURIError, match=f"its parent {a_file} is a file"):
        PngDisplay(a_file / "eye")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_staged_output_directories_honour_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "out" / "bundle"
        with staged_directory(out) as stage:
            (stage / "manifest.json").write_text("{}\n")
        plain = tmp_path / "plain"
        plain.mkdir()
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode == plain.stat().st_mode & 0o777
    assert (out / "manifest.json").stat().st_mode & 0o777 == file_mode
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle"]  # no staging sibling left


def test_classify_overlay_directory_is_readable_by_other_accounts(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert main(["classify", "--bundle", str(BUNDLE), FRAME, "--overlay-dir", str(tmp_path / "ov")]) == 0
    finally:
        os.umask(old)
    overlays = list((tmp_path / "ov").iterdir())
    assert overlays and (tmp_path / "ov").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in overlays)


def test_the_bundle_description_is_shown_by_inspect_and_classify(capsys):
    assert main(["inspect", str(BUNDLE)]) == 0
    assert "\nabout       DEMO ONLY, not a diagnostic model" in capsys.readouterr().out
    assert main(["classify", "--bundle", str(BUNDLE), FRAME]) == 0
    printed = capsys.readouterr()
    assert printed.err.startswith("model demo-tumour-vs-other: DEMO ONLY, not a diagnostic model")
    assert printed.out.startswith("image ")   # stdout: the results table only


def test_run_help_shows_the_choices_it_enforces(capsys):
    assert main(["run", "--help"]) == 0
    usage = capsys.readouterr().out
    for shown in ("--backend {auto,", "--layout {auto,merged,members}", "--log-format {text,json}",
                  "--log-level {debug,info,warning,error}", "--cam-dtype {", "--encoding {"):
        assert shown in usage, shown
