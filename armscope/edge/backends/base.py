"""The one interface every inference backend implements (ONNX Runtime,
OpenVINO, TensorRT on NVIDIA devices), so the daemon, ``classify`` and the
benchmarks never care which one runs.

Lifecycle, in the style of Polygraphy's runners: constructing a backend only
checks its options (cheap, any thread); ``activate()`` acquires everything
(sessions, compiled graphs, CUDA context, engines, buffers) *on the thread
that will call* ``infer()``; ``deactivate()`` frees it all. ``with backend:``
does both. Why the split: a CUDA context is current per host thread, so the
TensorRT backend must set it up on the thread that infers (the daemon's
``inference`` thread, classify's main thread), not where the daemon was
configured. If ``activate()`` fails halfway, what it acquired so far is
freed before the error propagates (``_release`` must cope with any partial
state), so a failed start-up leaks no sessions, threads or device memory.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod

import numpy as np

from armscope.core import front
from armscope.core.errors import ArmscopeError

# every output a bundle graph may have, in the order backends return them
# (armscope.core.bundle.OUTPUT_ORDER); a bundle's own are ``Bundle.output_names``
OUTPUTS = ("probs", "patch_probs", "cam", "saliency")  # armscope.core.bundle.OUTPUT_ORDER


class InferenceBackend(ABC):
    """Runs a bundle's ensemble on a batch of preprocessed frames.

    ``infer`` takes (N, S, S, 3) float32 RGB 0..255 (S: the bundle's input
    size, ``Bundle.input_size``), or with ``feed`` uint8 (the bundle's uint8
    front, ``armscope.core.front``) the camera crops, (N, C, C, 3) uint8 BGR, and returns the ensemble-averaged ``probs``
    (N, C) and ``cam`` (N, C, H, W) (H x W: the pooled feature map's size,
    e.g. 20 x 20 for the tiled model, 8 x 8 for InceptionV3 at 299), plus
    ``patch_probs`` (N, P, C) when the bundle has per-patch heads, as numpy
    arrays. Callers use ``probs`` and ``cam`` only unless they check.

    Subclasses implement ``_activate`` (acquire; may fail at any step),
    ``_release`` (free whatever was acquired; idempotent), ``_infer`` and
    ``_details`` (what runs, for ``describe``).
    """

    name: str = "abstract"
    #: what infer() takes: float32 frames, or with "uint8" the camera crops (the bundle's uint8 front)
    feed: str = "float32"
    #: infer() only on the thread that activated (a CUDA context is current per thread)
    thread_bound: bool = False

    def __init__(self) -> None:
        self._owner: threading.Thread | None = None
        # how open_backend chose this backend ({"requested": "auto", "why": ...}); shown by describe()
        self.selection: dict = {}

    # ------------------------------------------------------------ lifecycle

    @property
    def active(self) -> bool:
        return self._owner is not None

    def activate(self) -> "InferenceBackend":
        """Acquire everything on the calling thread; on failure free what was acquired, then raise."""
        if self._owner is not None:
            raise ArmscopeError(f"{self.name} backend: already active (activated on thread {self._owner.name!r})")
        try:
            self._activate()
        except BaseException:
            self._release()
            raise
        self._owner = threading.current_thread()
        return self

    def deactivate(self) -> None:
        """Free everything ``activate`` acquired (idempotent)."""
        if self._owner is None:
            return
        try:
            self._release()
        finally:
            self._owner = None

    def close(self) -> None:
        """The same as ``deactivate`` (the name older callers use)."""
        self.deactivate()

    def __enter__(self):
        if self._owner is None:
            self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    # ------------------------------------------------------------ inference

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        owner = self._owner
        if owner is None:
            raise ArmscopeError(f"{self.name} backend: infer() before activate(); use 'with backend:' or call "
                                "activate() on the thread that infers")
        if self.thread_bound and owner is not threading.current_thread():
            raise ArmscopeError(f"{self.name} backend: activated on thread {owner.name!r}, infer() called on "
                                f"{threading.current_thread().name!r}; activate it on the thread that infers")
        dtype = np.asarray(images).dtype
        if self.feed == "uint8" and dtype != np.uint8:
            # a float frame cast to uint8 would be read as camera bytes: refuse, never convert
            raise ArmscopeError(f"{self.name} backend, feed uint8: expected the camera crops as uint8 BGR, got {dtype}")
        return self._infer(images)

    def describe(self) -> dict:
        """What is running, for logs and the daemon's status reply: the runtime and
        its settings, how it was chosen (``requested``, ``why``), and the thread it is
        active on (None before ``activate``)."""
        return {"backend": self.name, **self._details(), **self.selection,
                "thread": self._owner.name if self._owner is not None else None}

    # ------------------------------------------------------------ for subclasses

    @abstractmethod
    def _activate(self) -> None:
        ...

    @abstractmethod
    def _release(self) -> None:
        ...

    @abstractmethod
    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        ...

    def _details(self) -> dict:
        return {}


def check_graph_io(where, inputs: list[str], outputs, wanted: tuple[str, ...], input_name: str = "image") -> None:
    """Refuse a graph whose I/O is not the bundle's: input ``image`` only (or
    the uint8 front's, ``input_name``), and every output the manifest declares (``wanted``)."""
    missing = [n for n in wanted if n not in outputs]
    if inputs != [input_name] or missing:
        raise ArmscopeError(
            f"{where}: a graph has inputs {list(inputs)} and outputs {sorted(outputs)}; "
            f"expected input [{input_name!r}] and outputs {list(wanted)} (as the manifest's outputs declare)"
        )


class GraphFiles:
    """The graph files a CPU backend loads: the bundle's merged graph or its
    members, or, with feed uint8, the same graphs behind the bundle's uint8 front,
    composed into a temporary directory that lives while the backend is active.
    One place for what ONNX Runtime and OpenVINO both need: ``paths`` is always
    what to load now, and ``close`` gives back the bundle's own."""

    def __init__(self, bundle, layout: str, feed: str):
        front.require(bundle, feed)
        self.bundle = bundle
        self.feed = feed
        self.input_name = front.INPUT if feed == "uint8" else "image"
        self.bundle_paths = [bundle.ensemble_path] if layout == "merged" else list(bundle.member_paths)
        self.paths = list(self.bundle_paths)
        self.composed_dir = None

    def open(self) -> None:
        if self.feed == "uint8":
            self.composed_dir, self.paths = front.composed(self.bundle, self.bundle_paths)

    def close(self) -> None:
        if self.composed_dir is not None:
            self.composed_dir.cleanup()
            self.composed_dir = None
        self.paths = list(self.bundle_paths)
