"""What every frame source is and says, apart from how any one reads frames:
the ``FrameSource`` interface, the parsed URI (``SourceSpec``) and the two ways
a read fails. Its own module so that sources living elsewhere
(``armscope.edge.watch_source``) and the URI dispatcher in ``armscope.edge.sources`` import it
without importing each other."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


class SourceLost(Exception):
    """The source cannot deliver frames any more (unplugged, stream ended, gone)."""


class CorruptFrame(Exception):
    """One frame could not be decoded; the next one may be fine."""


@dataclass(frozen=True)
class SourceSpec:
    scheme: str
    target: str            # device path, sensor id, URL or filesystem path
    params: dict = field(default_factory=dict)
    uri: str = ""

    @property
    def finite(self) -> bool:
        return self.scheme in ("file", "dir") and not self.params.get("loop")

    def fps(self, default: float | None) -> float | None:
        """Replay rate: None = as fast as possible (``fps=max``)."""
        value = self.params.get("fps")
        if value is None:
            return default
        return None if value == "max" else float(value)


class FrameSource:
    """open() / read() -> BGR uint8 frame / close(). read raises SourceLost or CorruptFrame."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.pace = None          # seconds between frames for replayed sources, None = unpaced
        self.stop: threading.Event | None = None   # set by Capture: waits inside read end early

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


def check_frame(frame, what: str) -> np.ndarray:
    if frame is None or not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 \
            or frame.dtype != np.uint8 or frame.size == 0:
        raise CorruptFrame(f"{what}: not a BGR uint8 image")
    return frame
