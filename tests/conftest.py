"""Test fixtures: a small exported bundle built once per session from
random-initialised mini DenseNet members (parity and CAM checks do not need
trained weights; the demo bundle covers those). The repository's paths and
real-image fixtures (``repo``, ``demo_bundle``, ``frame_paths``, ``tile_paths``,
``he_field``) are in the root conftest.py, the paths in tests/repo_paths.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def mini_members(tmp_path_factory):
    """Two random-initialised tiled mini-DenseNet members (Keras 3 .keras) with
    their training sidecars. Batch-norm statistics are set to non-trivial values
    so the graphs are not near-identity."""
    pytest.importorskip("tensorflow")
    import json

    import keras

    from armscope.export.architecture import ArchitectureSpec, build_tiled_model

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
    from armscope.export.onnx_export import TaskSpec, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "mini"
    task = TaskSpec("binary", ["other", "tumour"], positive_class="tumour", threshold=0.3)
    return export_bundle(mini_members, out, task=task, name="mini-test", jobs=2)  # --jobs: used only if the shared conversion falls back


@pytest.fixture(scope="session")
def camera_frames(frame_paths) -> list[Path]:
    """The real 1600x1200 H&E camera frames in samples/frames (the root conftest's
    ``frame_paths``, under the name the daemon and bridge tests use)."""
    return frame_paths
