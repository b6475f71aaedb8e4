"""``armscope bench`` on a source that never delivers a frame (the default
``v4l2:///dev/video0`` on a machine without a camera) stops with one error
naming the source and ``--source``, exit 2, within seconds of the model being
loaded, instead of retrying the camera for minutes."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from repo_paths import DEMO_BUNDLE, REPO

pytestmark = pytest.mark.skipif(not (DEMO_BUNDLE / "manifest.json").is_file(), reason="no samples/demo_bundle")


@pytest.mark.parametrize("source", [None, "v4l2:///dev/armscope-no-such-camera"])
def test_bench_without_frames_stops_with_one_error(source, tmp_path):
    if source is None and Path("/dev/video0").exists():
        pytest.skip("this machine has /dev/video0: the default source may deliver frames")
    argv = [sys.executable, "-m", "armscope.cli", "bench", "--bundle", str(DEMO_BUNDLE), "--frames", "5",
            "--json", str(tmp_path / "bench.json")]
    if source:
        argv += ["--source", source]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=110)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    shown = source or "v4l2:///dev/video0"
    assert len(errors) == 1 and f"no frames from {shown} in 10 s" in errors[0] and "--source" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 100   # before, the bench waited at least 120 s for overlays that could not come
    assert not (tmp_path / "bench.json").exists()
