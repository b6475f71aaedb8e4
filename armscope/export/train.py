"""Training members of the tiled classifier with the paper's loss, on the CPU.

Loss = cross-entropy of the final head + the sum over the 16 patches of each
patch head's cross-entropy against the image label (Keras averages a per-patch
loss over patches, so a loss weight of 16 turns the mean into the sum).
Images go through ``armscope.core.preprocess.preprocess_frame``, the same function
the daemon uses. ``--folds K`` trains a K-fold ensemble (one member per fold,
validated on its held-out fold), as in the study.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError, require_module
from armscope.core.preprocess import IMAGE_SUFFIXES, Preprocessing, load_image, preprocess_frame
from armscope.export import architecture as arch

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    images: np.ndarray  # (N, 640, 640, 3) float32
    labels: np.ndarray  # (N,) int
    classes: list[str]
    files: list[str]


def load_dataset(root: Path, spec: Preprocessing = Preprocessing()) -> Dataset:
    """A folder of class subfolders of images -> preprocessed arrays."""
    root = Path(root)
    if not root.is_dir():
        raise ArmscopeError(f"{root}: not a directory (expected a folder of class subfolders of images)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ArmscopeError(f"{root}: found {len(classes)} class subfolder(s), expected at least 2")
    images, labels, files = [], [], []
    for index, name in enumerate(classes):
        paths = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ArmscopeError(f"{root / name}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in paths:
            images.append(preprocess_frame(load_image(path), spec, source=str(path)))
            labels.append(index)
            files.append(str(path.relative_to(root)))
    return Dataset(np.stack(images), np.array(labels), classes, files)


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per sample, each class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=int)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        folds[idx] = np.arange(len(idx)) % k
    return folds


def _augmented_batches(keras, x, y, batch_size, seed):
    """Flips and 90-degree rotations: stain and orientation are the same tissue."""

    class Augment(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)

        def __len__(self):
            return int(np.ceil(len(x) / batch_size))

        def __getitem__(self, i):
            sel = slice(i * batch_size, (i + 1) * batch_size)
            xb = x[sel].copy()
            for j in range(len(xb)):
                xb[j] = np.rot90(xb[j], self.rng.integers(4))
                if self.rng.random() < 0.5:
                    xb[j] = xb[j][:, ::-1]
            yb = y[sel]
            return xb, {"probs": yb, "patch_probs": np.repeat(yb[:, None], arch.N_PATCHES, axis=1)}

        def on_epoch_end(self):
            pass

    return Augment()


def compile_model(model, learning_rate: float = 1e-3):
    keras = require_module("keras", "tf", "Training")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={"probs": keras.losses.CategoricalCrossentropy(),
              "patch_probs": keras.losses.CategoricalCrossentropy()},
        loss_weights={"probs": 1.0, "patch_probs": float(arch.N_PATCHES)},
        metrics={"probs": ["accuracy"]},
        jit_compile=False,  # XLA compilation costs more per member on a CPU than it gains for these models
    )
    return model


def train(
    data_dir: Path,
    out_dir: Path,
    backbone: str = "densenet-mini",
    folds: int = 1,
    epochs: int = 10,
    batch_size: int = 4,
    learning_rate: float = 1e-3,
    seed: int = 0,
    verbose: int = 1,
) -> list[Path]:
    """Train one member (folds=1, all data) or a K-fold ensemble; returns the member files."""
    require_module("tensorflow", "tf", "Training")
    keras = require_module("keras", "tf", "Training")
    if folds < 1:
        raise ArmscopeError(f"--folds {folds}: expected 1 or more")
    data = load_dataset(data_dir)
    n_classes = len(data.classes)
    if folds > 1 and np.bincount(data.labels).min() < folds:
        raise ArmscopeError(
            f"{data_dir}: the smallest class has {np.bincount(data.labels).min()} images, fewer than --folds {folds}"
        )
    fold_of = stratified_folds(data.labels, folds, seed) if folds > 1 else np.full(len(data.labels), -1)
    y = np.eye(n_classes, dtype=np.float32)[data.labels]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fold in range(folds):
        keras.utils.set_random_seed(seed + fold)
        train_idx = np.flatnonzero(fold_of != fold)
        val_idx = np.flatnonzero(fold_of == fold)
        order = np.random.default_rng(seed + fold).permutation(train_idx)
        model = compile_model(arch.build_tiled_model(arch.ArchitectureSpec(backbone, n_classes)), learning_rate)
        if verbose:
            print(f"member {fold + 1}/{folds}: {len(train_idx)} training images, {len(val_idx)} held out")
        model.fit(_augmented_batches(keras, data.images[order], y[order], batch_size, seed + fold),
                  epochs=epochs, verbose=verbose)
        val_acc = None
        if len(val_idx):
            pred = model.predict(data.images[val_idx], batch_size=batch_size, verbose=0)["probs"]
            val_acc = float(np.mean(pred.argmax(1) == data.labels[val_idx]))
        target = out_dir / f"member_{max(fold, 0)}.keras"
        model.save(target)
        target.with_suffix(".json").write_text(json.dumps({
            "classes": data.classes, "fold": max(fold, 0), "folds": folds, "backbone": backbone,
            "epochs": epochs, "seed": seed, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
            "val_accuracy": val_acc, "val_files": [data.files[i] for i in val_idx],
        }, indent=2) + "\n")
        written.append(target)
    return written
