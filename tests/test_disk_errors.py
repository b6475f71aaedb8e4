"""No slide result lost to a disk error: slide records and snapshots written to
a real, small tmpfs filled up (ENOSPC from the kernel) and to a read-only
mount, through the SlideRecorder, the start-up check and the real daemon's
control socket. Needs permission to mount (root); skipped otherwise."""
from __future__ import annotations

import errno
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from armscope.core import protocol
from armscope.core.errors import ArmscopeError
from armscope.edge.slides import SlideRecorder
from armscope.edge.storage import check_output_dir

from daemon_support import OS_PORT, pick_bundle, wait_for


@contextmanager
def small_fs(path: Path, size: str, readonly: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write until the filesystem says ENOSPC; returns the filler file."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    try:                                   # and the last few blocks
        with open(directory / "filler2.bin", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    return filler


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    return pick_bundle(request)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


def test_slide_end_on_a_full_disk_keeps_the_slide(tmp_path):
    with small_fs(tmp_path / "fs", "256k") as fs:
        slides = SlideRecorder(fs / "slides", ["other", "tumour"])
        slides.start("S-2")
        slides.add([0.8, 0.2], "S-2")
        slides.add([0.4, 0.6], "S-2")
        fill(fs)
        with pytest.raises(ArmscopeError, match=r"No space left on device.*still running with its 2 frames"):
            slides.end({"model_id": "m"}, lambda p: {"label": "x", "score": float(p[1])})
        assert slides.slide_id == "S-2"
        assert leftovers(fs) == [] and not list((fs / "slides").glob("*.json"))
        slides.add([0.0, 1.0], "S-2")                  # the slide goes on counting
        for p in fs.glob("filler*"):
            p.unlink()
        record, path = slides.end({"model_id": "m"}, lambda p: {"label": "x", "score": float(p[1])})
        assert record["n_frames"] == 3 and record["probs"]["tumour"] == pytest.approx(0.6)
        assert path.is_file() and slides.slide_id is None and leftovers(fs) == []


def test_output_dirs_are_checked_at_start_up(tmp_path):
    check_output_dir("slides_dir", tmp_path / "not" / "yet" / "made")     # created later, by the first write
    assert not (tmp_path / "not").exists()
    with small_fs(tmp_path / "full", "1m") as fs:
        fill(fs)
        with pytest.raises(ArmscopeError, match=r"key 'snapshot_dir': .*MiB free .*at least 16 MiB"):
            check_output_dir("snapshot_dir", fs / "snaps")
    with small_fs(tmp_path / "ro", "1m", readonly=True) as fs:
        with pytest.raises(ArmscopeError, match=r"key 'slides_dir': .*cannot create files in .*Read-only file system"):
            check_output_dir("slides_dir", fs / "slides")


def test_daemon_refuses_to_start_with_an_unwritable_slides_dir(bundle_dir, tmp_path, capsys, camera_frames):
    from armscope.cli import main

    with small_fs(tmp_path / "ro", "1m", readonly=True) as fs:
        code = main(["run", "--bundle", str(bundle_dir), "--source", f"image://{camera_frames[0]}",
                     "--publish", OS_PORT, "--control", OS_PORT,
                     "--slides-dir", str(fs / "slides"), "--snapshot-dir", str(tmp_path / "snaps")])
    assert code == 2
    err = capsys.readouterr().err
    assert "key 'slides_dir'" in err and "Read-only file system" in err and "Traceback" not in err


def test_daemon_slide_end_and_snapshot_on_a_full_disk(bundle_dir, tmp_path, camera_frames):
    from armscope.edge.config import load_config
    from armscope.edge.daemon import Daemon

    with small_fs(tmp_path / "fs", "20m") as fs:
        config = load_config(None, dict(
            bundle=str(bundle_dir), source=f"image://{camera_frames[1]}?fps=5", publish=OS_PORT,
            control=OS_PORT, threads=2, heartbeat_hz=5.0, stale_after_ms=30000,
            slides_dir=str(fs / "slides"), snapshot_dir=str(fs / "snapshots")))
        daemon = Daemon(config)
        result = {}
        runner = threading.Thread(target=lambda: result.setdefault("rc", daemon.run(install_signals=False)),
                                  daemon=True)

        def ctl(command):
            return protocol.control_request(command, daemon.endpoints["control"], timeout_ms=10000)

        runner.start()
        try:
            assert daemon.bound.wait(60), "the daemon did not bind its sockets"
            with protocol.Subscriber(daemon.endpoints["publish"], topics=["overlay"]) as sub:
                wait_for(sub, lambda m: True, 60)
                assert ctl("slide start S-2")["ok"]
                wait_for(sub, lambda m: m.header["slide_id"] == "S-2", 60)
                fill(fs)
                ended = ctl("slide end")
                assert ended["ok"] is False
                assert "No space left on device" in ended["error"] and "still running" in ended["error"]
                assert ctl("status")["slide_id"] == "S-2"
                snap = ctl("snapshot")
                assert snap["ok"] is False and "No space left on device" in snap["error"]
                assert leftovers(fs) == []
                assert not (fs / "snapshots").exists() or not any((fs / "snapshots").iterdir())
                for p in fs.glob("filler*"):
                    p.unlink()
                ended = ctl("slide end")
                assert ended["ok"], ended
                assert ended["slide"]["n_frames"] >= 1 and Path(ended["record"]).is_file()
                assert ctl("snapshot")["ok"]
                assert ctl("status")["slide_id"] is None
        finally:
            daemon.request_stop("test over")
            runner.join(60)
        assert result.get("rc") == 0
