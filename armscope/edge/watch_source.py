"""``watch://DIR``: a camera pointed at a ``png://`` display.

Why: glass-to-glass latency needs a camera that sees the display
(docs/latency.md). Where the display is the bridge's ``png://DIR`` (this
machine, CI), this source is that camera: each read returns the image the
display shows *now*, i.e. the newest PNG in ``DIR``, at the camera's frame rate
(``fps``, default 30), as a real camera returns whatever is on the screen at
its exposure. ``armscope.bench.glass`` reads it and decodes the frame stamp.

Newest = the highest-numbered name (``png://`` numbers its files
``NNNNNN_frame.png``/``NNNNNN_blank.png``; names compare by length, then
text, so 1000000 follows 999999). ``png://`` writes a file in place, so the
newest may be half-written: strict decoding (``armscope.core.imagefile``) rejects
it and the previous whole file is what the screen still shows. Before the
display wrote anything the screen is dark: a black frame of the size given
(``width``/``height``, default 1280x720).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.core.imagefile import decode_image
from armscope.edge.source_base import FrameSource, SourceLost, SourceSpec


def _name_order(path: Path) -> tuple[int, str]:
    return len(path.name), path.name


class WatchSource(FrameSource):
    def __init__(self, spec: SourceSpec):
        super().__init__(spec)
        self.root = Path(spec.target)
        fps = spec.fps(30.0)
        self.pace = None if fps is None else 1.0 / fps
        self.dark = np.zeros((int(spec.params.get("height", 720)), int(spec.params.get("width", 1280)), 3), np.uint8)
        self.shown: tuple[str, int] | None = None      # (name, mtime_ns) of the file last decoded
        self.image: np.ndarray | None = None
        self.path: Path | None = None                   # the file the last read showed (None: dark)

    def open(self) -> None:
        if not self.root.is_dir():
            raise SourceLost(f"{self.root}: no such directory (watch:// watches a png:// display's directory)")

    def read(self) -> np.ndarray:
        try:
            names = sorted((p for p in self.root.iterdir() if p.suffix.lower() == ".png"), key=_name_order)
        except OSError as exc:
            raise SourceLost(f"{self.root}: cannot list ({exc.strerror or exc})") from None
        for path in reversed(names[-3:]):   # the newest whole file; an older one only while the newest is half-written
            try:
                key = (path.name, path.stat().st_mtime_ns)
                if key == self.shown and self.image is not None:
                    return self.image.copy()
                image = decode_image(path.read_bytes(), str(path))
            except (OSError, ArmscopeError):
                continue
            self.shown, self.image, self.path = key, image, path
            return image.copy()
        self.path = None
        return self.dark.copy()
