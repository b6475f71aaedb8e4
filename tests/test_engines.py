"""Engines that belong to the bundle (``armscope.gpu.engines``), and ``--backend auto``
on a machine without a GPU: the key, the lookup (which set runs here, which
cannot and why, with the command that builds what is missing), integrity
checks, and the CPU fallback that is loud wherever a GPU run was to be
expected. Engine files here are placeholder bytes: lookup reads keys, indexes
and hashes, never the engines (the ``gpu`` tests in
test_calibration_tensorrt.py build and run real ones)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from armscope.core.bundle import load_bundle, sha256_file
from armscope.core.errors import ArmscopeError
from armscope.edge.backends import gpu_choice, open_backend
from armscope.gpu.engines import ENGINE_DIR, INDEX, bundle_hash, engine_key, engine_sets, find_engines
from armscope.gpu.trt_env import gpu_info, is_jetson, tensorrt_available

from repo_paths import SAMPLES
ORIN = {"name": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7"}  # as gpu_info() reports it
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
TRT = "10.3.0.30"


@pytest.fixture
def bundle(tmp_path):
    """A copy of the demo bundle (5 members) to store engine sets in."""
    shutil.copytree(SAMPLES / "demo_bundle", tmp_path / "b")
    return load_bundle(tmp_path / "b")


def store(bundle, precision="fp16", trt=TRT, gpu=ORIN, dla=None, graphs=None, built="2026-12-01T10:00:00+00:00",
          source_sha=None, feed=None, front_sha=None) -> Path:
    """Write an engine set as ``armscope build`` lays it out (placeholder engine bytes);
    ``feed=None``: an index from before the uint8 front (no ``feed`` field)."""
    graphs = graphs if graphs is not None else [f"member_{i}" for i in range(len(bundle.member_paths))]
    sha = source_sha or bundle_hash(bundle)
    directory = bundle.root / ENGINE_DIR / engine_key(sha, precision, trt, gpu, dla, feed or "float32")
    directory.mkdir(parents=True)
    engines = {}
    for graph in graphs:
        (directory / f"{graph}.engine").write_bytes(f"{graph} {precision} {built}".encode())
        engines[graph] = {"file": f"{graph}.engine", "sha256": sha256_file(directory / f"{graph}.engine")}
    index = {"format": 1, "bundle_sha256": sha, "precision": precision, "tensorrt": trt, "gpu": gpu["name"],
             "compute_capability": gpu["compute_capability"], "dla_core": dla, "gpu_fallback": dla is not None,
             "built": built, "engines": engines}
    if feed is not None:
        index.update(feed=feed, front_sha256=front_sha)
    (directory / INDEX).write_text(json.dumps(index))
    return directory


def test_the_key_names_everything_an_engine_is_valid_for():
    sha = "bc4acda635780b86edde4749aba97867298653e76b91c83b1f0f41d0125293b1"
    key = engine_key(sha, "fp16", TRT, ORIN, None)
    assert key == "fp16-trt10.3.0.30-sm87-nvidia-jetson-agx-orin-bc4acda63578"
    variants = {engine_key(sha, "int8", TRT, ORIN, None), engine_key(sha, "fp16", "10.3.0.31", ORIN, None),
                engine_key(sha, "fp16", TRT, H100, None), engine_key(sha, "fp16", TRT, ORIN, 0),
                engine_key("0" * 64, "fp16", TRT, ORIN, None), key}
    assert len(variants) == 6 and engine_key(sha, "fp16", TRT, ORIN, 1).endswith("-dla1-bc4acda63578")


def test_lookup_finds_the_newest_set_for_this_device_and_layout(bundle):
    store(bundle, "fp32", built="2026-12-01T10:00:00+00:00")
    newest = store(bundle, "int8", built="2026-12-02T10:00:00+00:00")
    store(bundle, "fp16", gpu=H100, built="2026-12-03T10:00:00+00:00")          # another GPU: not here
    store(bundle, "fp16", trt="10.7.0.23", built="2026-12-04T10:00:00+00:00")   # another TensorRT
    (bundle.root / ENGINE_DIR / ".fp16-staging.x1").mkdir()                    # a build in progress: ignored
    found = find_engines(bundle, TRT, ORIN, "members")
    assert found.root == newest and found.precision == "int8"
    assert found.path("member_4").is_file()
    assert len(engine_sets(bundle)) == 4


def test_nothing_for_this_device_names_what_was_found_and_the_build_command(bundle):
    with pytest.raises(ArmscopeError, match=rf"no TensorRT engines for this device .*no engines in {bundle.root}/engines; "
                                            rf"build them here with: armscope build {bundle.root} --precision fp32$"):
        find_engines(bundle, TRT, ORIN)
    store(bundle, "fp16", trt="10.7.0.23")
    with pytest.raises(ArmscopeError, match=r"built with TensorRT 10\.7\.0\.23, this device has TensorRT 10\.3\.0\.30; "
                                            rf"build them here with: armscope build {bundle.root} --precision fp16"):
        find_engines(bundle, TRT, ORIN)
    with pytest.raises(ArmscopeError, match=r"compute capability 8\.7 \(NVIDIA Jetson AGX Orin\), this GPU is 9\.0"):
        find_engines(bundle, "10.7.0.23", H100)


def test_only_the_layout_built_is_found(bundle):
    store(bundle, "fp16")  # per-member engines, what build makes by default
    assert find_engines(bundle, TRT, ORIN, "members").precision == "fp16"
    with pytest.raises(ArmscopeError, match=r"not the merged layout's ensemble; .*--precision fp16 --layout merged$"):
        find_engines(bundle, TRT, ORIN, "merged")


def test_dla_sets_are_found_and_filtered_by_core(bundle):
    store(bundle, "fp16", dla=0)
    assert find_engines(bundle, TRT, ORIN).dla_core == 0
    assert find_engines(bundle, TRT, ORIN, dla_core=0).index["gpu_fallback"] is True
    with pytest.raises(ArmscopeError, match="built for DLA core 0, DLA core 1 was asked for"):
        find_engines(bundle, TRT, ORIN, dla_core=1)


def test_engines_of_another_version_of_the_bundle_are_not_used(bundle):
    store(bundle, "fp16", source_sha="f" * 64)
    with pytest.raises(ArmscopeError, match="built for another version of this bundle"):
        find_engines(bundle, TRT, ORIN)


def test_a_changed_engine_or_a_damaged_index_is_named(bundle):
    directory = store(bundle, "fp16")
    (directory / "member_2.engine").write_bytes(b"changed on disk")
    with pytest.raises(ArmscopeError, match=r"member_2\.engine: sha256 .* differs from .*engine\.json.*; rebuild it"):
        find_engines(bundle, TRT, ORIN)
    (directory / "member_2.engine").unlink()
    with pytest.raises(ArmscopeError, match=r"member_2\.engine: engine file missing"):
        find_engines(bundle, TRT, ORIN)
    (directory / INDEX).write_text("{not json")
    with pytest.raises(ArmscopeError, match=rf"{INDEX}: not a valid engine index .*delete {directory} and rebuild"):
        find_engines(bundle, TRT, ORIN)


def test_is_jetson_reads_l4t_markers(tmp_path):
    assert not is_jetson(tmp_path)
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "compatible").write_bytes(b"nvidia,p3737-0000\x00nvidia,tegra234\x00")
    assert is_jetson(tmp_path)
    other = tmp_path / "x86"
    (other / "etc").mkdir(parents=True)
    (other / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    assert is_jetson(other)


needs_cpu_only = pytest.mark.skipif(tensorrt_available() or gpu_info() is not None or is_jetson(),
                                    reason="this checks auto on a machine without GPU, TensorRT or Jetson")


@needs_cpu_only
def test_auto_on_a_plain_cpu_machine_is_quiet_and_says_why(bundle, caplog):
    assert gpu_choice(bundle) == (None, "no NVIDIA GPU or TensorRT here", False)
    with caplog.at_level(logging.INFO):
        backend = open_backend(bundle, "auto")
    line = next(r for r in caplog.records if r.getMessage().startswith("backend:"))
    assert line.levelno == logging.INFO and "no NVIDIA GPU or TensorRT here" in line.getMessage()
    info = backend.describe()
    assert info["requested"] == "auto" and info["why"].startswith("no NVIDIA GPU or TensorRT here")


@needs_cpu_only
def test_auto_with_engines_it_cannot_run_falls_back_loudly(bundle, caplog):
    """The bundle has engines (built on a Jetson) but this machine has no GPU: the CPU
    runs it, with a WARNING and a status ``backend`` that says what runs and why."""
    directory = store(bundle, "fp16")
    engines, why, loud = gpu_choice(bundle)
    assert engines is None and loud and directory.name in why and "no NVIDIA GPU" in why
    with caplog.at_level(logging.INFO):
        with open_backend(bundle, "auto") as backend:
            info = backend.describe()
    line = next(r for r in caplog.records if r.getMessage().startswith("backend:"))
    assert line.levelno == logging.WARNING and "on the CPU" in line.getMessage() and directory.name in line.getMessage()
    assert info["backend"] in ("onnxruntime", "openvino") and info["requested"] == "auto"
    assert directory.name in info["why"] and info["thread"] == "MainThread"


@pytest.fixture(scope="module")
def fronted_demo(tmp_path_factory):
    """The demo bundle with its uint8 front (``armscope front``, parity on one real frame)."""
    from armscope.export.uint8_front import add_front

    root = tmp_path_factory.mktemp("fronted") / "b"
    shutil.copytree(SAMPLES / "demo_bundle", root)
    add_front(root, [SAMPLES / "frames" / "cmu1_frame_0.jpg"])
    return root


def test_uint8_engines_are_a_set_of_their_own_tied_to_the_front(fronted_demo, tmp_path):
    shutil.copytree(fronted_demo, tmp_path / "b")
    bundle = load_bundle(tmp_path / "b")
    front_sha = bundle.manifest["uint8_front"]["sha256"]
    sha = bundle_hash(bundle)
    assert engine_key(sha, "fp16", TRT, ORIN, None, "uint8") == engine_key(sha, "fp16", TRT, ORIN, None) + "-u8"
    store(bundle, "fp16")  # a float32 set from before the front: never runs a uint8 feed
    with pytest.raises(ArmscopeError, match=r"built for feed float32, feed uint8 was asked for; build them here "
                                            rf"with: armscope build {bundle.root} --precision fp16 --feed uint8$"):
        find_engines(bundle, TRT, ORIN, feed="uint8")
    stale = store(bundle, "fp16", feed="uint8", front_sha="0" * 64, built="2026-12-02T10:00:00+00:00")
    with pytest.raises(ArmscopeError, match=r"built with another uint8 front"):
        find_engines(bundle, TRT, ORIN, feed="uint8")
    shutil.rmtree(stale)
    u8 = store(bundle, "fp16", feed="uint8", front_sha=front_sha, built="2026-12-03T10:00:00+00:00")
    found = find_engines(bundle, TRT, ORIN, feed="uint8")
    assert found.root == u8 and found.feed == "uint8"
    # the newer uint8 set does not shadow the float32 one for a float32 feed, and vice versa
    assert find_engines(bundle, TRT, ORIN).feed == "float32"
    with pytest.raises(ArmscopeError, match="feed 'bgr': expected one of float32, uint8"):
        find_engines(bundle, TRT, ORIN, feed="bgr")
