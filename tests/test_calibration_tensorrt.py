"""TensorRT build and backend. Without a GPU: what ``build`` prepares (and
reuses), cache validation, the CUDA flavour checks (engine keys, lookup and
``auto``'s fallback are in test_engines.py). With one (``@pytest.mark.gpu``,
skipped elsewhere by the root conftest): real engines for one demo member,
built into the bundle and found by ``auto``, compared with ONNX Runtime on
real frames, activated on another thread with each CUDA flavour, with and
without CUDA graphs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from armscope.core.bundle import load_bundle, sha256_file
from armscope.cli import main
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import Preprocessing, load_image, preprocess_frame
from armscope.calibration.derive import subset_bundle
from armscope.edge.backends import open_backend
from armscope.edge.backends.tensorrt_backend import FLAVOURS, CudaRuntime, cuda_flavours
from armscope.calibration.trt_build import read_calibration_cache

from repo_paths import SAMPLES
BUILT_ON = {"gpu": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}  # what a manifest engine entry records


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
    import armscope.gpu.cuda_runtime as runtime

    monkeypatch.setattr(runtime, "cuda_flavours", lambda: ["cuda-python", "pycuda"])
    for module in ("cuda", "cuda.bindings", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: importing it fails
    with pytest.raises(ArmscopeError, match=r"no CUDA Python API could be imported \(cuda-python: import of cuda\b.*; "
                                            r"pycuda: import of pycuda"):
        CudaRuntime()


def test_engine_files_are_hash_checked(tmp_path, one_member):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(one_member, copy)
    _with_engine(copy)
    (copy / "engines" / "ensemble.fp16.engine").write_bytes(b"changed")
    with pytest.raises(ArmscopeError, match=r"ensemble.fp16.engine: sha256 .* field engines.0.sha256"):
        load_bundle(copy)


def test_asking_for_tensorrt_without_it_says_how_to_get_it(capsys):
    """Without TensorRT, ``--backend tensorrt`` is refused up front: exit status
    2, one message naming the module, the pip extra and JetPack's package (pip
    has no Jetson wheels for it), no traceback."""
    from armscope.calibration.trt_build import tensorrt_available

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


@pytest.mark.skipif(__import__("armscope.calibration.trt_build", fromlist=["x"]).gpu_info() is not None, reason="needs a machine without a GPU")
def test_build_without_gpu_prepares_fp16_and_says_where_engines_are_built(tmp_path, one_member, capsys):
    """Without a GPU ``build`` makes the FP16 bundle and prints the command for the
    device, naming the bundle ``run`` uses; on the device the same command reuses the
    FP16 bundle made from this bundle instead of making it again."""
    out = tmp_path / "fp16"
    assert main(["build", str(one_member), "--precision", "fp16", "--out", str(out),
                 "--holdout", str(SAMPLES / "frames")]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert text[-1].endswith(f"engines are built on the target device (with {one_member} and {out}) with: "
                             f"armscope build {one_member} --precision fp16 --out {out}")
    assert load_bundle(out).manifest["precision"] == "fp16"
    made = (out / "manifest.json").stat().st_mtime_ns
    assert main(["build", str(one_member), "--precision", "fp16", "--out", str(out), "--layout", "merged"]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    assert text[0] == f"using the fp16 bundle {out} made from {one_member} earlier (--force remakes it)"
    assert text[-1].endswith("--precision fp16 --out " + str(out) + " --layout merged")
    assert (out / "manifest.json").stat().st_mtime_ns == made
    # GPU-only options fail clearly, and leave nothing
    assert main(["build", str(one_member), "--precision", "fp16", "--dla", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert main(["build", str(out), "--precision", "int8", "--out", str(tmp_path / "y")]) == 2  # fp16 -> int8


@pytest.mark.skipif(__import__("armscope.calibration.trt_build", fromlist=["x"]).gpu_info() is not None, reason="needs a machine without a GPU")
def test_build_feed_uint8_needs_the_front_and_names_the_device_command(tmp_path, one_member, capsys):
    """``build --feed uint8`` without a GPU: refused (naming ``armscope front``) for a
    bundle without the front, refused with implicit INT8 (its calibrator feeds float32
    frames), and with the front it prints the device's command with ``--feed uint8``."""
    import shutil

    from armscope.export.uint8_front import add_front

    assert main(["build", str(one_member), "--precision", "fp32", "--feed", "uint8"]) == 2
    assert "armscope front --bundle" in capsys.readouterr().err
    fronted = tmp_path / "fronted"
    shutil.copytree(one_member, fronted)
    add_front(fronted, [SAMPLES / "frames" / "cmu1_frame_0.jpg"])
    capsys.readouterr()
    assert main(["build", str(fronted), "--precision", "int8", "--int8-mode", "implicit", "--calib", "x.npz",
                 "--feed", "uint8"]) == 2
    assert "--int8-mode explicit" in capsys.readouterr().err
    assert main(["build", str(fronted), "--precision", "fp32", "--feed", "uint8"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"armscope build {fronted} --precision fp32 --feed uint8")


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def frames():
    spec = Preprocessing()
    return np.stack([preprocess_frame(load_image(p), spec) for p in sorted((SAMPLES / "frames").glob("*.jpg"))])


def _build(tmp_path, one_member, precision, layout="members", max_batch=2):
    import shutil

    from armscope.calibration.trt_build import build_bundle

    bundle_dir = tmp_path / "b"
    if not bundle_dir.exists():
        shutil.copytree(one_member, bundle_dir)
    result = build_bundle(bundle_dir, precision, workspace_mb=1024, max_batch=max_batch, layout=layout,
                          holdout=[SAMPLES / "frames"] if precision != "fp32" else None)
    return load_bundle(bundle_dir), result


def _raises(call, *args):
    try:
        call(*args)
    except ArmscopeError as e:
        return e
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("precision,atol", [("fp32", 2e-3), ("fp16", 3e-2)])
def test_engines_match_onnxruntime(tmp_path, one_member, frames, precision, atol):
    """build writes per-member engines into the bundle (keyed for this device) and
    ``auto`` on the same bundle finds them; the merged engine only when asked for."""
    import tensorrt

    from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend
    from armscope.edge.backends.tensorrt_backend import TensorRTBackend
    from armscope.gpu.engines import find_engines, graphs_for
    from armscope.gpu.trt_env import gpu_info

    bundle, result = _build(tmp_path, one_member, precision)
    engines = Path(result["engines"])
    assert engines.parent == bundle.root / "engines" and (bundle.root / "engines" / "timing.cache").stat().st_size > 0
    index = json.loads((engines / "engine.json").read_text())
    assert sorted(index["engines"]) == ["member_0"] and index["tensorrt"] == tensorrt.__version__
    with pytest.raises(ArmscopeError, match="--layout merged"):
        find_engines(bundle, tensorrt.__version__, gpu_info(), "merged")
    _build(tmp_path, one_member, precision, layout="merged")
    merged = find_engines(bundle, tensorrt.__version__, gpu_info(), "merged")
    assert sorted(merged.index["engines"]) == ["ensemble", "member_0"]
    with OnnxRuntimeBackend(bundle) as ort_backend:
        ref = ort_backend.infer(frames)
    for layout in ("merged", "members"):
        with open_backend(bundle, "auto", layout=layout, max_batch=2) as backend:
            info = backend.describe()
            assert isinstance(backend, TensorRTBackend) and info["layout"] == layout
            assert info["requested"] == "auto" and info["precision"] == precision
            assert len(backend.members) == len(graphs_for(bundle, layout))
            got = backend.infer(frames)  # 4 frames through a max-batch-2 engine: chunked
        np.testing.assert_allclose(got["probs"], ref["probs"], atol=atol)
        assert got["cam"].shape == ref["cam"].shape
        corr = np.corrcoef(got["cam"].ravel(), ref["cam"].ravel())[0, 1]
        assert corr > 0.99
    # the same engines claiming another TensorRT version are refused with the build command
    index = json.loads((merged.root / "engine.json").read_text())
    index["tensorrt"] = "9.0.0"
    (merged.root / "engine.json").write_text(json.dumps(index))
    with pytest.raises(ArmscopeError, match="built with TensorRT 9.0.0.*armscope build"):
        TensorRTBackend(bundle, layout="members")


@pytest.mark.gpu
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_activated_on_the_inference_thread_with_each_cuda_flavour(tmp_path, one_member, frames, flavour):
    """The daemon's threading contract on the GPU: constructed on this thread, activated,
    run and freed on a thread named 'inference' (pycuda pushes the context there), with
    CUDA graphs and without; the same outputs each way, and infer() from another thread
    is refused by name."""
    import threading

    from armscope.edge.backends.tensorrt_backend import TensorRTBackend

    if flavour not in cuda_flavours():
        pytest.skip(f"{flavour} is not installed")
    bundle, _ = _build(tmp_path, one_member, "fp32")
    outputs = {}
    for graphs in (True, False):
        backend = TensorRTBackend(bundle, flavour=flavour, cuda_graphs=graphs)
        seen = {}

        def inference():
            with backend:
                seen["out"] = backend.infer(frames[:1])
                seen["describe"] = backend.describe()

        thread = threading.Thread(target=inference, name="inference")
        thread.start()
        thread.join(300)
        assert "out" in seen, "the inference thread failed (see the log)"
        info = seen["describe"]
        assert info["thread"] == "inference" and info["cuda"] == flavour and not backend.active
        if not graphs:
            assert info["cuda_graphs"].startswith("off")
        elif flavour == "cuda-python":
            assert info["cuda_graphs"].startswith(("on", "partly")), info["cuda_graphs"]
        outputs[graphs] = seen["out"]
    np.testing.assert_allclose(outputs[True]["probs"], outputs[False]["probs"], rtol=1e-5, atol=1e-6)
    with TensorRTBackend(bundle, flavour=flavour) as backend:
        failed = {}
        thread = threading.Thread(target=lambda: failed.setdefault("e", _raises(backend.infer, frames[:1])))
        thread.start()
        thread.join(60)
        assert "activated on thread 'MainThread'" in str(failed["e"])


@pytest.mark.gpu
def test_int8_explicit_engine_from_qdq_bundle(tmp_path, one_member, frames):
    """INT8 from a Q/DQ bundle made on the way (``BUNDLE-int8``, gated on real frames):
    the engines live in the FP32 bundle, and match the Q/DQ graph on ONNX Runtime."""
    import shutil

    from armscope.calibration.accuracy import run_bundle
    from armscope.calibration.calibration_set import build_calibration_set
    from armscope.edge.backends.tensorrt_backend import TensorRTBackend
    from armscope.calibration.trt_build import build_bundle

    calib = tmp_path / "calib.npz"
    build_calibration_set([SAMPLES / "he" / "cmu-small-region"], calib, size=3, frame_size=(1600, 1200))
    shutil.copytree(one_member, tmp_path / "b")
    result = build_bundle(tmp_path / "b", "int8", calib=calib, out=tmp_path / "int8", holdout=[SAMPLES / "frames"])
    assert result["compiled"] == str(tmp_path / "int8")
    assert json.loads((Path(result["engines"]) / "engine.json").read_text())["precision"] == "int8"
    ref = run_bundle(load_bundle(tmp_path / "int8"), frames)  # the Q/DQ graph on ONNX Runtime
    with TensorRTBackend(load_bundle(tmp_path / "b")) as backend:
        got = backend.infer(frames)
    assert np.abs(got["probs"] - ref["probs"]).max() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("precision,atol", [("fp32", 2e-3), ("fp16", 3e-2)])
def test_uint8_engines_take_the_camera_crop(tmp_path, one_member, precision, atol):
    """``build --feed uint8``: engines with the uint8 front inside, found by ``auto``
    with feed uint8 only, given the camera crops (uint8 BGR) and agreeing with ONNX
    Runtime on the CPU-preprocessed float32 frames; the front's layers stay FP32 in
    the FP16 build and TF32 is kept (the 1024 -> 640 INTER_AREA weights are exact in it)."""
    import shutil

    from armscope.core import front
    from armscope.calibration.trt_build import build_bundle
    from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend
    from armscope.export.uint8_front import add_front

    bundle_dir = tmp_path / "b"
    shutil.copytree(one_member, bundle_dir)
    add_front(bundle_dir, sorted((SAMPLES / "frames").glob("*.jpg")))
    result = build_bundle(bundle_dir, precision, workspace_mb=1024, max_batch=2, feed="uint8",
                          holdout=[SAMPLES / "frames"] if precision != "fp32" else None)
    bundle = load_bundle(bundle_dir)
    index = json.loads((Path(result["engines"]) / "engine.json").read_text())
    assert Path(result["engines"]).name.endswith("-u8") and index["feed"] == "uint8" and index["tf32"] is True
    paths = sorted((SAMPLES / "frames").glob("*.jpg"))
    crops = np.stack([front.camera_crop(load_image(p), bundle.preprocessing) for p in paths])
    floats = np.stack([preprocess_frame(load_image(p), bundle.preprocessing) for p in paths])
    with OnnxRuntimeBackend(bundle) as ort_backend:
        ref = ort_backend.infer(floats)
    with open_backend(bundle, "auto", feed="uint8", max_batch=2) as backend:
        info = backend.describe()
        assert info["backend"] == "tensorrt" and info["feed"] == "uint8"
        got = backend.infer(crops)  # 4 crops through a max-batch-2 engine: chunked
    np.testing.assert_allclose(got["probs"], ref["probs"], atol=atol)
    assert np.corrcoef(got["cam"].ravel(), ref["cam"].ravel())[0, 1] > 0.99
    with pytest.raises(ArmscopeError, match="built for feed uint8, feed float32 was asked for"):
        open_backend(bundle, "auto")
