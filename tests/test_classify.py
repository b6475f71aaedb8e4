"""`armscope classify` on real camera-sized H&E frames."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from armscope.core.bundle import load_bundle
from armscope.cli import main
from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend
from armscope.core.decision import decide
from armscope.core.overlay import focus_mask, heat_rgba

pytest.importorskip("tensorflow")


def test_classify_writes_json_and_overlays(mini_bundle, frame_paths, tmp_path, capsys):
    out_json, overlays = tmp_path / "r.json", tmp_path / "overlays"
    code = main(["classify", "--bundle", str(mini_bundle), "--json", str(out_json), "--overlay-dir", str(overlays)]
                + [str(p) for p in frame_paths])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert len(report["images"]) == len(frame_paths)
    per_image = np.array([[r["probs"][c] for c in report["classes"]] for r in report["images"]])
    slide = np.array([report["slide"]["probs"][c] for c in report["classes"]])
    np.testing.assert_allclose(slide, per_image.mean(axis=0), atol=2e-6)
    for r in report["images"]:
        assert r["decision"]["positive"] == (r["probs"]["tumour"] >= 0.3)
    for path in frame_paths:
        png = cv2.imread(str(overlays / f"{path.stem}_overlay.png"))
        assert png is not None and png.shape == cv2.imread(str(path)).shape
        # the overlay changed the crop region and left the border untouched
        frame = cv2.imread(str(path))
        assert np.array_equal(png[:50, :50], frame[:50, :50])
        assert np.abs(png[400:800, 500:1100].astype(int) - frame[400:800, 500:1100]).mean() > 1
    assert "slide (mean)" in capsys.readouterr().out


def test_small_image_fails_cleanly_and_writes_nothing(mini_bundle, tile_paths, frame_paths, tmp_path, capsys):
    overlays = tmp_path / "overlays"
    code = main(["classify", "--bundle", str(mini_bundle), "--overlay-dir", str(overlays),
                 str(frame_paths[0]), str(tile_paths[0])])
    assert code == 2
    err = capsys.readouterr().err
    assert tile_paths[0].name in err and "smaller than the 1024x1024 centre crop" in err
    assert not overlays.exists()


def test_unreadable_image(mini_bundle, tmp_path, capsys):
    """No image at all among the inputs: no decision, not an abort (tests/test_classify_damaged.py has the rest)."""
    bad = tmp_path / "frame.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["classify", "--bundle", str(mini_bundle), str(bad)]) == 0
    out = capsys.readouterr().out
    assert "no decision: corrupt_image" in out and "frame.jpg: not a readable image" in out


def test_member_and_merged_layouts_agree(mini_bundle, real_inputs):
    bundle = load_bundle(mini_bundle)
    with OnnxRuntimeBackend(bundle, "merged") as merged, OnnxRuntimeBackend(bundle, "members") as members:
        a, b = merged.infer(real_inputs[:3]), members.infer(real_inputs[:3])
    for name in ("probs", "patch_probs", "cam"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_binary_decision_uses_threshold_not_argmax():
    task = {"type": "binary", "classes": ["other", "IIM"], "positive_class": "IIM", "threshold": 0.3}
    assert decide(np.array([0.65, 0.35]), task)["label"] == "IIM"
    assert decide(np.array([0.75, 0.25]), task)["label"] == "other"
    assert decide(np.array([0.75, 0.25]), task, threshold=0.2)["label"] == "IIM"
    multi = {"type": "multiclass", "classes": ["a", "b", "c"]}
    assert decide(np.array([0.2, 0.5, 0.3]), multi)["label"] == "b"


def test_overlay_outline_marks_cells_above_median():
    cam = np.zeros((20, 20), np.float32)
    cam[2:6, 3:9] = 1.0
    cam[10:12, 10:12] = 0.5
    mask = focus_mask(cam)
    assert mask.sum() == 4 * 6 + 4 and not mask[0, 0]
    rgba = heat_rgba(cam, 640)
    assert rgba.shape == (640, 640, 4)
    assert rgba[0, 0, 3] == 0                       # cold: transparent
    assert rgba[4 * 32, 6 * 32, 3] > 100            # hot: visible
    assert (rgba[..., 3] == 255).any()              # the outline is drawn opaque


@pytest.mark.parametrize("bundle, value, message", [
    ("demo_bundle", "1.5", r"--threshold: 1\.5 is not a threshold \(expected a number in 0\.\.1\)"),
    ("demo_bundle", "nan", r"--threshold: nan is not a threshold"),  # NaN would decide every image "other"
    ("demo_tissue_bundle", "0.4", r"--threshold: the bundle's task is 'multiclass'; a threshold applies to binary"),
])
def test_classify_refuses_a_threshold_it_cannot_use(frame_paths, capsys, bundle, value, message):
    import re

    from repo_paths import SAMPLES as samples

    assert main(["classify", "--bundle", str(samples / bundle), "--threshold", value, str(frame_paths[0])]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_export_refuses_a_bad_threshold_before_converting(tmp_path, capsys):
    # the members need not exist: the flag is checked before anything is read or converted
    assert main(["export", str(tmp_path / "m.keras"), "--out", str(tmp_path / "b"), "--classes", "a,b",
                 "--threshold", "2"]) == 2
    assert "--threshold: 2.0 is not a threshold" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
