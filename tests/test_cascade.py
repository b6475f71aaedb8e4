"""The paper's two steps as a cascade bundle: ``armscope cascade`` assembles
one from real bundles, ``classify`` and the daemon run the second step that
step one's decision selects on the same field, and bad cascades are refused
with the manifest field named. Real graphs throughout: step one is the demo
bundle (tumour vs other), the second step the demo tissue-type bundle (which
non-tumour tissue), both trained on the bundled NCT-CRC-HE-100K tiles."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from armscope.core import protocol
from armscope.core.bundle import MANIFEST, load_bundle
from armscope.cli import main as cli_main
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import load_image, preprocess_frame
from armscope.edge.backends import open_backend
from armscope.edge.cascade import assemble, load_steps
from armscope.edge.classify import classify_images
from armscope.edge.config import load_config
from armscope.edge.daemon import Daemon
from armscope.core.overlay import heat_rgba
from armscope.edge.capture import Frame

from daemon_support import OS_PORT

from repo_paths import DEMO_BUNDLE as STEP_ONE
from repo_paths import FRAMES
from repo_paths import TISSUE_BUNDLE as TISSUE


@pytest.fixture(scope="module")
def cascade(tmp_path_factory) -> Path:
    """tumour vs other; a field decided ``other`` goes on to the tissue-type step."""
    out = tmp_path_factory.mktemp("cascade") / "bundle"
    assemble(STEP_ONE, {"other": TISSUE}, out)
    return out


@pytest.fixture(scope="module")
def tissue_outputs():
    """The tissue bundle run on its own on each demo frame: what the second step must report."""
    bundle = load_bundle(TISSUE)
    with open_backend(bundle, "onnxruntime") as backend:
        return [backend.infer(preprocess_frame(load_image(p), bundle.preprocessing)[None]) for p in FRAMES]


def test_assembled_cascade_is_self_contained_and_verified(cascade):
    bundle = load_bundle(cascade)
    assert bundle.task["type"] == "cascade" and bundle.task["positive_class"] == "tumour"
    assert bundle.task["steps"] == [{"when": "other", "bundle": "steps/other"}]
    steps = load_steps(bundle)
    assert list(steps) == ["other"]
    assert steps["other"].bundle.root == cascade / "steps" / "other"
    assert steps["other"].bundle.classes == load_bundle(TISSUE).classes
    assert (cascade / "ensemble.onnx").read_bytes() == (STEP_ONE / "ensemble.onnx").read_bytes()


def test_classify_runs_the_selected_step_on_the_same_field(cascade, tissue_outputs, tmp_path):
    # threshold 0.99 on "tumour": every demo frame is decided "other" and goes on to the tissue step
    report = classify_images(cascade, FRAMES, threshold=0.99, overlay_dir=tmp_path / "ov")
    tissue_classes = load_bundle(TISSUE).classes
    for image, expected in zip(report["images"], tissue_outputs):
        assert image["decision"]["label"] == "other"
        sub = image["subtype"]
        assert sub["when"] == "other" and sub["classes"] == tissue_classes
        np.testing.assert_allclose(sub["probs"], expected["probs"][0], atol=2e-6)
        assert sub["decision"]["label"] == tissue_classes[int(np.argmax(expected["probs"][0]))]
    slide = report["slide"]
    assert slide["images_per_step"] == {"other": len(FRAMES)}
    np.testing.assert_allclose(slide["subtype"]["probs"],
                               np.mean([o["probs"][0] for o in tissue_outputs], axis=0), atol=2e-6)
    assert slide["subtype"]["n_fields"] == len(FRAMES)
    assert len(list((tmp_path / "ov").glob("*.png"))) == len(FRAMES)

    # at the manifest's threshold the demo frames are "tumour", which has no second step
    report = classify_images(cascade, FRAMES)
    assert all(i["decision"]["label"] == "tumour" and "subtype" not in i for i in report["images"])
    assert report["slide"]["subtype"] is None and report["slide"]["images_per_step"] == {"other": 0}


def _daemon(cascade, tmp_path, threshold):
    config = load_config(None, {"bundle": str(cascade), "source": f"image://{FRAMES[0]}", "threshold": threshold,
                                "publish": OS_PORT, "control": OS_PORT, "threads": 2,
                                "slides_dir": str(tmp_path / "slides"), "snapshot_dir": str(tmp_path / "snap")})
    daemon = Daemon(config)
    daemon.open()
    daemon.activate_backends()  # on this thread, which calls process_frame
    return daemon


def test_daemon_publishes_the_second_step_and_its_cam(cascade, tissue_outputs, tmp_path):
    daemon = _daemon(cascade, tmp_path, 0.99)
    sub = protocol.Subscriber(daemon.endpoints["publish"])
    try:
        assert daemon.status_reply()["steps"] == {"other": daemon.steps["other"].result([0.0] * 8)["model_id"]}
        time.sleep(0.3)  # let the SUB socket connect before the first overlay
        daemon.slides.start("S-CASCADE")
        headers = []
        for i, path in enumerate(FRAMES[:2], 1):
            headers.append(daemon.process_frame(Frame(i, load_image(path), time.monotonic(), time.time())))
            _, rgba, _ = daemon.last
            rgba = rgba() if callable(rgba) else rgba   # the snapshot's bitmap, drawn when one is asked for
            cam = tissue_outputs[i - 1]["cam"][0, headers[-1]["subtype"]["decision"]["index"]]
            np.testing.assert_array_equal(rgba, heat_rgba(cam, daemon.overlay_size, max_alpha=daemon.config.max_alpha))
        record = daemon.handle_command("slide", ["end"])["slide"]
        received = []
        while (message := sub.recv(2000)) is not None:  # validated by protocol.decode, as the bridge does
            if message.topic == "overlay":
                received.append(message)
            if len(received) == 2:
                break
    finally:
        sub.close()
        daemon.shutdown()
    for header, expected in zip(headers, tissue_outputs):
        assert header["decision"]["label"] == "other"
        np.testing.assert_allclose(header["subtype"]["probs"], expected["probs"][0], atol=2e-6)
    assert [m.header["subtype"] for m in received] == [h["subtype"] for h in headers]
    # protocol v2: the overlay carries the second step's maps and points at its decided class
    for message, expected in zip(received, tissue_outputs):
        maps = expected["cam"][0]
        assert message.header["cam"]["index"] == message.header["subtype"]["decision"]["index"]
        np.testing.assert_allclose(protocol.cam_array(message), maps, rtol=1e-3, atol=1e-3 * float(maps.max()))
    assert record["decision"]["label"] == "other" and record["fields_per_step"] == {"other": 2}
    np.testing.assert_allclose(record["subtype"]["probs"], np.mean([o["probs"][0] for o in tissue_outputs[:2]], axis=0),
                               atol=2e-6)


def test_daemon_without_a_selected_step_sends_null(cascade, tmp_path):
    daemon = _daemon(cascade, tmp_path, 0.3)
    try:
        header = daemon.process_frame(Frame(1, load_image(FRAMES[0]), time.monotonic(), time.time()))
    finally:
        daemon.shutdown()
    assert header["decision"]["label"] == "tumour" and header["subtype"] is None


@pytest.mark.parametrize("breakage, needle", [
    ("when_not_a_class", "task.steps.0.when: 'STR' is not one of step one's classes"),
    ("preprocessing", "task.steps.0.bundle"),
    ("nested", "is itself a cascade"),
    ("not_deployable", "quantization.deployable is false"),
    ("missing", "task.steps.0.bundle"),
])
def test_bad_cascades_are_refused_naming_the_field(cascade, tmp_path, breakage, needle):
    bad = tmp_path / "bad"
    shutil.copytree(cascade, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    sub_manifest_path = bad / "steps" / "other" / MANIFEST
    sub_manifest = json.loads(sub_manifest_path.read_text())
    if breakage == "when_not_a_class":
        manifest["task"]["steps"][0]["when"] = "STR"
    elif breakage == "preprocessing":
        sub_manifest["preprocessing"]["center_crop"] = 800
    elif breakage == "nested":
        shutil.copytree(cascade, bad / "steps" / "nested")
        manifest["task"]["steps"][0]["bundle"] = "steps/nested"
    elif breakage == "not_deployable":
        sub_manifest["quantization"] = {"source": {"name": "fp32", "ensemble_sha256": "0" * 64}, "deployable": False}
    elif breakage == "missing":
        shutil.rmtree(bad / "steps" / "other" / "members")
    (bad / MANIFEST).write_text(json.dumps(manifest))
    sub_manifest_path.write_text(json.dumps(sub_manifest))
    with pytest.raises(ArmscopeError, match=needle.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_steps(load_bundle(bad))
    assert str(bad / MANIFEST) in str(caught.value)
    with pytest.raises(ArmscopeError, match="key 'bundle'"):  # the daemon refuses it at start-up, naming its key
        Daemon(load_config(None, {"bundle": str(bad), "source": f"image://{FRAMES[0]}"}))


def test_cli_assembles_and_refuses(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli_main(["cascade", str(STEP_ONE), "--then", f"other={TISSUE}", "--out", str(out)]) == 0
    assert "wrote cascade bundle" in capsys.readouterr().out
    assert cli_main(["inspect", str(out)]) == 0
    assert "then      when 'other': steps/other" in capsys.readouterr().out
    assert cli_main(["classify", "--bundle", str(out), "--threshold", "0.99", *map(str, FRAMES)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert all(" other -> " in line for line in table[1 : 1 + len(FRAMES)]), table
    assert table[1 + len(FRAMES)].startswith("slide (mean)") and f"(over {len(FRAMES)} images)" in table[1 + len(FRAMES)]

    refused = [
        (["--then", f"STR={TISSUE}"], "is not one of step one's classes"),
        (["--then", str(TISSUE)], "expected CLASS=BUNDLE_DIR"),
        (["--then", f"other={TISSUE}", "--then", f"other={TISSUE}"], "already given"),
    ]
    for extra, needle in refused:
        target = tmp_path / "refused"
        assert cli_main(["cascade", str(STEP_ONE), *extra, "--out", str(target)]) == 2
        assert needle in capsys.readouterr().err
        assert not target.exists(), "a refused cascade left files behind"
    # step one must be binary: the tissue bundle is multiclass
    assert cli_main(["cascade", str(TISSUE), "--then", f"ADI={STEP_ONE}", "--out", str(tmp_path / "x")]) == 2
    assert "step one must be a binary bundle" in capsys.readouterr().err
    # the output may not be, or be inside, an input bundle (copying a bundle into itself)
    first = tmp_path / "first"
    shutil.copytree(STEP_ONE, first)
    for target in (first, first / "cascade", tmp_path):
        assert cli_main(["cascade", str(first), "--then", f"other={TISSUE}", "--out", str(target), "--force"]) == 2
        assert "must not be, lie inside or contain an input" in capsys.readouterr().err
    assert not (first / "cascade").exists() and load_bundle(first).task["type"] == "binary"


def test_protocol_checks_subtype_when_present():
    header = {"run_id": "r", "seq": 1, "publish_mono": 1.0, "publish_wall": 1.0, "model_id": "m", "slide_id": None,
              "stale_after_ms": 500, "encoding": "raw", "frame_id": 1, "capture_mono": 1.0, "capture_wall": 1.0,
              "classes": ["a", "b"], "probs": [0.5, 0.5], "decision": {"label": "a", "index": 0, "score": 0.5},
              "region": {"frame_width": 4, "frame_height": 4, "x": 0, "y": 0, "size": 4},
              "cam": {"dtype": "uint8", "classes": 1, "height": 2, "width": 2, "index": 0, "scale": 1.0, "peak": 3.0,
                      "threshold": 1.0, "max_alpha": 0.6, "box": {"x": 0, "y": 0, "size": 4}}}
    payload = bytes([0, 1, 2, 3])
    assert "subtype" not in protocol.decode(protocol.encode("overlay", header, payload)).header  # optional
    ok = {"when": "a", "model_id": "s", "classes": ["x", "y", "z"], "probs": [0.2, 0.3, 0.5],
          "decision": {"label": "z", "index": 2, "score": 0.5}}
    assert protocol.decode(protocol.encode("overlay", dict(header, subtype=ok), payload)).header["subtype"] == ok
    assert protocol.decode(protocol.encode("overlay", dict(header, subtype=None), payload)).header["subtype"] is None
    for bad in ([1, 2], dict(ok, probs=[0.5, 0.5]), dict(ok, decision="z"), {"classes": ["x"]}):
        with pytest.raises(protocol.ProtocolError, match=r"header keys? subtype"):
            protocol.decode(protocol.encode("overlay", dict(header, subtype=bad), payload))


@pytest.mark.parametrize("argv", [
    ["quantize", "{c}", "--precision", "fp16", "--out", "{o}", "--holdout", "{c}"],
    ["build", "{c}", "--precision", "fp16", "--out", "{o}"],
    ["accuracy", "--bundle", "{c}", "--backend", "openvino", "--images", "{c}", "--out", "{o}"],
])
def test_single_model_tools_refuse_a_cascade_up_front(cascade, tmp_path, capsys, argv):
    """quantize/build/accuracy would touch step one only; they say so before any work."""
    out = tmp_path / "out"
    started = time.monotonic()
    assert cli_main([a.format(c=cascade, o=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "field task.type: cascade (other -> steps/other)" in err and "armscope cascade" in err, err
    assert time.monotonic() - started < 10 and not out.exists()


def test_inspect_checks_a_cascade_as_the_daemon_would(cascade, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(cascade, bad)
    sub = bad / "steps" / "other" / MANIFEST
    manifest = json.loads(sub.read_text())
    manifest["preprocessing"]["center_crop"] = 800
    sub.write_text(json.dumps(manifest))
    assert cli_main(["inspect", str(bad)]) == 2
    assert "task.steps.0.bundle" in capsys.readouterr().err
