"""Daemon pipeline overhead vs pure inference, on the CPU.

* ``pure-inference``: ``backend.infer`` on one preprocessed real H&E frame.
* ``serial-pipeline``: the same frame through every daemon stage in one thread
  (tissue/focus gate, preprocessing, inference, Grad-CAM overlay, PNG or raw
  encoding, ZeroMQ publish): ``Daemon.process_frame``. The difference is the
  per-frame pipeline overhead.
* ``threaded-throughput``: the real threaded daemon on a paced source, measured
  by a subscriber (``armscope.bench.daemon_latency.run_bench``); its fps should approach
  1 / inference time, because the other stages overlap with inference.

Run:  python -m pytest benchmarks/bench_daemon.py --benchmark-only
Bundle: $ARMSCOPE_BENCH_BUNDLE, else samples/demo_bundle (skipped if neither exists).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from armscope.core.preprocess import load_image, preprocess_frame
from armscope.bench.daemon_latency import free_tcp_endpoint, run_bench
from armscope.edge.config import load_config
from armscope.edge.daemon import Daemon
from armscope.edge.capture import Frame

REPO = Path(__file__).resolve().parents[1]
FRAME = REPO / "samples" / "frames" / "cmu1_frame_1.jpg"


@pytest.fixture(scope="module")
def bundle_dir() -> Path:
    path = Path(os.environ.get("ARMSCOPE_BENCH_BUNDLE", REPO / "samples" / "demo_bundle"))
    if not (path / "manifest.json").is_file():
        pytest.skip(f"{path}: no bundle (set ARMSCOPE_BENCH_BUNDLE)")
    return path


@pytest.fixture(scope="module")
def daemon(bundle_dir, tmp_path_factory):
    config = load_config(None, {"bundle": str(bundle_dir), "source": f"image://{FRAME}",
                                "publish": free_tcp_endpoint(), "control": free_tcp_endpoint(),
                                "snapshot_dir": str(tmp_path_factory.mktemp("snap"))})
    d = Daemon(config)
    d.open()
    d.activate_backends()  # on this thread, which runs every benchmark below
    yield d
    d.shutdown()


@pytest.fixture(scope="module")
def image():
    return load_image(FRAME)


@pytest.mark.benchmark(group="daemon-per-frame", min_rounds=5, warmup=True, warmup_iterations=1)
def test_pure_inference(benchmark, daemon, image):
    batch = preprocess_frame(image, daemon.spec)[None]
    out = benchmark(daemon.backend.infer, batch)
    assert out["probs"].shape == (1, len(daemon.classes))


@pytest.mark.benchmark(group="daemon-per-frame", min_rounds=5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_serial_pipeline(benchmark, daemon, image, encoding):
    daemon.config.values["encoding"] = encoding
    counter = iter(range(1, 1_000_000))

    def one_frame():
        now = time.monotonic()
        return daemon.process_frame(Frame(next(counter), image, now, time.time()))

    header = benchmark(one_frame)
    assert header is not None and header["encoding"] == encoding
    benchmark.extra_info["overhead_ms_p50_vs_inference"] = round(
        header["latency_ms"]["total"] - header["latency_ms"]["inference"], 2)


@pytest.mark.benchmark(group="daemon-throughput")
def test_threaded_throughput(benchmark, bundle_dir):
    frames = int(os.environ.get("ARMSCOPE_BENCH_FRAMES", "20"))
    config = load_config(None, {"bundle": str(bundle_dir), "source": f"image://{FRAME}?fps=30"})
    report = benchmark.pedantic(run_bench, args=(config,), kwargs={"frames": frames, "warmup": 2},
                                rounds=1, iterations=1)
    benchmark.extra_info.update(fps=report["fps"], latency_ms=report["latency_ms"])
    inference = report["latency_ms"]["inference"]["p50"]
    # Overlapped stages: throughput within 35 % of the inference-bound rate.
    assert report["fps"] >= 0.65 * 1000.0 / inference, report
