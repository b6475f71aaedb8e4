"""Shared fixtures: the repo's real H&E samples, and a small exported bundle
built once per session from random-initialised mini DenseNet members (parity
and CAM checks do not need trained weights; the demo bundle covers those)."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"


def _has_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
        import subprocess

        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def frame_paths() -> list[Path]:
    paths = sorted((SAMPLES / "frames").glob("*.jpg"))
    assert len(paths) >= 4, "samples/frames is missing; run scripts/make_demo_data.py"
    return paths


@pytest.fixture(scope="session")
def tile_paths() -> list[Path]:
    paths = sorted((SAMPLES / "he" / "nct-crc-he-100k").glob("*/*.tif"))
    assert len(paths) == 9
    return paths


@pytest.fixture(scope="session")
def real_inputs(frame_paths, tile_paths) -> np.ndarray:
    """Model inputs from real H&E: the camera frames through the daemon's
    preprocessing, and the NCT tiles upsampled to 640x640."""
    from armscope.preprocess import Preprocessing, load_image, preprocess_frame

    spec = Preprocessing()
    frames = [preprocess_frame(load_image(p), spec) for p in frame_paths]
    tiles = [cv2.cvtColor(cv2.resize(load_image(p), (640, 640), interpolation=cv2.INTER_CUBIC),
                          cv2.COLOR_BGR2RGB).astype(np.float32) for p in tile_paths[:4]]
    return np.stack(frames + tiles)


@pytest.fixture(scope="session")
def mini_members(tmp_path_factory):
    """Two random-initialised tiled mini-DenseNet members (Keras 3 .keras) with
    their training sidecars. Batch-norm statistics are set to non-trivial values
    so the graphs are not near-identity."""
    pytest.importorskip("tensorflow")
    import json

    import keras

    from export.architecture import ArchitectureSpec, build_tiled_model

    out = tmp_path_factory.mktemp("members")
    paths = []
    for i in range(2):
        keras.utils.set_random_seed(100 + i)
        model = build_tiled_model(ArchitectureSpec("densenet-mini", 2))
        rng = np.random.default_rng(i)
        for layer in model.get_layer("patch_backbone").layer.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
                layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
        path = out / f"member_{i}.keras"
        model.save(path)
        path.with_suffix(".json").write_text(json.dumps({"classes": ["other", "tumour"], "fold": i}))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def mini_bundle(mini_members, tmp_path_factory) -> Path:
    from export.onnx_export import TaskSpec, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "mini"
    task = TaskSpec("binary", ["other", "tumour"], positive_class="tumour", threshold=0.3)
    return export_bundle(mini_members, out, task=task, name="mini-test")
