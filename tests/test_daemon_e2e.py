"""End to end, in process: the real daemon (bundle, ONNX Runtime, threads,
ZeroMQ on 127.0.0.1) on a real H&E video, watched by a real subscriber and
driven through the real control socket; then the faults that must not hurt
it (subscribers that die or never read, corrupt frames, a source that
vanishes and comes back). Every wait is bounded."""
from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from armscope.core import protocol
from armscope.core.preprocess import crop_box
from armscope.core.decision import decide
from armscope.firmware_bridge.render import camera_to_display_matrix, render_cam_for_display

from daemon_support import free_endpoint, make_pan_video, pick_bundle, running, wait_for

pytestmark = pytest.mark.e2e   # a real daemon on real sockets

@pytest.fixture(scope="module")
def bundle_dir(request) -> Path:
    return pick_bundle(request)


@pytest.fixture(scope="module")
def pan_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "pan.avi"
    sigmas = make_pan_video(path, n_frames=36, size=(1280, 1024), fps=5.0, blur=(14, 24, 9.0))
    return path, sigmas


def ctl(daemon, command, timeout_ms=5000):
    return protocol.control_request(command, daemon.endpoints["control"], timeout_ms=timeout_ms)


@pytest.mark.slow
def test_pan_video_end_to_end(bundle_dir, pan_video, tmp_path):
    video, sigmas = pan_video
    messages, received = [], []
    with running(bundle_dir, f"file://{video}", tmp_path) as daemon:
        sub = protocol.Subscriber(daemon.endpoints["publish"])   # bound before the model loads: no frame missed
        first, seen = wait_for(sub, lambda m: True, 60, topic="overlay")
        messages += seen
        received += [time.monotonic()] * len(seen)
        started = ctl(daemon, "slide start S-E2E")
        assert started["ok"] and started["slide_id"] == "S-E2E"
        snap = ctl(daemon, "snapshot")
        assert snap["ok"], snap
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            message = sub.recv(1000)
            if message is None:
                continue
            messages.append(message)
            received.append(time.monotonic())
            if message.topic == "status" and message.header["state"] == protocol.STATE_NO_SIGNAL:
                break
        else:
            pytest.fail("no no_signal status after the video ended")
        status = ctl(daemon, "status")
        ended = ctl(daemon, "slide end")
        assert ctl(daemon, "slide end")["ok"] is False
    sub.close()

    overlays = [(m, r) for m, r in zip(messages, received) if m.topic == "overlay"]
    statuses = [m for m in messages if m.topic == "status"]
    assert len(overlays) >= 4, f"only {len(overlays)} overlays from a 36-frame video"

    # Order: frame ids strictly increase, sequence numbers strictly increase over both topics.
    ids = [m.header["frame_id"] for m, _ in overlays]
    assert ids == sorted(set(ids))
    seqs = [m.header["seq"] for m in messages]
    assert seqs == sorted(set(seqs))
    assert len({m.header["run_id"] for m in messages}) == 1

    manifest_task = daemon.bundle.task
    box = crop_box((1024, 1280, 3), daemon.spec)
    for message, recv_mono in overlays:
        h = message.header
        c = h["cam"]   # protocol v2: the CAM as data, over the crop (the bridge draws it)
        assert c["box"] == {"x": box[1], "y": box[0], "size": box[2]} and c["dtype"] == "float16"
        assert len(message.payload) == c["classes"] * c["height"] * c["width"] * 2 == h["payload_bytes"] < 4096
        maps = protocol.cam_array(message)
        assert maps.shape == (c["classes"], c["height"], c["width"]) and c["index"] == h["decision"]["index"]
        assert c["peak"] == pytest.approx(float(maps[c["index"]].max()), rel=2e-3)   # float16 on the wire
        assert h["region"] == {"frame_width": 1280, "frame_height": 1024, "x": box[1], "y": box[0], "size": box[2]}
        assert h["classes"] == daemon.classes and sum(h["probs"]) == pytest.approx(1.0, abs=1e-3)
        expected = decide(np.array(h["probs"]), manifest_task)
        assert h["decision"]["label"] == expected["label"]
        assert h["capture_mono"] < h["publish_mono"] <= recv_mono
        assert h["publish_mono"] - h["capture_mono"] < 10.0          # generous: 2 shared cores
        assert recv_mono - h["publish_mono"] < 2.0
        assert set(h["latency_ms"]) == {"queue", "preprocess", "inference", "render", "total"}
        assert h["model_id"] == daemon.model_id and h["stale_after_ms"] == daemon.stale_after_ms >= 1500
        # The strongly defocused frames (sigma >= 5) must never be classified.
        assert sigmas[h["frame_id"] - 1] < 5.0, f"frame {h['frame_id']} is blurred but was classified"

    # The last overlay drawn as the bridge draws it (display = the camera frame, no registration).
    last = overlays[-1][0]
    c, region = last.header["cam"], last.header["region"]
    image, _ = render_cam_for_display(protocol.cam_array(last)[c["index"]], (c["peak"], c["threshold"]),
                                      (c["box"]["x"], c["box"]["y"], c["box"]["size"]), region,
                                      camera_to_display_matrix(region, None, (1280, 1024)), (1280, 1024),
                                      max_alpha=c["max_alpha"])
    lit = image.max(axis=2)
    assert (lit == 0).any() and ((lit > 20) & (lit < 255)).any()          # hot and see-through parts
    assert np.any(np.all(image == 255, axis=-1)), "no white focus outline"
    assert last.header["focus_bbox"] is not None

    # State changes: running, then out of focus, then running again, then the source ends.
    changes = [(m.header["state"], m.header["reason"]) for m in statuses if not m.header["heartbeat"]]
    running_at = changes.index(("running", None))
    blurred_at = changes.index(("no_tissue", "out_of_focus"), running_at)
    assert ("running", None) in changes[blurred_at:]
    assert changes[-1] == ("no_signal", "source ended")
    beats = [m.header["publish_mono"] for m in statuses if m.header["heartbeat"]]
    assert len(beats) >= 10 and np.median(np.diff(beats)) == pytest.approx(0.2, abs=0.08)

    # Slide record: the mean over the slide's frames.
    slide_overlays = [m for m, _ in overlays if m.header["slide_id"] == "S-E2E"]
    record = ended["slide"]
    assert ended["ok"] and Path(ended["record"]).is_file()
    assert json.loads(Path(ended["record"]).read_text()) == record
    assert len(slide_overlays) <= record["n_frames"] <= daemon.published
    if record["n_frames"] == len(slide_overlays):
        mean = np.mean([m.header["probs"] for m in slide_overlays], axis=0)
        assert list(record["probs"].values()) == pytest.approx(mean.tolist(), abs=1e-5)

    # Snapshot: frame, overlay and header of a published overlay.
    files = [Path(p) for p in snap["files"]]
    assert [p.name.split("_")[-1] for p in files] == ["frame.png", "overlay.png", "header.json"]
    assert json.loads(files[2].read_text())["frame_id"] in ids

    metrics = status["metrics"]
    assert status["state"] == "no_signal" and metrics["frames_captured"] == 36
    assert metrics["no_tissue"] >= 3 and metrics["frames_published"] <= daemon.published  # one may be in flight
    e2e = metrics["latency_ms"]["capture_to_publish"]
    assert abs(e2e["n"] - metrics["frames_published"]) <= 1 and e2e["p50"] <= e2e["p95"] <= e2e["p99"]


def test_control_commands(bundle_dir, camera_frames, tmp_path):
    source = f"dir://{camera_frames[0].parent}/?fps=6&loop=1"
    sub = None
    try:
        http = free_endpoint().removeprefix("tcp://")   # HTTP, not ZeroMQ: no OS-chosen port to ask for
        with running(bundle_dir, source, tmp_path, overlay_size=256, encoding="png",
                     rendered_topic=True, metrics_http=http) as daemon:
            sub = protocol.Subscriber(daemon.endpoints["publish"], topics=protocol.TOPICS,
                                      rcvbuf=1 << 20)   # rendered too: opt-in bitmaps
            wait_for(sub, lambda m: True, 60, topic="overlay")
            import urllib.request

            # The daemon records a frame's latencies just after it sends it, so the subscriber can see the
            # overlay a moment before /metrics counts it: poll briefly rather than race.
            from prometheus_client.parser import text_string_to_metric_families

            deadline = time.monotonic() + 5
            while True:
                text = urllib.request.urlopen(f"http://{http}/metrics", timeout=5).read().decode()
                samples = {(s.name, s.labels.get("stage"), s.labels.get("quantile", s.labels.get("le"))): s.value
                           for f in text_string_to_metric_families(text) for s in f.samples}
                e2e_count = samples[("armscope_stage_latency_seconds_count", "capture_to_publish", None)]
                if e2e_count >= 1 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert e2e_count >= 1  # the counters are read a moment before the histogram: one frame may fall between
            assert abs(samples[("armscope_frames_published_total", None, None)] - e2e_count) <= 1
            e2e_sum = samples[("armscope_stage_latency_seconds_sum", "capture_to_publish", None)]
            assert 0 < e2e_sum / e2e_count < 60  # seconds, not milliseconds
            assert samples[("armscope_stage_latency_seconds_bucket", "capture_to_publish", "+Inf")] == e2e_count
            assert 0 < samples[("armscope_latency_window_seconds", "capture_to_publish", "0.95")] < 60
            assert ctl(daemon, {"cmd": "threshold", "args": ["0"]})["threshold"] == 0.0
            message, _ = wait_for(sub, lambda m: m.header["decision"]["threshold"] == 0.0, 30, topic="overlay")
            assert message.header["decision"]["positive"] is True
            # the opt-in rendered topic: the same frame's decision beside its bitmap, PNG as configured
            bitmap, _ = wait_for(sub, lambda m: m.header["frame_id"] >= message.header["frame_id"], 30,
                                 topic="rendered")
            assert bitmap.header["decision"]["threshold"] == 0.0 and bitmap.header["decision"]["positive"] is True
            assert bitmap.header["encoding"] == "png" and protocol.overlay_image(bitmap).shape == (256, 256, 4)
            assert ctl(daemon, "threshold reset")["threshold"] == daemon.bundle.task.get("threshold")
            for bad in ("threshold 1.5", "threshold nan", "threshold x", "slide start ../x", "slide", "fly", "status now"):
                reply = ctl(daemon, bad)
                assert reply["ok"] is False and reply["error"], bad
            assert ctl(daemon, "pause")["state"] == "paused"
            wait_for(sub, lambda m: m.header["state"] == "paused", 10, topic="status")
            sub.recv(1500)                       # at most the frame that was already being rendered
            t_end = time.monotonic() + 1.5
            late = []
            while time.monotonic() < t_end:
                m = sub.recv(200)
                if m is not None and m.topic in ("overlay", "rendered"):
                    late.append(m)
            assert late == [], "overlays published while paused"
            assert ctl(daemon, "status")["paused"] is True
            assert ctl(daemon, "resume")["ok"]
            wait_for(sub, lambda m: True, 30, topic="overlay")
            assert ctl(daemon, "help")["commands"]
    finally:
        if sub is not None:
            sub.close()


def test_slow_dead_and_late_subscribers_do_not_slow_the_daemon(bundle_dir, camera_frames, tmp_path):
    ctx = zmq.Context()
    never_reads = ctx.socket(zmq.SUB)           # default RCVHWM, subscribed to everything, never reads
    never_reads.setsockopt(zmq.SUBSCRIBE, b"")
    never_reads.setsockopt(zmq.LINGER, 0)
    try:
        with running(bundle_dir, f"image://{camera_frames[1]}?fps=8", tmp_path) as daemon:
            publish = daemon.endpoints["publish"]
            never_reads.connect(publish)        # before the model is loaded: before the first overlay
            with protocol.Subscriber(publish, topics=["overlay"]) as first:
                wait_for(first, lambda m: True, 60)
                last, _ = wait_for(first, lambda m: True, 30)
            killed_at = time.monotonic()
            time.sleep(2.0)                      # the daemon keeps publishing into the void
            with protocol.Subscriber(publish, topics=["overlay"]) as again:
                newest, _ = wait_for(again, lambda m: True, 30)
                received = time.monotonic()
            # The restarted subscriber gets a fresh overlay, not a backlog from before it joined.
            assert newest.header["frame_id"] > last.header["frame_id"]
            assert newest.header["capture_mono"] > killed_at
            assert received - newest.header["publish_mono"] < 1.0
            metrics = ctl(daemon, "status")["metrics"]
            assert metrics["frames_published"] >= 3
            assert metrics["latency_ms"]["publish"]["p99"] < 250, "sending blocked on a subscriber"
    finally:
        never_reads.close(0)
        ctx.term()


def test_corrupt_frames_are_skipped_and_counted(bundle_dir, camera_frames, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(camera_frames[0], frames / "f0.jpg")
    (frames / "f1.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage, truncated jpeg" + bytes(100))
    shutil.copy(camera_frames[2], frames / "f2.jpg")
    (frames / "f3.jpg").write_bytes(b"")
    with running(bundle_dir, f"dir://{frames}/?fps=8&loop=1", tmp_path) as daemon:
        with protocol.Subscriber(daemon.endpoints["publish"]) as sub:
            wait_for(sub, lambda m: True, 60, topic="overlay")
            wait_for(sub, lambda m: m.header["detail"]["corrupt"] >= 4, 30, topic="status")
            before = daemon.published
            wait_for(sub, lambda m: daemon.published >= before + 2, 30, topic="overlay")
            status = ctl(daemon, "status")
            assert status["state"] == "running"
            assert status["metrics"]["corrupt"] >= 4 and status["metrics"]["frames_captured"] >= 4


def test_source_vanishes_and_comes_back(bundle_dir, camera_frames, tmp_path):
    frames = tmp_path / "cam"
    frames.mkdir()
    for p in camera_frames[:2]:
        shutil.copy(p, frames / p.name)
    with running(bundle_dir, f"dir://{frames}/?fps=8&loop=1", tmp_path) as daemon:
        with protocol.Subscriber(daemon.endpoints["publish"]) as sub:
            wait_for(sub, lambda m: True, 60, topic="overlay")
            frames.rename(tmp_path / "unplugged")
            lost, _ = wait_for(sub, lambda m: m.header["state"] == "no_signal", 15, topic="status")
            assert lost.header["heartbeat"] is False
            time.sleep(1.5)                      # several reconnect attempts with backoff, no crash
            assert ctl(daemon, "status")["state"] == "no_signal"
            (tmp_path / "unplugged").rename(frames)
            wait_for(sub, lambda m: m.header["state"] == "running", 60, topic="status")
            wait_for(sub, lambda m: True, 30, topic="overlay")
            metrics = ctl(daemon, "status")["metrics"]
            assert metrics["reconnects"] >= 1
            assert sum(t.name == "capture" for t in threading.enumerate()) == 1, "capture thread leaked"
