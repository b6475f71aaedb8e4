"""The ONNX Runtime backend refuses, when it is activated, a graph that loads but
cannot run on the installed onnxruntime (seen: per-channel INT8 MatMul weights
on onnxruntime 1.30/1.31), naming the graph, rather than failing on the
daemon's first camera frame."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from armscope.core.bundle import load_bundle, sha256_file
from armscope.core.errors import ArmscopeError
from armscope.calibration.derive import subset_bundle
from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend

from repo_paths import SAMPLES


def _fails_when_run(member: Path) -> None:
    """Route 'probs' through a Gather whose second index is out of range: the
    graph loads and keeps its declared shapes, and fails at the first run."""
    model = onnx.load(str(member))
    graph = model.graph
    producer = next(n for n in graph.node if "probs" in n.output)
    producer.output[list(producer.output).index("probs")] = "probs_before_gather"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 7], np.int64), "bad_index"))
    graph.node.append(helper.make_node("Gather", ["probs_before_gather", "bad_index"], ["probs"], axis=1))
    onnx.save(model, str(member))


def test_a_graph_that_cannot_run_is_refused_at_open(tmp_path):
    root = subset_bundle(load_bundle(SAMPLES / "demo_bundle"), [0], tmp_path / "bundle")
    manifest = json.loads((root / "manifest.json").read_text())
    member = root / manifest["members"][0]["file"]
    _fails_when_run(member)
    manifest["members"][0]["sha256"] = sha256_file(member)
    (root / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ArmscopeError, match=r"member_0\.onnx: onnxruntime [\d.]+ loads this graph but cannot run it "
                                            r"\(.*Gather.*\); upgrade onnxruntime"):
        OnnxRuntimeBackend(load_bundle(root), layout="members").activate()


def test_the_demo_bundle_opens_and_matches_its_first_run():
    """A bundle that runs passes the warm-up and then runs as before: the same frame twice, the same probabilities."""
    frame = np.full((1, 640, 640, 3), 180.0, np.float32)
    with OnnxRuntimeBackend(load_bundle(SAMPLES / "demo_bundle"), layout="members") as a:
        first = a.infer(frame)["probs"]
        assert np.isfinite(first).all() and np.allclose(first.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(a.infer(frame)["probs"], first)
