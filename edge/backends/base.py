"""The one interface every inference backend implements (ONNX Runtime now,
TensorRT on NVIDIA devices, a remote Triton server later), so the daemon,
``classify`` and the benchmarks never care which one runs."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from armscope.errors import ArmscopeError

# every output a bundle graph may have, in the order backends return them
# (armscope.bundle.OUTPUT_ORDER); a bundle's own are ``Bundle.output_names``
OUTPUTS = ("probs", "patch_probs", "cam")


class InferenceBackend(ABC):
    """Runs a bundle's ensemble on a batch of preprocessed frames.

    ``infer`` takes (N, S, S, 3) float32 RGB 0..255 (S: the bundle's input
    size, ``Bundle.input_size``) and returns the ensemble-averaged ``probs``
    (N, C) and ``cam`` (N, C, H, W) (H x W: the pooled feature map's size,
    e.g. 20 x 20 for the tiled model, 8 x 8 for InceptionV3 at 299), plus
    ``patch_probs`` (N, P, C) when the bundle has per-patch heads, as numpy
    arrays. Callers use ``probs`` and ``cam`` only unless they check.
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


def check_graph_io(where, inputs: list[str], outputs, wanted: tuple[str, ...]) -> None:
    """Refuse a graph whose I/O is not the bundle's: input ``image`` only, and
    every output the manifest declares (``wanted``)."""
    missing = [n for n in wanted if n not in outputs]
    if inputs != ["image"] or missing:
        raise ArmscopeError(
            f"{where}: a graph has inputs {list(inputs)} and outputs {sorted(outputs)}; "
            f"expected input ['image'] and outputs {list(wanted)} (as the manifest's outputs declare)"
        )
