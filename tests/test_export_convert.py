"""The shared-graph conversion (armscope.export.convert): one tf2onnx conversion, each
member's weights bound afterwards, must give the graphs that converting each
member on its own gives, on real H&E frames; and a weight-swap bug (a member
getting another's weights) must not pass."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = [pytest.mark.tf, pytest.mark.slow]
pytest.importorskip("tensorflow")

OUTPUTS = ["probs", "patch_probs", "cam"]


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(OUTPUTS, session.run(OUTPUTS, {"image": x})))


def _member(seed: int, n_classes: int = 2):
    """A narrow tiled member with its own weights and non-trivial batch-norm statistics."""
    import keras

    from armscope.export.architecture import ArchitectureSpec, build_tiled_model

    keras.utils.set_random_seed(seed)
    model = build_tiled_model(ArchitectureSpec("densenet-mini", n_classes))
    rng = np.random.default_rng(seed)
    for layer in model.get_layer("patch_backbone").layer.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
    return model


@pytest.fixture(scope="module")
def frames(frame_paths):
    from armscope.core.preprocess import Preprocessing, load_image, preprocess_frame

    return np.stack([preprocess_frame(load_image(p), Preprocessing()) for p in frame_paths[:2]])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Three members converted both ways: shared graph (fast) and one tf2onnx run each."""
    from armscope.export.convert import convert_members
    from armscope.export.onnx_export import convert_to_onnx

    out = tmp_path_factory.mktemp("convert")
    models = [_member(200 + i) for i in range(3)]
    fast = [out / f"fast_{i}.onnx" for i in range(3)]
    messages = []
    report = convert_members(models, fast, progress=messages.append)
    slow = [out / f"slow_{i}.onnx" for i in range(3)]
    for model, path in zip(models, slow):
        convert_to_onnx([model], path)
    return models, fast, slow, report, messages


def test_shared_conversion_equals_per_member_conversion(converted, frames):
    models, fast, slow, report, messages = converted
    assert report.groups == [[0, 1, 2]]  # one tf2onnx conversion for the three members
    assert any("member 3/3" in m for m in messages)
    outputs = [_run(p, frames) for p in fast]
    for i, (got, path) in enumerate(zip(outputs, slow)):
        ref = _run(path, frames)
        for name in ("probs", "patch_probs"):
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-4, err_msg=f"member {i} {name}")
        # random weights give CAMs of order 1e-4: compared relative to their scale, not by 1e-4
        scale = float(np.abs(ref["cam"]).max())
        assert scale > 0
        np.testing.assert_allclose(got["cam"], ref["cam"], rtol=1e-3, atol=1e-4 * scale, err_msg=f"member {i} cam")
        keras_probs = models[i](frames, training=False)["probs"].numpy()
        assert np.max(np.abs(keras_probs - got["probs"])) <= 1e-4
    # different weights, different outputs: a member given another's weights would fail above and here
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.max(np.abs(outputs[a]["probs"] - outputs[b]["probs"])) > 1e-3, (a, b)
            scale = max(float(np.abs(outputs[k]["cam"]).max()) for k in (a, b))
            assert np.max(np.abs(outputs[a]["cam"] - outputs[b]["cam"])) > 0.05 * scale, (a, b)


def test_shared_conversion_cam_matches_gradient_tape(converted, frames):
    from armscope.export.gradcam_reference import reference_cam

    models, fast, _, _, _ = converted
    got = _run(fast[1], frames[:1])["cam"][0]
    ref = reference_cam(models[1], frames[0])
    compared = 0
    for c in range(ref.shape[0]):
        if ref[c].max() == 0:
            assert got[c].max() <= 1e-6
            continue
        assert np.corrcoef(ref[c].ravel(), got[c].ravel())[0, 1] >= 0.999
        compared += 1
    assert compared >= 1


def test_shared_conversion_is_plain_onnx_and_runs_in_openvino(converted, frames):
    import onnx

    _, fast, slow, _, _ = converted
    model = onnx.load(str(fast[0]))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    # DenseNet's batch norms after a concatenation are BatchNormalization nodes again (armscope.export.onnx_passes)
    assert any(node.op_type == "BatchNormalization" for node in model.graph.node)
    # the backbone runs once on a batch of 16 patches, not 16 times
    assert sum(node.op_type == "Conv" for node in model.graph.node) * 16 == sum(
        node.op_type == "Conv" for node in onnx.load(str(slow[0])).graph.node)
    ov = pytest.importorskip("openvino")
    from armscope.edge.backends.openvino_backend import compile_graph

    compiled = compile_graph(ov.Core(), fast[0], threads=1, precision="f32")
    result = compiled(frames[:1])
    names = {name: tensor for tensor in compiled.outputs for name in tensor.get_names()}
    np.testing.assert_allclose(result[names["probs"]], _run(fast[0], frames[:1])["probs"], atol=1e-4)


def test_members_with_different_graphs_are_converted_separately(tmp_path, frames):
    from armscope.export.convert import convert_members

    models = [_member(300, n_classes=2), _member(301, n_classes=3)]
    targets = [tmp_path / "two.onnx", tmp_path / "three.onnx"]
    report = convert_members(models, targets, progress=lambda _: None)
    assert report.groups == [[0], [1]]
    for model, target in zip(models, targets):
        got = _run(target, frames[:1])
        assert got["probs"].shape == (1, model.output["probs"].shape[-1])
        assert np.max(np.abs(model(frames[:1], training=False)["probs"].numpy() - got["probs"])) <= 1e-4
