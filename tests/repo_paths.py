"""Where the repository and its real sample data are: one place for every test
module and helper (``from repo_paths import DEMO_BUNDLE``), and for the
fixtures in conftest.py that hand the same paths to tests.

Why module constants as well as fixtures: parametrize lists, module-level
skips and the helper modules (daemon_support, bridge_runtime_support) need
the paths at import time, where fixtures do not reach.

The H&E images are the repository's own copies (samples/he, with their
SOURCE.txt), so the tests need nothing outside the checkout."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
DEMO_BUNDLE = SAMPLES / "demo_bundle"                # 5 mini DenseNets, binary (samples/README.md)
TISSUE_BUNDLE = SAMPLES / "demo_tissue_bundle"       # the cascade's second step for 'other'
FRAMES_DIR = SAMPLES / "frames"
FRAMES = sorted(FRAMES_DIR.glob("*.jpg"))            # 4 real 1600x1200 H&E camera frames (CMU-1)
HE = SAMPLES / "he"
HE_FIELD = HE / "cmu-small-region" / "cmu_small_region_level0.jpg"   # a large real H&E field (CMU-1 level 0)
NCT_TILES_DIR = HE / "nct-crc-he-100k"               # one 224x224 tile per NCT-CRC-HE-100K class
NCT_TILES = sorted(NCT_TILES_DIR.glob("*/*.tif"))
