"""`armscope classify` gives no diagnosis without tissue: white, grey and
blank-glass frames, a blurred field and a damaged JPEG get "no decision" with
the reason (the daemon's TissueGate, the bundle's thresholds), are left out of
the slide mean, and the real H&E frames are classified as before. Runs the
demo bundle on ONNX Runtime (no TensorFlow)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from armscope.cli import main
from armscope.core.errors import ArmscopeError
from armscope.edge.classify import classify_images

from repo_paths import DEMO_BUNDLE as DEMO
from repo_paths import HE_FIELD as FIELD


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, frame_paths) -> dict[str, Path]:
    if not (DEMO / "manifest.json").is_file():
        pytest.skip("samples/demo_bundle is missing")
    d = tmp_path_factory.mktemp("classify-inputs")
    frame = cv2.imread(str(frame_paths[1]))
    made = {
        "white": np.full((1200, 1600, 3), 255, np.uint8),
        "grey": np.full((1200, 1600, 3), 128, np.uint8),
        # a real field that is mostly bare glass: the top-left corner of the CMU-1 region (8% tissue)
        "glass": cv2.imread(str(FIELD))[:1024, :1024],
        "blurred": cv2.GaussianBlur(frame, (0, 0), 8),
    }
    paths = {}
    for name, image in made.items():
        paths[name] = d / f"{name}.jpg"
        assert cv2.imwrite(str(paths[name]), image)
    paths["corrupt"] = d / "corrupt.jpg"
    paths["corrupt"].write_bytes(frame_paths[2].read_bytes()[:200000])   # cut short: half an image
    for i, p in enumerate(frame_paths):
        paths[f"tissue{i}"] = p
    return paths


EXPECTED = {"white": "no_tissue", "grey": "no_tissue", "glass": "no_tissue", "blurred": "out_of_focus",
            "corrupt": "corrupt_image"}


def test_no_decision_without_tissue_and_left_out_of_the_slide_mean(inputs, tmp_path, capfd):
    order = ["tissue0", "white", "tissue1", "grey", "glass", "tissue2", "blurred", "corrupt", "tissue3"]
    out = tmp_path / "r.json"
    assert main(["classify", "--bundle", str(DEMO), "--json", str(out), "--overlay-dir", str(tmp_path / "ov"),
                 "--threads", "2"] + [str(inputs[k]) for k in order]) == 0
    captured = capfd.readouterr()     # descriptor level: a libjpeg warning would show in err
    printed = captured.out
    assert "Corrupt JPEG" not in captured.err
    report = json.loads(out.read_text())
    by_name = dict(zip(order, report["images"]))
    for name, reason in EXPECTED.items():
        entry = by_name[name]
        assert entry["decision"] is None and entry["probs"] is None, f"{name} was given a diagnosis"
        assert entry["no_decision"]["reason"] == reason
        line = next(x for x in printed.splitlines() if x.startswith(f"{name}.jpg"))
        assert f"no decision: {reason} (" in line
    assert "tissue fraction 0.0000, below 0.1" in by_name["white"]["no_decision"]["detail"]
    assert "corrupt.jpg: corrupt JPEG" in by_name["corrupt"]["no_decision"]["detail"]
    tissue = [by_name[f"tissue{i}"] for i in range(4)]
    assert all(t["decision"] is not None and t["gate"]["tissue_fraction"] >= 0.1 for t in tissue)
    slide = report["slide"]
    assert slide["n_images"] == 9 and slide["n_classified"] == 4 and len(slide["excluded"]) == 5
    classes = report["classes"]
    mean = np.mean([[t["probs"][c] for c in classes] for t in tissue], axis=0)
    np.testing.assert_allclose([slide["probs"][c] for c in classes], mean, atol=2e-6)
    assert "left out of the slide mean" in slide["note"]
    assert "5 of 9 images had no decision and are left out of the slide mean" in printed
    # overlays only for the images that got a decision
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == sorted(f"{p.stem}_overlay.png" for p in
                                                                        (inputs[f"tissue{i}"] for i in range(4)))


def test_gate_decisions_match_the_classification_of_the_same_images_alone(inputs):
    # The tissue frames' results do not depend on the rejected images in the same run.
    alone = classify_images(DEMO, [inputs["tissue1"]], threads=2)["images"][0]
    mixed = classify_images(DEMO, [inputs["white"], inputs["tissue1"]], threads=2)["images"][1]
    assert alone["decision"] == mixed["decision"]
    np.testing.assert_allclose(list(alone["probs"].values()), list(mixed["probs"].values()), atol=1e-6)


def test_only_images_without_tissue_give_a_slide_without_decision(inputs, capsys):
    assert main(["classify", "--bundle", str(DEMO), str(inputs["white"]), str(inputs["glass"])]) == 0
    printed = capsys.readouterr().out
    slide_line = next(x for x in printed.splitlines() if x.startswith("slide (mean)"))
    assert "no decision: no_classified_image (no image was classified: no_tissue)" in slide_line


def test_the_manifest_carries_the_gate_for_its_modality(inputs, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tissue_gate"] = {"min_tissue_fraction": 0.05}      # a sparser tissue, say
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    report = classify_images(bundle, [inputs["glass"], inputs["white"]], threads=2)
    assert report["tissue_gate"]["min_tissue_fraction"] == 0.05 and report["tissue_gate"]["min_focus"] == 150.0
    assert report["images"][0]["decision"] is not None          # 8% tissue is enough for this bundle
    assert report["images"][1]["decision"] is None
    manifest["tissue_gate"] = {"min_tissue_fraction": 2}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArmscopeError, match="tissue_gate"):
        classify_images(bundle, [inputs["glass"]])
    manifest["tissue_gate"] = {"min_tisue_fraction": 0.2}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArmscopeError, match="tissue_gate"):
        classify_images(bundle, [inputs["glass"]])


def test_the_daemon_uses_the_same_gate_and_its_keys_win(tmp_path):
    from armscope.edge.config import load_config
    from armscope.edge.daemon import Daemon

    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["tissue_gate"] = {"min_tissue_fraction": 0.05, "min_focus": 60.0}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    base = dict(bundle=str(bundle), source="image://x.png", slides_dir=str(tmp_path / "s"),
                snapshot_dir=str(tmp_path / "n"))
    gate = Daemon(load_config(None, base)).gate
    assert (gate.min_tissue_fraction, gate.min_focus, gate.min_saturation, gate.max_brightness) == (0.05, 60.0, 20, 235)
    gate = Daemon(load_config(None, {**base, "min_tissue_fraction": 0.2})).gate
    assert (gate.min_tissue_fraction, gate.min_focus) == (0.2, 60.0)
    gate = Daemon(load_config(None, {**base, "bundle": str(DEMO)})).gate
    assert (gate.min_tissue_fraction, gate.min_focus) == (0.1, 150.0)
    with pytest.raises(ArmscopeError, match="min_focus.*expected -1"):
        load_config(None, {**base, "min_focus": -0.5})
