"""Daemon building blocks without a model: the protocol schema, control
request parsing, CurveZMQ key files, config validation (errors name the key),
source URIs, the newest-wins slot, the tissue/focus gate on real H&E, slide
records and metrics. Each runs in well under a second."""
from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest

from armscope.core import protocol
from armscope.core.errors import ArmscopeError
from armscope.edge.config import load_config
from armscope.edge.metrics import LatencyWindow, Metrics, OverlayGapWatch, prometheus_text
from prometheus_client.parser import text_string_to_metric_families
from armscope.edge.pipeline import LatestSlot, SlotClosed
from armscope.edge.slides import SlideRecorder
from armscope.edge.sources import gstreamer_csi_pipeline, open_source, parse_source, resolve_relative
from armscope.core.tissue import TissueGate

from daemon_support import OS_PORT


def _overlay_header(w=4, h=3, encoding="raw"):
    return {"run_id": "r", "seq": 1, "publish_mono": 1.0, "publish_wall": 2.0, "model_id": "m@0", "slide_id": None,
            "stale_after_ms": 1000, "encoding": encoding, "frame_id": 7, "capture_mono": 0.5, "capture_wall": 1.5,
            "classes": ["other", "tumour"], "probs": [0.25, 0.75],
            "decision": {"label": "tumour", "index": 1, "score": 0.75}, "width": w, "height": h,
            "format": "RGBA8", "region": {"frame_width": 10, "frame_height": 10, "x": 0, "y": 0, "size": 10}}


def test_overlay_roundtrip_raw_and_png():
    rgba = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    frames = protocol.encode(protocol.TOPIC_RENDERED, _overlay_header(), rgba.tobytes())
    assert frames[0] == b"rendered" and len(frames) == 3
    message = protocol.decode(frames)
    assert message.header["schema"] == protocol.SCHEMA_VERSION and message.header["payload_bytes"] == 48
    assert np.array_equal(protocol.overlay_image(message), rgba)
    assert message.latency_ms() == pytest.approx(500.0)
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    message = protocol.decode(protocol.encode("rendered", _overlay_header(encoding="png"), png.tobytes()))
    assert np.array_equal(protocol.overlay_image(message), rgba)


@pytest.mark.parametrize("mutate, needle", [
    (lambda f: f[:2], "expected 3 frames"),
    (lambda f: [b"video", *f[1:]], "topic"),
    (lambda f: [f[0], b"{not json", f[2]], "not UTF-8 JSON"),
    (lambda f: [f[0], f[1], f[2][:-1]], "payload_bytes"),
    (lambda f: [f[0], f[1].replace(b'"schema":2', b'"schema":1'), f[2]], "schema"),
    (lambda f: [f[0], f[1].replace(b'"width":4', b'"width":5'), f[2]], "width/height"),
    (lambda f: [f[0], f[1].replace(b'"frame_id":7,', b""), f[2]], "frame_id"),
])
def test_decode_rejects_malformed_messages(mutate, needle):
    frames = protocol.encode("rendered", _overlay_header(), bytes(48))
    with pytest.raises(protocol.ProtocolError, match=needle):
        protocol.decode(mutate(frames))


def test_staleness_is_measured_from_receipt():
    message = protocol.decode(protocol.encode("rendered", dict(_overlay_header(), stale_after_ms=200), bytes(48)))
    assert not message.is_stale(received_mono=10.0, now_mono=10.1)
    assert message.is_stale(received_mono=10.0, now_mono=10.3)


def test_parse_command_text_and_json():
    assert protocol.parse_command(b"  Slide start S-1 ") == ("slide", ["start", "S-1"])
    assert protocol.parse_command(b'{"cmd": "threshold", "args": [0.4]}') == ("threshold", ["0.4"])
    for bad, needle in [(b"", "empty"), (b"{", "invalid JSON"), (b'{"args": []}', "cmd"), (b"\xff", "UTF-8")]:
        with pytest.raises(protocol.ProtocolError, match=needle):
            protocol.parse_command(bad)


def test_keys_are_zpl_certificates_and_curve_works(tmp_path):
    server_pub, server_sec = protocol.write_keypair(tmp_path, "server")
    client_pub, client_sec = protocol.write_keypair(tmp_path, "client")
    assert oct(server_sec.stat().st_mode & 0o777) == "0o600"
    import zmq.auth

    assert zmq.auth.load_certificate(str(server_sec)) == protocol.load_keypair(server_sec)
    assert protocol.load_keypair(server_pub)[1] is None
    with pytest.raises(ArmscopeError, match="already exists"):
        protocol.write_keypair(tmp_path, "server")
    # A CURVE PUB/SUB pair over real TCP with those files.
    from armscope.edge.publisher import setup_curve_server

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    setup_curve_server(ctx, [pub], str(server_sec), "")
    pub.bind(OS_PORT)
    endpoint = pub.getsockopt(zmq.LAST_ENDPOINT).decode()   # the port the OS chose
    try:
        with protocol.Subscriber(endpoint, context=ctx, topics=protocol.TOPICS,
                                 curve={"server_public": server_pub, "client_secret": client_sec}) as sub:
            deadline = time.monotonic() + 5
            got = None
            while got is None and time.monotonic() < deadline:
                pub.send_multipart(protocol.encode("rendered", _overlay_header(), bytes(48)))
                got = sub.recv(100)
            assert got is not None and got.header["frame_id"] == 7
    finally:
        pub.close(0)
        ctx.term()


def _write(tmp_path, text):
    path = tmp_path / "edge.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ('heartbeat_hz = 0\n', "heartbeat_hz"),
    ('threads = "two"\n', "threads"),
    ('encoding = "jpeg"\n', "encoding"),
    ('publish = "127.0.0.1:5556"\n', "publish"),
    ('min_tissue_fraction = 1.5\n', "min_tissue_fraction"),
    ('exit_on_source_end = 1\n', "exit_on_source_end"),
    ('sourse = "file://x.avi"\n', "sourse"),
    ('source = "webcam://0"\n', "source"),
    ('source = "dir://frames/?fps=fast"\n', "source"),
    ('reconnect_min_s = 5.0\nreconnect_max_s = 1.0\n', "reconnect_max_s"),
    ('metrics_http = "localhost"\n', "metrics_http"),
    ('control = "tcp://127.0.0.1:5556"\n', "control"),
    ('threshold = nan\n', "threshold"),          # TOML has nan; it would decide every field "other"
    ('threshold = -0.5\n', "threshold"),         # only -1 means "the manifest's"
    ('max_alpha = inf\n', "max_alpha"),
])
def test_bad_config_values_name_the_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ArmscopeError) as info:
        load_config(path)
    assert repr(key) in str(info.value) and str(path) in str(info.value)


def test_config_file_flags_and_relative_paths(tmp_path):
    path = _write(tmp_path, '[edge]\nbundle = "b"\nsource = "dir://frames/?fps=5"\nthreshold = 0.4\n')
    config = load_config(path, {"threshold": 0.6, "publish": None})
    assert config.bundle == str(tmp_path / "b")
    assert config.source == f"dir://{tmp_path}/frames/?fps=5"
    assert config.threshold == 0.6                         # flag beats file
    assert config.publish == protocol.DEFAULT_PUBLISH      # unset flag keeps the default
    with pytest.raises(ArmscopeError, match="not valid TOML"):
        load_config(_write(tmp_path, "bundle = \n"))


def test_cli_run_reports_bad_config_key(tmp_path, capsys):
    from armscope.cli import main

    assert main(["run", "--config", str(_write(tmp_path, "stale_after_ms = 10\n"))]) == 2
    assert "'stale_after_ms'" in capsys.readouterr().err


def test_source_uris():
    spec = parse_source("file://video.mp4?fps=max")
    assert (spec.scheme, spec.target, spec.fps(25.0), spec.finite) == ("file", "video.mp4", None, True)
    assert parse_source("dir://frames/?fps=4&loop=1").finite is False
    assert parse_source("v4l2:///dev/video2?width=1600").target == "/dev/video2"
    assert parse_source("rtsp://cam.local:554/stream").target == "rtsp://cam.local:554/stream"
    assert resolve_relative("image://a.png?fps=2", __import__("pathlib").Path("/cfg")) == "image:///cfg/a.png?fps=2"
    for bad in ("video.mp4", "http://x", "csi://left", "file://", "dir://x?fps=-1", "image://x?loop=1"):
        with pytest.raises(ArmscopeError):
            parse_source(bad)
    pipeline = gstreamer_csi_pipeline(1, 1920, 1080, 30, 2)
    assert "nvarguscamerasrc sensor-id=1" in pipeline and "flip-method=2" in pipeline
    assert pipeline.endswith("appsink drop=true max-buffers=1 sync=false")


def test_dir_source_skips_corrupt_and_ends(tmp_path, camera_frames):
    import shutil

    from armscope.edge.sources import CorruptFrame, SourceLost

    shutil.copy(camera_frames[0], tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    source = open_source(f"dir://{tmp_path}?fps=max")
    source.open()
    assert source.read().shape == (1200, 1600, 3)
    with pytest.raises(CorruptFrame):
        source.read()
    with pytest.raises(SourceLost, match="ended"):
        source.read()


def test_latest_slot_newest_wins_and_closes():
    slot = LatestSlot()
    assert slot.get(0.01) is None
    assert slot.put(1) is False and slot.put(2) is True
    assert slot.get(0.01) == 2 and slot.dropped == 1
    got = []
    reader = threading.Thread(target=lambda: got.append(slot.get(5)))
    reader.start()
    slot.put(3)
    reader.join(5)
    assert got == [3]
    slot.close()
    with pytest.raises(SlotClosed):
        slot.get(1)


def test_tissue_gate_on_real_he(camera_frames):
    gate = TissueGate()
    crop = cv2.imread(str(camera_frames[1]))[88:1112, 288:1312]
    sharp = gate.measure(crop)
    assert gate.verdict(sharp) is None
    assert gate.verdict(gate.measure(cv2.GaussianBlur(crop, (0, 0), 8))) == protocol.REASON_OUT_OF_FOCUS
    glass = np.full_like(crop, 238)
    glass[::7, ::5] = (200, 120, 200)  # a few stained specks on glass
    assert gate.verdict(gate.measure(glass)) == protocol.REASON_NO_TISSUE


def test_slide_recorder_means_and_writes(tmp_path):
    slides = SlideRecorder(tmp_path, ["other", "tumour"])
    with pytest.raises(ArmscopeError, match="no slide"):
        slides.end({}, lambda p: {})
    with pytest.raises(ArmscopeError, match="slide id"):
        slides.start("../etc")
    slides.start("S-1")
    slides.add([0.8, 0.2], "S-1")
    slides.add([0.4, 0.6], "S-1")
    slides.add([0.0, 1.0], None)      # a frame from before the slide started: not counted
    record, path = slides.end({"model_id": "m"}, lambda p: {"label": "x", "score": float(p[1])})
    assert record["n_frames"] == 2 and record["probs"] == {"other": 0.6, "tumour": 0.4}
    assert json.loads(path.read_text())["decision"]["score"] == pytest.approx(0.4)
    slides.start("S-1")
    assert slides.end({}, lambda p: {})[1].name == "S-1.1.json"


def test_metrics_percentiles_and_prometheus():
    window = LatencyWindow(size=100)
    for v in range(1, 201):
        window.add(float(v))
    summary = window.summary()
    assert summary["n"] == 100 and summary["p50"] == pytest.approx(150.5) and summary["p99"] > 199
    metrics = Metrics()
    for ms in (12.0, 30.0, 3000.0):
        metrics.observe("inference", ms)
    metrics.count("no_tissue", 3)
    text = prometheus_text(metrics, {"dropped": 4, "control": "ok"})
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert value[("armscope_dropped_total", ())] == 4 and value[("armscope_no_tissue_total", ())] == 3
    assert families["armscope_fps"].type == "gauge" and "armscope_control" not in families  # a word, not a number
    inference = (("stage", "inference"),)
    # seconds, and _count/_sum over every observation (not the window's length)
    assert value[("armscope_stage_latency_seconds_count", inference)] == 3
    assert value[("armscope_stage_latency_seconds_sum", inference)] == pytest.approx(3.042)
    assert value[("armscope_stage_latency_seconds_bucket", (("le", "0.025"), *inference))] == 1
    assert value[("armscope_stage_latency_seconds_bucket", (("le", "+Inf"), *inference))] == 3
    assert value[("armscope_stage_latency_seconds_count", (("stage", "publish"),))] == 0  # every stage, from the start
    assert value[("armscope_latency_window_seconds", (("quantile", "0.5"), *inference))] == pytest.approx(0.030)


def test_deploy_edge_toml_names_every_option_and_loads():
    """deploy/edge.toml is documented as holding every daemon option, commented."""

    from armscope.edge.config import OPTIONS, load_config, tomllib  # tomli on Python 3.10

    from repo_paths import REPO

    path = REPO / "deploy" / "edge.toml"
    keys = set(tomllib.loads(path.read_text()))
    missing = [o.name for o in OPTIONS if o.name not in keys]
    assert not missing, f"{path} lacks {missing}"
    config = load_config(path)
    assert config.backend == "auto" and config.cpu_precision == "f32"


def test_overlay_gap_watch_warns_when_overlays_outlive_nothing():
    """Publishing every 1.9 s with stale_after_ms 1500 (a full-size ensemble on
    this CPU with the default) leaves the eyepiece dark between overlays: warn,
    once per period; a fast daemon with an occasional long pause does not."""
    fast = OverlayGapWatch(1500, window=8, every_s=300)
    t = 0.0
    warnings = []
    for i in range(40):
        t += 0.2 if i != 20 else 30.0  # one 30 s pause (no tissue)
        warnings.append(fast.observe(t))
    assert not any(warnings)

    slow = OverlayGapWatch(1500, window=8, every_s=300)
    got = [slow.observe(1.9 * i) for i in range(30)]
    assert [i for i, w in enumerate(got) if w] == [8]  # once the window is full, then rate-limited
    assert "~1900 ms old" in got[8] and "stale_after_ms=1500" in got[8]
    assert slow.observe(1.9 * 30 + 300) is not None  # again after every_s

    # The age counts from the capture: published every 1.0 s but 0.8 s after capture,
    # an overlay is 1.8 s old when replaced, past a 1500 ms window.
    late = OverlayGapWatch(1500, window=8, every_s=300)
    got = [late.observe(1.0 * i, latency_ms=800.0) for i in range(12)]
    assert got[8] is not None and "~1800 ms old" in got[8]
    assert not any(OverlayGapWatch(2000, window=8).observe(1.0 * i, latency_ms=800.0) for i in range(12))


def test_stale_window_from_the_measured_frame_time():
    from armscope.edge import pacing

    assert pacing.stale_window_ms(0.0) == 1500            # the floor where inference is fast
    assert pacing.stale_window_ms(50.0) == 1500
    assert pacing.stale_window_ms(400.0) == 1700          # 3 x 400 + 500
    assert pacing.stale_window_ms(2750.0) == 8800         # five full-size members on a 2-core CPU
    assert pacing.stale_window_ms(401.0) == 1800          # rounded up to 100 ms: never shorter than the rule
    with pytest.raises(ValueError):
        pacing.stale_window_ms(float("nan"))
    calls = []
    assert pacing.time_inference_ms(lambda b: calls.append(b.shape), 24) >= 0.0
    assert calls == [(1, 24, 24, 3)] * (1 + pacing.TIMED_RUNS)
