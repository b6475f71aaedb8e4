"""The backend lifecycle on the CPU runtimes, for real: construct cheaply,
activate on the thread that infers, infer, deactivate; everything freed when
activation fails halfway; the daemon's threading contract (constructed on the
main thread, activated, run and freed on its ``inference`` thread) giving the
single-thread results on real frames; and the daemon itself activating on its
inference thread, saying so in ``status``, and refusing to start, with
nothing left running, when activation fails."""
from __future__ import annotations

import gc
import shutil
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from armscope.core import protocol
from armscope.core.bundle import load_bundle
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import load_image, preprocess_frame
from armscope.calibration.derive import subset_bundle
from armscope.edge.backends import open_backend
from daemon_support import OS_PORT

from repo_paths import SAMPLES
FRAMES = sorted((SAMPLES / "frames").glob("*.jpg"))[:2]
KINDS = ["onnxruntime", "openvino"]


def _needs(kind: str) -> None:
    if kind == "openvino":
        pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def two_members(tmp_path_factory) -> Path:
    """The demo bundle's first two members: a real 'members' layout, half the work."""
    return subset_bundle(load_bundle(SAMPLES / "demo_bundle"), [0, 1], tmp_path_factory.mktemp("lifecycle") / "b")


@pytest.fixture(scope="module")
def frames(two_members) -> np.ndarray:
    spec = load_bundle(two_members).preprocessing
    return np.stack([preprocess_frame(load_image(p), spec) for p in FRAMES])


def _damage_member_1_after_loading(root: Path, tmp_path: Path):
    """A copy of ``root``, loaded (hashes verified), then its second member file damaged:
    the first graph opens, the second fails, as a disk error would make it."""
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    bundle = load_bundle(copy)
    member_1 = bundle.member_paths[1]
    good = member_1.read_bytes()
    member_1.write_bytes(b"\x08\x07 not an ONNX graph any more")
    return bundle, member_1, good


def _runtime_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("ort-member")]


def test_construction_is_cheap_and_infer_needs_activation(two_members, frames):
    backend = open_backend(load_bundle(two_members), "onnxruntime", layout="members", threads=2)
    assert not backend.active and backend.sessions == [] and backend.describe()["thread"] is None
    with pytest.raises(ArmscopeError, match=r"onnxruntime backend: infer\(\) before activate\(\)"):
        backend.infer(frames[:1])
    with backend:
        assert backend.active and len(backend.sessions) == 2
        assert backend.describe()["thread"] == threading.current_thread().name
        with pytest.raises(ArmscopeError, match="already active"):
            backend.activate()
    assert not backend.active and backend.sessions == [] and backend.pool is None


@pytest.mark.parametrize("kind", KINDS)
def test_activation_failing_halfway_frees_what_it_acquired(kind, two_members, frames, tmp_path, monkeypatch):
    """The first member's session/compiled graph is created, the second member's file
    is damaged: activation raises naming that file, and the first one is gone (no
    reference left anywhere), as are the member threads; once the file is back the
    same backend object activates and runs."""
    _needs(kind)
    bundle, member_1, good = _damage_member_1_after_loading(two_members, tmp_path)
    if kind == "onnxruntime":
        import armscope.edge.backends.onnxruntime_backend as module

        name = "open_session"
    else:
        import armscope.edge.backends.openvino_backend as module

        name = "compile_graph"
    real, created = getattr(module, name), []

    def watched(*args, **kwargs):  # the runtime's real objects, watched through weak references
        obj = real(*args, **kwargs)
        created.append(weakref.ref(obj))
        return obj

    monkeypatch.setattr(module, name, watched)
    backend = open_backend(bundle, kind, layout="members", threads=2)
    with pytest.raises(ArmscopeError, match=r"member_1\.onnx: (ONNX Runtime|OpenVINO) could not"):
        backend.activate()
    assert len(created) == 1, "the first member's graph should have been opened before the failure"
    gc.collect()
    assert created[0]() is None, "the first member's session/compiled graph outlived the failed activation"
    assert not backend.active and _runtime_threads() == []
    assert (backend.sessions if kind == "onnxruntime" else backend.compiled) == []
    member_1.write_bytes(good)
    with backend:
        out = backend.infer(frames[:1])
    assert np.isfinite(out["probs"]).all() and out["probs"].shape == (1, 2)


def test_a_warm_up_failure_stops_the_member_threads(tmp_path, two_members):
    """A graph that loads but cannot run fails in the warm-up, after the member
    threads ran it: they are shut down too (tests/test_backend_onnxruntime.py
    covers the message)."""
    from tests.test_backend_onnxruntime import _fails_when_run

    bundle, member_1, _good = _damage_member_1_after_loading(two_members, tmp_path)
    shutil.copy2(bundle.member_paths[0], member_1)
    _fails_when_run(member_1)
    backend = open_backend(bundle, "onnxruntime", layout="members", threads=2)
    with pytest.raises(ArmscopeError, match="loads this graph but cannot run it"):
        backend.activate()
    assert _runtime_threads() == [] and backend.sessions == [] and not backend.active


@pytest.mark.parametrize("kind,layout", [("onnxruntime", "members"),   # OpenVINO compiles: ~7 s each
                                         pytest.param("openvino", "merged", marks=pytest.mark.slow),
                                         pytest.param("openvino", "members", marks=pytest.mark.slow)])
def test_the_daemons_threading_contract_gives_single_thread_results(kind, layout, two_members, frames):
    """As the daemon does it: constructed on this thread, activated, run and freed on
    a thread named 'inference'; the outputs equal a single-thread run on real frames."""
    _needs(kind)
    bundle = load_bundle(two_members)
    with open_backend(bundle, kind, layout=layout, threads=2) as single:
        reference = single.infer(frames)
    backend = open_backend(bundle, kind, layout=layout, threads=2)
    seen: dict = {}

    def inference():
        backend.activate()
        try:
            seen["out"] = backend.infer(frames)
            seen["describe"] = backend.describe()
        finally:
            backend.deactivate()
        seen["active_after"] = backend.active

    thread = threading.Thread(target=inference, name="inference")
    thread.start()
    thread.join(300)
    assert not thread.is_alive() and "out" in seen, "the inference thread failed (see the log)"
    assert seen["describe"]["thread"] == "inference" and seen["active_after"] is False
    for name in bundle.output_names:
        np.testing.assert_allclose(seen["out"][name], reference[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert (seen["out"]["probs"].argmax(1) == reference["probs"].argmax(1)).all()


def _config(bundle_dir: Path, tmp_path: Path, **overrides):
    from armscope.edge.config import load_config

    options = dict(bundle=str(bundle_dir), source=f"image://{FRAMES[0]}?fps=4", publish=OS_PORT,
                   control=OS_PORT, threads=2, backend="onnxruntime", heartbeat_hz=5.0,
                   slides_dir=str(tmp_path / "slides"), snapshot_dir=str(tmp_path / "snapshots"))
    options.update(overrides)
    return load_config(None, options)


def test_the_daemon_activates_on_its_inference_thread_and_says_so(two_members, tmp_path):
    from armscope.edge.daemon import Daemon

    config = _config(two_members, tmp_path)
    daemon = Daemon(config)
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("rc", daemon.run(install_signals=False)),
                              name="daemon-under-test", daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while daemon.published < 1 and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert daemon.published >= 1, "no overlay published"
        status = protocol.control_request("status", daemon.endpoints["control"], timeout_ms=5000)
    finally:
        daemon.request_stop("test over")
        runner.join(60)
    assert result.get("rc") == 0
    backend = status["backend"]
    assert backend["backend"] == "onnxruntime" and backend["thread"] == "inference"
    assert backend["layout"] == "members" and backend["sessions"] == 2
    assert daemon.backend is None and _runtime_threads() == []   # freed on the way out


def test_a_daemon_whose_backend_cannot_activate_does_not_start(two_members, tmp_path):
    """The bundle verifies when the daemon loads it; a member damaged afterwards makes
    activation on the inference thread fail: ``run`` raises that error (the CLI's exit
    status 2) and no pipeline or runtime thread is left running."""
    from armscope.edge.daemon import Daemon

    copy = tmp_path / "copy"
    shutil.copytree(two_members, copy)
    daemon = Daemon(_config(copy, tmp_path))
    (copy / "members" / "member_1.onnx").write_bytes(b"damaged")
    with pytest.raises(ArmscopeError, match=r"member_1\.onnx: ONNX Runtime could not load it"):
        daemon.run(install_signals=False)
    time.sleep(0.2)
    alive = {t.name for t in threading.enumerate()}
    assert not alive & {"inference", "capture", "preprocess", "render", "heartbeat"}, alive
    assert _runtime_threads() == [] and daemon.publisher.closed
