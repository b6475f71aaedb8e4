"""Fixtures shared by tests/ and benchmarks/: the repo's real H&E samples and
the skip rule for GPU-only tests."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent
SAMPLES = REPO / "samples"


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
    from armscope.core.preprocess import Preprocessing, load_image, preprocess_frame

    spec = Preprocessing()
    frames = [preprocess_frame(load_image(p), spec) for p in frame_paths]
    tiles = [cv2.cvtColor(cv2.resize(load_image(p), (640, 640), interpolation=cv2.INTER_CUBIC),
                          cv2.COLOR_BGR2RGB).astype(np.float32) for p in tile_paths[:4]]
    return np.stack(frames + tiles)
