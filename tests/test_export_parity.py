"""ONNX vs Keras on real H&E inputs: probabilities and the in-graph Grad-CAM."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("tensorflow")
# Keras predictions and gradient tapes of the mini members (module fixture): 20-30 s a test on 2 cores
pytestmark = [pytest.mark.tf, pytest.mark.slow]


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["probs", "patch_probs", "cam"], session.run(["probs", "patch_probs", "cam"], {"image": x})))


@pytest.fixture(scope="module")
def keras_outputs(mini_members, real_inputs):
    """Keras predictions of each member on the real inputs (computed once: tracing is slow)."""
    import keras

    return [keras.models.load_model(m).predict(real_inputs, batch_size=4, verbose=0) for m in mini_members]


def test_member_graphs_match_keras_probs(keras_outputs, mini_bundle, real_inputs):
    for i, ref in enumerate(keras_outputs):
        got = _run(mini_bundle / "members" / f"member_{i}.onnx", real_inputs)
        assert np.max(np.abs(ref["probs"] - got["probs"])) <= 1e-4
        assert np.max(np.abs(ref["patch_probs"] - got["patch_probs"])) <= 1e-4
        # the inputs are varied enough that the check can fail: predictions differ between images
        assert np.ptp(ref["probs"][:, 1]) > 1e-3


def test_merged_graph_is_the_member_average(keras_outputs, mini_bundle, real_inputs):
    refs = keras_outputs
    got = _run(mini_bundle / "ensemble.onnx", real_inputs)
    assert np.max(np.abs(np.mean([r["probs"] for r in refs], axis=0) - got["probs"])) <= 1e-4
    members = [_run(mini_bundle / "members" / f"member_{i}.onnx", real_inputs) for i in range(2)]
    np.testing.assert_allclose(got["cam"], np.mean([m["cam"] for m in members], axis=0), rtol=1e-4, atol=1e-5)


def test_in_graph_cam_matches_gradient_tape(mini_members, mini_bundle, real_inputs):
    import keras

    from armscope.export.gradcam_reference import reference_cam

    model = keras.models.load_model(mini_members[0])
    got = _run(mini_bundle / "members" / "member_0.onnx", real_inputs)["cam"]
    assert got.shape == (len(real_inputs), 2, 20, 20)
    compared = 0
    for n in range(len(real_inputs)):
        ref = reference_cam(model, real_inputs[n])
        for c in range(ref.shape[0]):
            if ref[c].max() == 0:  # ReLU removed everything: the graph must agree
                assert got[n, c].max() <= 1e-6
                continue
            corr = np.corrcoef(ref[c].ravel(), got[n, c].ravel())[0, 1]
            assert corr >= 0.999, (n, c, corr)
            np.testing.assert_allclose(got[n, c], ref[c], rtol=1e-3, atol=1e-4 * ref[c].max())
            compared += 1
    # most (image, class) CAMs must be non-trivial, or the check above proves little
    assert compared >= len(real_inputs)
