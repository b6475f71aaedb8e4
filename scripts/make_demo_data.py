"""Make the demo's camera frames and training set from the real H&E samples.

- Camera frames: 1600x1200 crops of the CMU-1 field (CC0) at four positions,
  written to samples/frames/ (committed; what the README's first command classifies).
- Training set: 1024x1024 mosaics of each NCT-CRC-HE-100K tile (CC BY 4.0), its
  224x224 tile repeated with random 90-degree rotations, flips and slight stain
  jitter, in class folders 'tumour' (TUM) and 'other' (the 8 other tissue classes).
  Not committed; scripts/build_demo_bundle.sh rebuilds it.
- Tissue training set (``--train-tissue DIR``): the same mosaics of the 8
  non-tumour tiles, one class folder per tissue type (ADI, BACK, ...), for the
  demo cascade's step two (``other`` -> which tissue), the shape of the paper's
  second step (IIM -> 4 subtypes, other -> 7 hereditary myopathies).
- Hold-out set (``--holdout DIR``): the same kind of mosaics with another seed,
  in class folders, for ``armscope quantize --holdout`` / ``armscope accuracy``
  (labels come from the folder names, so AUC is reported). Its tiles come from
  NCT-CRC-HE-100K's 86 slides, none of them CMU-1, so it is disjoint from a
  calibration set cut from the CMU-1 field.

The demo model is a pipeline demonstration, not a diagnostic model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
HE = REPO / "samples" / "he"
FRAME_POSITIONS = [(0, 0), (620, 300), (0, 1500), (620, 1767)]  # (x, y) of 1600x1200 crops


def make_frames(out: Path) -> list[Path]:
    field = cv2.imread(str(HE / "cmu-small-region" / "cmu_small_region_level0.jpg"))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (x, y) in enumerate(FRAME_POSITIONS):
        frame = field[y : y + 1200, x : x + 1600]
        assert frame.shape == (1200, 1600, 3), frame.shape
        path = out / f"cmu1_frame_{i}.jpg"
        cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
        written.append(path)
    return written


def mosaic(tile: np.ndarray, rng: np.random.Generator, size: int = 1024) -> np.ndarray:
    n = int(np.ceil(size / tile.shape[0]))
    rows = []
    for _ in range(n):
        row = []
        for _ in range(n):
            t = np.rot90(tile, rng.integers(4))
            if rng.random() < 0.5:
                t = t[:, ::-1]
            row.append(t)
        rows.append(np.concatenate(row, axis=1))
    image = np.concatenate(rows, axis=0)[:size, :size].astype(np.float32)
    image *= rng.uniform(0.92, 1.08, size=3)  # stain jitter per channel
    return np.clip(image, 0, 255).astype(np.uint8)


def make_tissue_set(out: Path, per_class: int, seed: int = 2) -> None:
    rng = np.random.default_rng(seed)
    for tile_path in sorted((HE / "nct-crc-he-100k").glob("*/*.tif")):
        label = tile_path.parent.name
        if label == "TUM":
            continue
        (out / label).mkdir(parents=True, exist_ok=True)
        tile = cv2.imread(str(tile_path))
        for j in range(per_class):
            cv2.imwrite(str(out / label / f"{label}_{j}.png"), mosaic(tile, rng))


def make_training_set(out: Path, per_other: int, per_tumour: int, seed: int = 0, ext: str = "png") -> None:
    rng = np.random.default_rng(seed)
    for tile_path in sorted((HE / "nct-crc-he-100k").glob("*/*.tif")):
        label = "tumour" if tile_path.parent.name == "TUM" else "other"
        count = per_tumour if label == "tumour" else per_other
        (out / label).mkdir(parents=True, exist_ok=True)
        tile = cv2.imread(str(tile_path))
        for j in range(count):
            cv2.imwrite(str(out / label / f"{tile_path.parent.name}_{j}.{ext}"), mosaic(tile, rng))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=Path, default=REPO / "samples" / "frames")
    parser.add_argument("--train", type=Path, help="write the training set here")
    parser.add_argument("--holdout", type=Path, help="write the labelled hold-out mosaics here")
    parser.add_argument("--train-tissue", type=Path, help="write the tissue-type training set (cascade step two) here")
    parser.add_argument("--per-tissue", type=int, default=6)
    parser.add_argument("--per-other", type=int, default=3)
    parser.add_argument("--per-tumour", type=int, default=16)
    args = parser.parse_args()
    for p in make_frames(args.frames):
        print(p)
    if args.train:
        make_training_set(args.train, args.per_other, args.per_tumour)
        print(f"training set in {args.train}")
    if args.train_tissue:
        make_tissue_set(args.train_tissue, args.per_tissue)
        print(f"tissue training set in {args.train_tissue}")
    if args.holdout:
        make_training_set(args.holdout, 2, 8, seed=1, ext="jpg")
        print(f"hold-out set in {args.holdout}")
