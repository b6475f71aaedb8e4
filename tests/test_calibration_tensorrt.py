"""TensorRT build and backend. Without a GPU: what ``build`` prepares, the
engine/version checks, cache validation and ``auto`` falling back. With one
(``@pytest.mark.gpu``, skipped elsewhere by the root conftest): real engines
for one demo member, compared with ONNX Runtime on real frames."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from armscope.bundle import load_bundle, sha256_file
from armscope.cli import main
from armscope.errors import ArmscopeError
from armscope.preprocess import Preprocessing, load_image, preprocess_frame
from calibration.derive import subset_bundle
from edge.backends import open_backend
from edge.backends.tensorrt_backend import FLAVOURS, CudaRuntime, cuda_flavours, engine_mismatch, select_engines
from edge.trt_build import read_calibration_cache

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
GPU = {"name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}  # what gpu_info() returns
BUILT_ON = {"gpu": GPU["name"], "compute_capability": GPU["compute_capability"]}  # what the manifest records


@pytest.fixture(scope="module")
def one_member(tmp_path_factory):
    return subset_bundle(load_bundle(SAMPLES / "demo_bundle"), [0], tmp_path_factory.mktemp("trt") / "fp32")


def _with_engine(bundle_dir: Path, **entry) -> Path:
    """Add an engine entry (and a placeholder engine file) to a bundle's manifest."""
    engine = bundle_dir / "engines" / "ensemble.fp16.engine"
    engine.parent.mkdir(exist_ok=True)
    engine.write_bytes(b"placeholder")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["engines"] = [{"file": "engines/ensemble.fp16.engine", "sha256": sha256_file(engine), "graph": "ensemble",
                            "precision": "fp16", "tensorrt": "10.13.0.35", **BUILT_ON, **entry}]
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    return bundle_dir


def test_cuda_flavour_is_checked_before_any_cuda_call():
    """``CudaRuntime(flavour)``: an unknown name, or one not installed here, is
    refused by name (no import error from deep inside either package)."""
    with pytest.raises(ArmscopeError, match=r"CUDA flavour 'cupy': expected one of cuda-python, pycuda"):
        CudaRuntime("cupy")
    missing = [f for f in FLAVOURS if f not in cuda_flavours()]
    if not missing:
        pytest.skip("both CUDA flavours are installed here")
    with pytest.raises(ArmscopeError, match=rf"CUDA flavour '{missing[0]}' is not installed here"):
        CudaRuntime(missing[0])


def test_a_cuda_api_that_cannot_load_is_named(monkeypatch):
    """A CUDA Python API that is installed but cannot be imported (e.g. built
    for a CUDA the driver lacks): the next flavour is tried, and if none
    loads, each one's import error is reported by name, not as a traceback."""
    import edge.backends.tensorrt_backend as backend

    monkeypatch.setattr(backend, "cuda_flavours", lambda: ["cuda-python", "pycuda"])
    for module in ("cuda", "cuda.bindings", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: importing it fails
    with pytest.raises(ArmscopeError, match=r"no CUDA Python API could be imported \(cuda-python: import of cuda\b.*; "
                                            r"pycuda: import of pycuda"):
        CudaRuntime()


def test_engine_checks_name_version_gpu_and_rebuild(tmp_path, one_member):
    entry = {"tensorrt": "10.13.0.35", **BUILT_ON}
    assert engine_mismatch(entry, "10.13.0.35", GPU) is None
    assert "TensorRT 10.13.0.35, this device has TensorRT 10.14.1" in engine_mismatch(entry, "10.14.1", GPU)
    other = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert "compute capability 8.7" in engine_mismatch(entry, "10.13.0.35", other)
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(one_member, copy)
    bundle = load_bundle(_with_engine(copy))
    with pytest.raises(ArmscopeError, match=r"ensemble.fp16.engine: built with TensorRT 10.13.0.35.*rebuild on this "
                                            r"device: armscope build .* --precision fp32"):
        select_engines(bundle, "10.14.1", GPU)
    with pytest.raises(ArmscopeError, match="no engine for member_0"):
        select_engines(bundle, "10.13.0.35", GPU, layout="members")
    assert select_engines(bundle, "10.13.0.35", GPU)[0]["graph"] == "ensemble"


def test_engine_files_are_hash_checked(tmp_path, one_member):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(one_member, copy)
    _with_engine(copy)
    (copy / "engines" / "ensemble.fp16.engine").write_bytes(b"changed")
    with pytest.raises(ArmscopeError, match=r"ensemble.fp16.engine: sha256 .* field engines.0.sha256"):
        load_bundle(copy)


def test_auto_falls_back_to_onnxruntime_with_reason(tmp_path, one_member, caplog):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(one_member, copy)
    bundle = load_bundle(_with_engine(copy))
    with caplog.at_level(logging.INFO, logger="edge.backends"):
        with open_backend(bundle, "auto") as backend:
            assert backend.name == "onnxruntime"
    assert any("backend: onnxruntime on the CPU (" in r.message for r in caplog.records)


def test_asking_for_tensorrt_without_it_says_how_to_get_it(capsys):
    """Without TensorRT, ``--backend tensorrt`` is refused up front: exit status
    2, one message naming the module, the pip extra and JetPack's package (pip
    has no Jetson wheels for it), no traceback."""
    from edge.trt_build import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    frame = SAMPLES / "frames" / "cmu1_frame_1.jpg"
    assert main(["classify", "--bundle", str(SAMPLES / "demo_bundle"), "--backend", "tensorrt", str(frame)]) == 2
    err = capsys.readouterr().err
    assert "needs the Python module 'tensorrt', which is not installed: pip install 'armscope[gpu]'" in err
    assert "python3-libnvinfer" in err and "--system-site-packages" in err
    assert "Traceback" not in err


def test_calibration_cache_validation(tmp_path):
    good = tmp_path / "ensemble.calib"
    good.write_text("TRT-101300-EntropyCalibration2\nimage: 3c010a14\nconv1: 3d8f5c29\n")
    assert read_calibration_cache(good).startswith(b"TRT-")
    assert read_calibration_cache(tmp_path / "missing.calib") is None
    bad = tmp_path / "bad.calib"
    bad.write_bytes(b"\x89garbage\x00")
    with pytest.raises(ArmscopeError, match="bad.calib: corrupt TensorRT calibration cache"):
        read_calibration_cache(bad)


@pytest.mark.skipif(__import__("edge.trt_build", fromlist=["x"]).gpu_info() is not None, reason="needs a machine without a GPU")
def test_build_without_gpu_prepares_fp16_and_says_where_engines_are_built(tmp_path, one_member, capsys):
    out = tmp_path / "fp16"
    assert main(["build", str(one_member), "--precision", "fp16", "--out", str(out),
                 "--holdout", str(SAMPLES / "frames")]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert text[-1].endswith(f"engines are built on the target device with: armscope build {out} --precision fp16")
    assert load_bundle(out).manifest["precision"] == "fp16"
    # GPU-only options fail clearly, and leave nothing
    assert main(["build", str(one_member), "--precision", "fp16", "--dla", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["build", str(out), "--precision", "int8", "--out", str(tmp_path / "y")]) == 2  # fp16 -> int8


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def frames():
    spec = Preprocessing()
    return np.stack([preprocess_frame(load_image(p), spec) for p in sorted((SAMPLES / "frames").glob("*.jpg"))])


@pytest.mark.gpu
@pytest.mark.parametrize("precision,atol", [("fp32", 2e-3), ("fp16", 3e-2)])
def test_engines_match_onnxruntime(tmp_path, one_member, frames, precision, atol):
    import shutil

    from edge.backends.onnxruntime_backend import OnnxRuntimeBackend
    from edge.backends.tensorrt_backend import TensorRTBackend
    from edge.trt_build import build_bundle

    bundle_dir = tmp_path / "b"
    shutil.copytree(one_member, bundle_dir)
    if precision == "fp16":
        from calibration.quantize import make_reduced_bundle

        make_reduced_bundle(bundle_dir, tmp_path / "b16", "fp16", holdout=[SAMPLES / "frames"])
        bundle_dir = tmp_path / "b16"
    result = build_bundle(bundle_dir, precision, workspace_mb=1024, max_batch=2)
    assert result["engines"] and {e["graph"] for e in result["engines"]} == {"ensemble", "member_0"}
    bundle = load_bundle(bundle_dir)
    assert (bundle_dir / "engines" / "timing.cache").stat().st_size > 0
    import tensorrt

    assert all(e["tensorrt"] == tensorrt.__version__ for e in bundle.manifest["engines"])
    with OnnxRuntimeBackend(bundle) as ort_backend:
        ref = ort_backend.infer(frames)
    for layout in ("merged", "members"):
        with open_backend(bundle, "auto", layout=layout, max_batch=2) as backend:
            assert isinstance(backend, TensorRTBackend) and backend.describe()["layout"] == layout
            got = backend.infer(frames)  # 4 frames through a max-batch-2 engine: chunked
        np.testing.assert_allclose(got["probs"], ref["probs"], atol=atol)
        assert got["cam"].shape == ref["cam"].shape
        corr = np.corrcoef(got["cam"].ravel(), ref["cam"].ravel())[0, 1]
        assert corr > 0.99
    # the same bundle claiming another TensorRT version is refused with the rebuild command
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    for e in manifest["engines"]:
        e["tensorrt"] = "9.0.0"
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArmscopeError, match="built with TensorRT 9.0.0.*armscope build"):
        TensorRTBackend(load_bundle(bundle_dir))


@pytest.mark.gpu
def test_int8_explicit_engine_from_qdq_bundle(tmp_path, one_member, frames):
    from calibration.calibration_set import build_calibration_set
    from edge.backends.tensorrt_backend import TensorRTBackend
    from edge.trt_build import build_bundle

    calib = tmp_path / "calib.npz"
    build_calibration_set([SAMPLES / "he" / "cmu-small-region"], calib, size=3, frame_size=(1600, 1200))
    result = build_bundle(one_member, "int8", calib=calib, out=tmp_path / "int8", holdout=[SAMPLES / "frames"])
    bundle = load_bundle(result["bundle"])
    assert bundle.manifest["precision"] == "int8" and result["engines"][0]["precision"] == "int8"
    from calibration.accuracy import run_bundle

    ref = run_bundle(bundle, frames)  # the Q/DQ graph on ONNX Runtime
    with TensorRTBackend(bundle) as backend:
        got = backend.infer(frames)
    assert np.abs(got["probs"] - ref["probs"]).max() < 0.05
