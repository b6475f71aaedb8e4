"""Fixtures shared by tests/ and benchmarks/: the repo's real H&E samples and
the skip rule for GPU-only tests. The paths themselves are in tests/repo_paths.py
(one place; helper modules and parametrize lists import them at import time)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# tests/ holds the helper modules both suites import by name (repo_paths, daemon_support, ...)
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

from repo_paths import DEMO_BUNDLE, FRAMES, HE_FIELD, NCT_TILES, REPO  # noqa: E402


def _has_gpu() -> bool:
    try:
        import tensorrt  # noqa: F401
        import subprocess

        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except Exception:
        return False


def _has_cuda() -> bool:
    """A GPU that cuda-python or pycuda can reach (TensorRT not needed)."""
    import importlib.util

    try:
        if importlib.util.find_spec("cuda") is None and importlib.util.find_spec("pycuda") is None:
            return False
        from armscope.calibration.trt_build import gpu_info

        return gpu_info() is not None
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    rules = [("gpu", _has_gpu, "needs an NVIDIA GPU with TensorRT"),
             ("cuda", _has_cuda, "needs an NVIDIA GPU and cuda-python or pycuda")]
    for marker, available, reason in rules:
        marked = [item for item in items if marker in item.keywords]
        if marked and not available():
            for item in marked:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository root (subprocesses run with it as their working directory)."""
    return REPO


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    """samples/demo_bundle: 5 mini DenseNets, tumour vs other (a pipeline demonstration)."""
    assert (DEMO_BUNDLE / "manifest.json").is_file(), f"{DEMO_BUNDLE} is missing; run scripts/build_demo_bundle.sh"
    return DEMO_BUNDLE


@pytest.fixture(scope="session")
def frame_paths() -> list[Path]:
    """The 4 real 1600x1200 H&E camera frames in samples/frames."""
    assert len(FRAMES) >= 4, "samples/frames is missing; run scripts/make_demo_data.py"
    return list(FRAMES)


@pytest.fixture(scope="session")
def tile_paths() -> list[Path]:
    """One real NCT-CRC-HE-100K tile per class (9), samples/he/nct-crc-he-100k."""
    assert len(NCT_TILES) == 9
    return list(NCT_TILES)


@pytest.fixture(scope="session")
def he_field() -> Path:
    """The large real H&E field (CMU-1, 2220x2967) in samples/he/cmu-small-region."""
    assert HE_FIELD.is_file(), HE_FIELD
    return HE_FIELD


@pytest.fixture(scope="session")
def real_inputs(frame_paths, tile_paths) -> np.ndarray:
    """Model inputs from real H&E: the camera frames through the daemon's
    preprocessing, and the NCT tiles upsampled to 640x640."""
    from armscope.core.preprocess import Preprocessing, load_image, preprocess_frame

    spec = Preprocessing()
    frames = [preprocess_frame(load_image(p), spec) for p in frame_paths]
    tiles = [cv2.cvtColor(cv2.resize(load_image(p), (640, 640), interpolation=cv2.INTER_CUBIC),
                          cv2.COLOR_BGR2RGB).astype(np.float32) for p in tile_paths[:4]]
    return np.stack(frames + tiles)
