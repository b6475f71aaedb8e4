"""The README's main job: `armscope demo` (daemon -> ZeroMQ -> bridge -> eyepiece PNGs)."""
from __future__ import annotations

import re

import cv2
import numpy as np

from armscope.cli import main

from repo_paths import REPO


def test_demo_runs_the_whole_chain(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    assert main(["demo", "--overlays", "2", "--out", str(out), "--timeout", "120"]) == 0
    printed = capsys.readouterr().out
    shown_count = re.search(r"eyepiece: (\d+) overlays shown", printed)
    assert printed.count("overlay frame") >= 2 and shown_count and int(shown_count.group(1)) >= 2
    shown = sorted((out / "eyepiece").glob("*_frame.png"))
    blanks = sorted((out / "eyepiece").glob("*_blank.png"))
    assert len(shown) >= 2
    # the display is blanked at start-up and on exit: first and last images are black
    first, last = sorted((out / "eyepiece").glob("*.png"))[0], sorted((out / "eyepiece").glob("*.png"))[-1]
    assert first in blanks and last in blanks
    assert cv2.imread(str(blanks[0])).max() == 0
    image = cv2.imread(str(shown[0]))
    assert image.shape == (1200, 1600, 3)            # display = camera frame size without registration
    lit = image.max(axis=2) > 0
    ys, xs = np.nonzero(lit[: 88 + 1024])
    # the overlay lies inside the 1024x1024 centre crop of the 1600x1200 frame
    assert xs.min() >= 288 and xs.max() < 288 + 1024 and ys.min() >= 88
    assert lit.mean() > 0.05
    # and the decision is written in white just below it (the demo's bridge labels overlays)
    below = image[88 + 1024 :]
    text = below[below.max(axis=2) > 0]
    assert len(text) > 200 and (text.max(axis=1) - text.min(axis=1) <= 1).all()
    assert np.nonzero(below.max(axis=2) > 0)[1].min() >= 288


def test_demo_from_another_directory_finds_the_samples_and_says_demo_only(tmp_path, capsys, monkeypatch):
    """From /tmp the defaults (samples/demo_bundle, dir://samples/frames/) named nothing; now the checkout's copies."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--overlays", "1", "--timeout", "120"]) == 0
    printed = capsys.readouterr().out
    assert "model demo-tumour-vs-other: DEMO ONLY, not a diagnostic model" in printed.splitlines()[0]
    assert sorted((tmp_path / "out" / "demo" / "eyepiece").glob("*_frame.png"))


def test_demo_with_a_bad_bundle_leaves_no_output_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--bundle", "no_such_bundle", "--out", "out/demo", "--timeout", "30"]) == 2
    assert "no_such_bundle: not a bundle directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
