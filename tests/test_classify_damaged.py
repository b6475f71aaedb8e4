"""``armscope classify`` as a user runs it (a subprocess, the demo bundle, the
real camera frames) with files among them that are no image at all: an empty
file and a text file named .jpg get "no decision: corrupt_image" and the
others are still classified (as the daemon counts such frames corrupt); a
missing file or a directory is the user's mistake and stops the run naming it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from repo_paths import DEMO_BUNDLE, FRAMES, REPO

pytestmark = pytest.mark.skipif(not (DEMO_BUNDLE / "manifest.json").is_file(), reason="no samples/demo_bundle")


def classify(*args):
    return subprocess.run([sys.executable, "-m", "armscope.cli", "classify", "--bundle", str(DEMO_BUNDLE), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_files_that_are_no_image_get_no_decision_and_the_rest_are_classified(tmp_path):
    empty, text = tmp_path / "empty.jpg", tmp_path / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("field notes, not a picture\n")
    out, sheet = tmp_path / "report.json", tmp_path / "sheet.png"
    run = classify(*map(str, FRAMES), str(empty), str(text), "--json", str(out), "--contact-sheet", str(sheet))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    report = json.loads(out.read_text())
    by_name = {r["image"].rsplit("/", 1)[-1]: r for r in report["images"]}
    for frame in FRAMES:
        assert by_name[frame.name]["decision"] is not None
    for bad, why in ((empty, "empty file"), (text, "not a readable image")):
        entry = by_name[bad.name]
        assert entry["decision"] is None and entry["probs"] is None
        assert entry["no_decision"]["reason"] == "corrupt_image" and why in entry["no_decision"]["detail"]
        assert "no decision: corrupt_image" in next(line for line in run.stdout.splitlines()
                                                    if line.startswith(bad.name))
    slide = report["slide"]
    assert slide["n_images"] == len(FRAMES) + 2 and slide["n_classified"] == len(FRAMES)
    assert sorted(slide["excluded"]) == sorted([str(empty), str(text)])
    assert slide["decision"] is not None
    assert sheet.stat().st_size > 0


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_missing_file_or_a_directory_stops_the_run_naming_it(tmp_path, kind):
    target = tmp_path / "missing.jpg" if kind == "missing" else tmp_path / "frames.jpg"
    if kind == "directory":
        target.mkdir()
    out = tmp_path / "report.json"
    run = classify(str(FRAMES[0]), str(target), "--json", str(out))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0], run.stderr
    assert ("no such image file" if kind == "missing" else "a directory") in lines[0]
    assert not out.exists()
