"""Write firmware_bridge/data/sample_cam.npy: the demo ensemble's Grad-CAM on a real frame.

``armscope bridge bench`` renders the daemon's heat overlay from it, so the
bridge can be timed on a board that has neither the model nor the repository's
samples (the CAM ships inside the package, 1.6 KB). Run from the repository:

    python scripts/make_sample_cam.py
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from armscope.core.bundle import load_bundle
from armscope.core.preprocess import preprocess_frame
from armscope.edge.backends.onnxruntime_backend import OnnxRuntimeBackend

REPO = Path(__file__).resolve().parents[1]
FRAME = REPO / "samples" / "frames" / "cmu1_frame_1.jpg"
OUT = REPO / "armscope/firmware_bridge" / "data" / "sample_cam.npy"


def main() -> None:
    bundle = load_bundle(REPO / "samples" / "demo_bundle")
    frame = cv2.imread(str(FRAME), cv2.IMREAD_COLOR)
    with OnnxRuntimeBackend(bundle, "members") as backend:
        out = backend.infer(preprocess_frame(frame, bundle.preprocessing)[None])
    probs = out["probs"][0]
    cam = out["cam"][0, int(np.argmax(probs))]  # (batch, class, 20, 20), as the daemon indexes it
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.save(OUT, cam.astype(np.float32))
    print(f"{OUT}: {cam.shape} CAM of class {bundle.classes[int(np.argmax(probs))]!r}, p={probs.max():.3f}")


if __name__ == "__main__":
    main()
