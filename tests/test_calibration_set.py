"""Calibration sets from the repository's real H&E frames (samples/)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from armscope.cli import main
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import Preprocessing, load_image, preprocess_frame
from armscope.calibration.calibration_set import build_calibration_set, load_calibration_set

from repo_paths import SAMPLES
FIELD = SAMPLES / "he" / "cmu-small-region"


def test_stratified_set_matches_daemon_preprocessing(tmp_path, frame_paths):
    out = tmp_path / "calib.npz"
    m = build_calibration_set([SAMPLES / "frames", FIELD], out, size=6, frame_size=(1600, 1200))
    assert m["size"] == 6
    # both sources take turns: neither the 12 windows of the field nor the 4 frames dominate
    counts = m["per_source"]
    assert len(counts) == 5 and max(counts.values()) - min(counts.values()) <= 1 or \
        sum(1 for k in counts if "cmu_small_region" in k) == 1
    calib = load_calibration_set(out)
    assert calib.images.shape == (6, 640, 640, 3) and calib.images.dtype == np.float32
    # every stored frame is bit-identical to the daemon's preprocessing of the recorded source
    for image, record in zip(calib.images, calib.manifest["frames"]):
        frame = load_image(record["source"])
        if "window" in record:
            w = record["window"]
            frame = frame[w["top"] : w["top"] + w["height"], w["left"] : w["left"] + w["width"]]
        np.testing.assert_array_equal(image, preprocess_frame(np.ascontiguousarray(frame), Preprocessing()))
        assert record["tissue_fraction"] > 0 and record["focus"] > 0


def _camera_frames(tmp_path: Path) -> Path:
    """Class subfolders of real frames, plus blank glass and an out-of-focus frame."""
    root = tmp_path / "frames"
    field = load_image(FIELD / "cmu_small_region_level0.jpg")
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i, (y, x) in enumerate([(0, 0), (1700, 600), (900, 300), (1500, 0), (300, 620)]):
        cv2.imwrite(str(root / "a" / f"a{i}.png"), field[y : y + 1200, x : x + 1600])
    for i, (y, x) in enumerate([(400, 100), (1200, 500)]):
        cv2.imwrite(str(root / "b" / f"b{i}.png"), field[y : y + 1200, x : x + 1600])
    glass = np.clip(np.random.default_rng(0).normal(242, 3, (1200, 1600, 3)), 0, 255).astype(np.uint8)
    cv2.imwrite(str(root / "b" / "glass.png"), glass)
    cv2.imwrite(str(root / "b" / "blurred.png"), cv2.GaussianBlur(field[600:1800, 300:1900], (0, 0), 8))
    return root


def test_classes_stratified_and_blank_or_blurred_frames_skipped(tmp_path):
    root = _camera_frames(tmp_path)
    out = tmp_path / "calib.npz"
    m = build_calibration_set([root], out, size=7)
    assert m["classes"] == ["a", "b"]
    assert m["per_class"] == {"a": 5, "b": 2}
    assert m["skipped"] == {"no_tissue": 1, "out_of_focus": 1}
    assert not any("glass" in r["source"] or "blurred" in r["source"] for r in m["frames"])


def test_too_few_usable_frames_fails_without_output(tmp_path):
    root = _camera_frames(tmp_path)
    out = tmp_path / "calib.npz"
    with pytest.raises(ArmscopeError, match=r"only 7 usable frame\(s\), --size asks for 9 .*1 no tissue, 1 out of focus"):
        build_calibration_set([root], out, size=9)
    assert not out.exists() and not list(tmp_path.glob(".calib*"))


def test_no_readable_images(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "c.npz"
    assert main(["calibration-set", "--out", str(out), "--size", "2", str(bad)]) == 2
    assert not out.exists()
    with pytest.raises(ArmscopeError, match="no readable images"):
        build_calibration_set([bad], out, size=2)
    with pytest.raises(ArmscopeError, match="no image or video files"):
        build_calibration_set([_empty(tmp_path)], out, size=2)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_small_images_are_skipped_and_counted(tmp_path, tile_paths):
    with pytest.raises(ArmscopeError, match="9 smaller than crop"):
        build_calibration_set([SAMPLES / "he" / "nct-crc-he-100k"], tmp_path / "c.npz", size=2)


def test_corrupt_and_foreign_sets_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ArmscopeError, match=r"corrupt.npz: corrupt or unreadable calibration set"):
        load_calibration_set(corrupt)
    wrong = tmp_path / "wrong.npz"
    manifest = {"format": "armscope-calibration-set", "format_version": 1, "size": 1, "frames": [{}],
                "preprocessing": Preprocessing().to_manifest()}
    np.savez(wrong, images=np.zeros((1, 320, 320, 3), np.uint8), manifest=np.array(json.dumps(manifest)))
    with pytest.raises(ArmscopeError, match=r"wrong.npz: field images: uint8 \(1, 320, 320, 3\), expected"):
        load_calibration_set(wrong)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ArmscopeError, match="not an armscope calibration set"):
        load_calibration_set(other)


def test_cli_writes_a_set(tmp_path, capsys):
    out = tmp_path / "c.npz"
    assert main(["calibration-set", "--out", str(out), "--size", "3", "--bundle", str(SAMPLES / "demo_bundle"),
                 str(SAMPLES / "frames")]) == 0
    assert "3 frames from 3 source(s)" in capsys.readouterr().out
    assert len(load_calibration_set(out)) == 3
    assert main(["calibration-set", "--out", str(out), "--size", "3", str(SAMPLES / "frames")]) == 2  # exists
