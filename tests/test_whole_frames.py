"""Only whole frames are classified: strict decoding of real H&E JPEGs and PNGs
(spliced, truncated, damaged), a dir:// source that waits for files still
being written, the dir:// loop semantics on the real capture thread, and the
real daemon under a writer that rewrites frames in place."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from armscope.core.errors import ArmscopeError
from armscope.core.imagefile import CorruptImage, NotAnImage, decode_image, read_image_file
from armscope.core.preprocess import load_image
from armscope.edge.pipeline import LatestSlot
from armscope.edge.capture import Capture
from armscope.edge.sources import CorruptFrame, SourceLost, open_source, parse_source



def _bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def _splices(frames):
    """A shorter JPEG written over a longer one without truncating: half-way (the
    writer still busy) and complete (the old file's tail left behind)."""
    a, b = sorted((_bytes(p) for p in frames[:2]), key=len)
    return {"half": a[: len(a) // 2] + b[len(a) // 2:], "complete": a + b[len(a):]}


def test_plain_opencv_decodes_a_splice_without_an_error(camera_frames):
    # Why the strict decoder exists: OpenCV returns a full-size image for both.
    for data in _splices(camera_frames).values():
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.shape == (1200, 1600, 3)


def test_strict_decoding_refuses_spliced_truncated_and_damaged_files(camera_frames, capfd):
    for path in camera_frames:
        assert decode_image(_bytes(path), str(path)).shape == (1200, 1600, 3)
    splices = _splices(camera_frames)
    with pytest.raises(CorruptImage, match=r"x\.jpg: corrupt JPEG: Corrupt JPEG data"):
        decode_image(splices["half"], "x.jpg")          # caught by libjpeg's own warning
    with pytest.raises(CorruptImage, match="bytes after the end-of-image marker"):
        decode_image(splices["complete"], "x.jpg")
    data = _bytes(camera_frames[1])
    for cut in (len(data) // 3, len(data) - 2, 100):
        with pytest.raises(CorruptImage, match="truncated"):
            decode_image(data[:cut], "x.jpg")
    with pytest.raises(NotAnImage, match="not a readable image"):
        decode_image(b"GIF89a....", "x.gif")
    # the decoder's warnings were caught, not printed on the user's terminal
    assert "Corrupt JPEG" not in capfd.readouterr().err

    ok, png = cv2.imencode(".png", cv2.imread(str(camera_frames[0]))[:300, :400])
    png = png.tobytes()
    assert decode_image(png, "x.png").shape == (300, 400, 3)
    for bad, needle in ((png[: len(png) // 2], "truncated"), (png + png[:50], "after the IEND"),
                        (png[:200] + bytes([png[200] ^ 0x10]) + png[201:], "bad CRC")):
        with pytest.raises(CorruptImage, match=needle):
            decode_image(bad, "x.png")


def test_other_output_during_a_decode_still_reaches_stderr(camera_frames, capfd, monkeypatch):
    """Descriptor 2 is redirected only while a frame decodes; what another thread
    writes in that window (a log line, even one quoting a decoder warning) is
    passed on and does not make the frame corrupt."""
    import armscope.core.imagefile as imagefile

    real = cv2.imdecode

    def decode_while_another_thread_logs(data, flags):
        os.write(2, b"2024-01-01 WARNING armscope.edge.sources: skipped (x.jpg: Corrupt JPEG data: 3 bytes)\n")
        return real(data, flags)

    monkeypatch.setattr(imagefile.cv2, "imdecode", decode_while_another_thread_logs)
    assert decode_image(_bytes(camera_frames[0]), "a.jpg").shape == (1200, 1600, 3)
    assert "WARNING armscope.edge.sources: skipped (x.jpg: Corrupt JPEG data: 3 bytes)" in capfd.readouterr().err


def test_restart_markers_out_of_order_are_a_splice(camera_frames):
    image = cv2.imread(str(camera_frames[1]))
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])
    data = bytearray(data.tobytes())
    assert decode_image(bytes(data), "r.jpg").shape == image.shape
    rst = [i for i in range(len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]
    del data[rst[10]: rst[13]]                     # three restart intervals of the bitstream missing
    with pytest.raises(CorruptImage, match="RST|Corrupt JPEG data"):
        decode_image(bytes(data), "r.jpg")


def test_load_image_is_strict_and_names_the_file(camera_frames, tmp_path):
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(_bytes(camera_frames[0])[:50000])
    with pytest.raises(CorruptImage, match="cut.jpg: corrupt JPEG"):
        load_image(bad)
    with pytest.raises(ArmscopeError, match="no such image file"):
        read_image_file(tmp_path / "missing.jpg")


def test_dir_source_counts_splices_and_cut_files_as_corrupt(camera_frames, tmp_path):
    shutil.copy(camera_frames[0], tmp_path / "a.jpg")
    splices = _splices(camera_frames)
    (tmp_path / "b.jpg").write_bytes(splices["half"])
    (tmp_path / "c.jpg").write_bytes(splices["complete"])
    (tmp_path / "d.jpg").write_bytes(_bytes(camera_frames[2])[:-5000])
    source = open_source(f"dir://{tmp_path}?fps=max&settle_ms=0")
    source.open()
    assert source.read().shape == (1200, 1600, 3)
    for name in "bcd":
        with pytest.raises(CorruptFrame, match=f"{name}.jpg"):
            source.read()
    with pytest.raises(SourceLost, match="ended"):
        source.read()


def test_dir_source_waits_for_a_fresh_file_and_skips_one_still_written(camera_frames, tmp_path):
    assert parse_source(f"dir://{tmp_path}?settle_ms=300").params["settle_ms"] == "300"
    for bad in ("x", "-1", "60001"):
        with pytest.raises(ArmscopeError, match="settle_ms"):
            parse_source(f"dir://{tmp_path}?settle_ms={bad}")
    data = _bytes(camera_frames[1])
    target = tmp_path / "f.jpg"
    target.write_bytes(data)
    source = open_source(f"dir://{tmp_path}?fps=max&settle_ms=400")
    source.open()
    t0 = time.monotonic()
    assert source.read().shape == (1200, 1600, 3)   # whole, once it had been left alone for 400 ms
    assert time.monotonic() - t0 >= 0.3

    # A writer that is still appending to the file: never read while it changes.
    target.write_bytes(data[:10000])
    stop = threading.Event()

    def slow_writer():
        with open(target, "ab") as f:
            for start in range(10000, len(data), 20000):
                if stop.is_set():
                    return
                f.write(data[start: start + 20000])
                f.flush()
                time.sleep(0.1)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    try:
        source = open_source(f"dir://{tmp_path}?fps=max&settle_ms=400")
        source.open()
        with pytest.raises(CorruptFrame, match="still being written"):
            source.read()
    finally:
        stop.set()
        writer.join()


class _Recorder:
    def __init__(self):
        self.signals, self.ended = [], 0

    def on_signal(self, ok, reason):
        self.signals.append((ok, reason))

    def on_end(self):
        self.ended += 1


def _capture(uri, exit_on_end=False):
    stop, rec = threading.Event(), _Recorder()
    capture = Capture(parse_source(uri), LatestSlot(), stop, on_signal=rec.on_signal, on_end=rec.on_end,
                      backoff_min=0.05, backoff_max=0.2, exit_on_end=exit_on_end)
    capture.start()
    return capture, stop, rec


def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_loop0_ends_once_with_a_single_no_signal(camera_frames, tmp_path):
    for p in camera_frames[:2]:
        shutil.copy(p, tmp_path / p.name)
    capture, stop, rec = _capture(f"dir://{tmp_path}?fps=50&settle_ms=0")
    try:
        assert _until(lambda: capture.captured == 2 and rec.signals[-1:] == [(False, "source ended")])
        time.sleep(1.0)          # many backoff periods: a replay would have shown by now
        assert capture.captured == 2
        assert rec.signals == [(True, None), (False, "source ended")]
        assert capture.is_alive() and rec.ended == 0   # waits (exit_on_source_end is off)
    finally:
        stop.set()
        capture.join(5)
    capture, stop, rec = _capture(f"dir://{tmp_path}?fps=50&settle_ms=0", exit_on_end=True)
    capture.join(10)
    assert not capture.is_alive() and rec.ended == 1 and capture.captured == 2


def test_loop1_relists_and_an_emptied_folder_is_no_signal(camera_frames, tmp_path):
    shutil.copy(camera_frames[0], tmp_path / "a.jpg")
    capture, stop, rec = _capture(f"dir://{tmp_path}?fps=20&loop=1&settle_ms=0")
    try:
        assert _until(lambda: capture.captured >= 3)
        shutil.copy(camera_frames[1], tmp_path / "b.jpg")        # a file added is seen on the next pass
        assert _until(lambda: capture.latest is not None and capture.latest.image.mean() != 0
                      and np.array_equal(capture.latest.image, cv2.imread(str(camera_frames[1]))))
        for p in tmp_path.iterdir():                             # the camera tool deleted everything
            p.unlink()
        assert _until(lambda: rec.signals[-1][0] is False)   # "no whole image in a pass", then "open failed"
        captured = capture.captured
        time.sleep(0.8)
        assert capture.captured == captured and rec.signals[-1][0] is False
        assert capture.corrupt == 0                              # deleted files are gone, not corrupt
        # a folder of nothing but damaged files is no_signal too, not running
        (tmp_path / "x.jpg").write_bytes(_bytes(camera_frames[2])[:30000])
        assert _until(lambda: capture.corrupt >= 2)
        assert rec.signals[-1][0] is False and capture.captured == captured
        shutil.copy(camera_frames[3], tmp_path / "y.jpg")        # and recovers when a whole frame is back
        assert _until(lambda: capture.captured > captured and rec.signals[-1] == (True, None))
    finally:
        stop.set()
        capture.join(5)
    assert not capture.is_alive()


# ---------------------------------------------------------------- the real daemon


@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    from daemon_support import pick_bundle

    return pick_bundle(request)


def _rewrite_in_place(path: Path, data: bytes, chunk: int = 65536, pause: float = 0.004) -> None:
    """What a careless camera tool does: open the existing file without truncating it
    and write the new frame over it, in chunks."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for start in range(0, len(data), chunk):
            os.write(fd, data[start: start + chunk])
            time.sleep(pause)
    finally:
        os.close(fd)


def test_daemon_never_classifies_a_frame_rewritten_in_place(bundle_dir, camera_frames, tmp_path):
    from armscope.core import protocol
    from armscope.core.preprocess import crop_box
    from armscope.edge.config import load_config
    from armscope.edge.daemon import Daemon
    from armscope.core.tissue import TissueGate

    from daemon_support import OS_PORT

    frames = tmp_path / "cam"
    frames.mkdir()
    contents = [_bytes(p) for p in camera_frames[:2]]      # 287 KB and 469 KB: the short one leaves a tail
    whole = []
    for p in camera_frames[:2]:
        image = cv2.imread(str(p))
        top, left, size = crop_box(image.shape, Daemon.__init__.__globals__["load_bundle"](bundle_dir).preprocessing)
        whole.append(TissueGate().measure(image[top:top + size, left:left + size]))
    assert whole[0] != whole[1]
    target = frames / "live.jpg"
    target.write_bytes(contents[1])
    stop = threading.Event()

    def careless_writer():
        i = 0
        while not stop.is_set():
            _rewrite_in_place(target, contents[i % 2])
            i += 1
            stop.wait(0.15)

    config = load_config(None, dict(
        bundle=str(bundle_dir), source=f"dir://{frames}/?fps=20&loop=1&settle_ms=0", publish=OS_PORT,
        control=OS_PORT, threads=2, heartbeat_hz=5.0, reconnect_min_s=0.05, reconnect_max_s=0.2,
        stale_after_ms=30000, slides_dir=str(tmp_path / "slides"), snapshot_dir=str(tmp_path / "snaps")))
    daemon = Daemon(config)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("rc", daemon.run(install_signals=False)), daemon=True)
    writer = threading.Thread(target=careless_writer, daemon=True)
    overlays = []
    runner.start()
    writer.start()
    try:
        assert daemon.bound.wait(60), "the daemon did not bind its sockets"
        with protocol.Subscriber(daemon.endpoints["publish"], topics=["overlay"]) as sub:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (len(overlays) < 4 or daemon.capture.corrupt < 10):
                message = sub.recv(1000)
                if message is not None:
                    overlays.append(message.header["measures"])
    finally:
        stop.set()
        writer.join(5)
        daemon.request_stop("test over")
        runner.join(60)
    assert result.get("rc") == 0
    # every overlay shown came from one of the two whole frames, none from a mix of them
    assert all(m in whole for m in overlays), [m for m in overlays if m not in whole]
    assert len(overlays) >= 4
    assert daemon.capture.corrupt >= 10, "the writer never produced a damaged frame to refuse"
