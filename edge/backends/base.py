"""The one interface every inference backend implements (ONNX Runtime now,
TensorRT on NVIDIA devices, a remote Triton server later), so the daemon,
``classify`` and the benchmarks never care which one runs."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

OUTPUTS = ("probs", "patch_probs", "cam")


class InferenceBackend(ABC):
    """Runs a bundle's ensemble on a batch of preprocessed frames.

    ``infer`` takes (N, 640, 640, 3) float32 RGB 0..255 and returns the
    ensemble-averaged ``probs`` (N, C), ``patch_probs`` (N, 16, C) and
    ``cam`` (N, C, 20, 20) as numpy arrays.
    """

    name: str = "abstract"

    @abstractmethod
    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        ...

    def describe(self) -> dict:
        """What is running, for logs and the daemon's status reply."""
        return {"backend": self.name}

    def close(self) -> None:
        """Release sessions, engines and device memory."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
