"""``armscope accuracy``'s statistics against the standard implementations, and its charts:
drawn with matplotlib when the ``plots`` extra is installed, left out with a one-line note
when it is not (the report itself never needs it)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from armscope.calibration import agreement, charts
from armscope.calibration.accuracy import accuracy_report

from repo_paths import DEMO_BUNDLE as BUNDLE
from repo_paths import REPO
from repo_paths import FRAMES as ALL_FRAMES

FRAMES = ALL_FRAMES[:3]


@pytest.mark.tf  # scikit-learn and scipy come with the [tf] extra, not the base install
def test_auc_and_pearson_match_sklearn_and_scipy():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    pearsonr = pytest.importorskip("scipy.stats").pearsonr
    rng = np.random.default_rng(7)
    for n, levels in ((5, 3), (40, 6), (200, 1000), (31, 2)):  # few levels: many ties, which count half
        scores = rng.integers(0, levels, n) / levels
        positive = rng.random(n) < 0.4
        positive[:2] = [True, False]
        assert agreement.auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
        a, b = rng.random((20, 20)), rng.random((20, 20))
        b += a * levels / 1000
        assert agreement.pearson(a, b) == pytest.approx(pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert agreement.auc(np.array([0.2, 0.7]), np.array([True, True])) is None  # one class only


def test_pearson_of_flat_maps_is_defined():
    flat = np.full((20, 20), 0.3)
    assert agreement.pearson(flat, flat.copy()) == 1.0
    assert agreement.pearson(flat, np.random.default_rng(0).random((20, 20))) == 0.0


def test_report_on_real_frames_draws_the_charts(tmp_path):
    pytest.importorskip("matplotlib")
    import cv2

    out = tmp_path / "report"
    report = accuracy_report(BUNDLE, BUNDLE, FRAMES, out, backend="onnxruntime", threads=2)
    assert report["plots"] == list(charts.CHARTS) and "plots_skipped" not in report
    for name in charts.CHARTS:
        image = cv2.imread(str(out / name))
        assert image is not None and image.shape[0] > 200 and image.std() > 10, name  # a drawn PNG, not blank
    md = (out / "report.md").read_text()
    assert all(f"![{name}]({name})" in md for name in charts.CHARTS)
    s = report["summary"]  # the bundle against itself: full agreement, and the gate passes
    assert s["top1_agreement"] == 1.0 and s["cam_pearson_min"] == pytest.approx(1.0) and report["gate_reasons"] == []


def test_report_without_matplotlib_leaves_the_charts_out_with_one_note(tmp_path):
    """A base install (no [plots] extra): run in a process where matplotlib cannot be imported."""
    out = tmp_path / "report"
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # what an absent package looks like to import
            "from pathlib import Path\n"
            "from armscope.calibration.accuracy import accuracy_report\n"
            f"accuracy_report(Path({str(BUNDLE)!r}), Path({str(BUNDLE)!r}), [Path(p) for p in {list(map(str, FRAMES[:2]))!r}], "
            f"Path({str(out)!r}), threads=2)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "per_image.csv"}
    notes = [line for line in proc.stderr.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "pip install 'armscope[plots]'" in notes[0], proc.stderr
    assert charts.MISSING_NOTE in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["plots_skipped"] == charts.MISSING_NOTE
