"""What the paper's second step costs the daemon per frame, on the CPU.

A cascade bundle (``armscope cascade``) runs a second ensemble on a field
only when step one's decision selects it, so a frame costs step one alone or
step one plus that step. Both cases are timed through ``Daemon.process_frame``
(gate, preprocessing, inference, overlay, publish) on a real H&E frame, with
the demo bundles: step one ``samples/demo_bundle`` (5 mini DenseNets), second
step ``samples/demo_tissue_bundle`` (3) when step one says ``other``. The
decision is steered with the daemon's threshold: 0.3 (the manifest's) sends the
demo frame to ``tumour``, which has no second step; 0.99 sends it to ``other``.

Run:  python -m pytest benchmarks/bench_cascade.py --benchmark-only
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from armscope.core.preprocess import load_image
from armscope.bench.daemon_latency import free_tcp_endpoint
from armscope.edge.cascade import assemble
from armscope.edge.config import load_config
from armscope.edge.daemon import Daemon
from armscope.edge.capture import Frame

REPO = Path(__file__).resolve().parents[1]
FRAME = REPO / "samples" / "frames" / "cmu1_frame_1.jpg"


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cascade") / "bundle"
    assemble(REPO / "samples" / "demo_bundle", {"other": REPO / "samples" / "demo_tissue_bundle"}, out)
    return out


@pytest.mark.benchmark(group="cascade-per-frame", min_rounds=10, warmup=True, warmup_iterations=2)
@pytest.mark.parametrize("threshold, second_step", [(0.3, False), (0.99, True)], ids=["step-one-only", "with-second-step"])
def test_cascade_frame(benchmark, cascade_dir, tmp_path, threshold, second_step):
    config = load_config(None, {"bundle": str(cascade_dir), "source": f"image://{FRAME}", "threshold": threshold,
                                "publish": free_tcp_endpoint(), "control": free_tcp_endpoint(),
                                "snapshot_dir": str(tmp_path / "snap")})
    daemon = Daemon(config)
    daemon.open()
    image = load_image(FRAME)
    counter = iter(range(1, 1_000_000))
    try:
        header = benchmark(lambda: daemon.process_frame(Frame(next(counter), image, time.monotonic(), time.time())))
    finally:
        daemon.shutdown()
    assert (header["subtype"] is not None) == second_step
    benchmark.extra_info["inference_ms"] = header["latency_ms"]["inference"]
