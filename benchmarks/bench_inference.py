"""Full-size ensemble inference on the CPU: Keras vs ONNX Runtime.

5 DenseNet-121 tiled members, one real 640x640 frame (16 patches each).
Run:  python -m pytest benchmarks/bench_inference.py --benchmark-only
The ratio asked for by the export issue: ONNX Runtime >= 1.8x faster than Keras.
"""
from __future__ import annotations

import numpy as np
import pytest

from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def frame(real_inputs):
    return real_inputs[:1]


@pytest.fixture(scope="module")
def keras_members(full_members):
    import keras

    return [keras.models.load_model(p) for p in full_members]


def _keras_ensemble(models, frame):
    return np.mean([m.predict(frame, verbose=0)["probs"] for m in models], axis=0)


@pytest.mark.benchmark(group="ensemble-5x-densenet121-cpu", min_rounds=5, warmup=True, warmup_iterations=1)
def test_keras_predict(benchmark, keras_members, frame):
    probs = benchmark(_keras_ensemble, keras_members, frame)
    assert probs.shape == (1, 2)


@pytest.mark.benchmark(group="ensemble-5x-densenet121-cpu", min_rounds=5, warmup=True, warmup_iterations=1)
@pytest.mark.parametrize("layout", ["merged", "members"])
def test_onnxruntime(benchmark, full_bundle, keras_members, frame, layout):
    with OnnxRuntimeBackend(full_bundle, layout) as backend:
        out = benchmark(backend.infer, frame)
    assert out["cam"].shape == (1, 2, 20, 20)
    np.testing.assert_allclose(out["probs"], _keras_ensemble(keras_members, frame), atol=1e-4)
