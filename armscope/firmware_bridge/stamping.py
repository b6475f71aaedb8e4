"""The frame stamp in the eyepiece image (``armscope bridge --stamp``): the
overlay's ``frame_id`` in the display's bottom-left corner, for glass-to-glass
latency measurement (``armscope.core.stamp``; docs/latency.md). A measurement mode
only: the stamp is a patch of light the pathologist would see."""
from __future__ import annotations

import numpy as np

from armscope.core import stamp

from .displays import Region
from .label import widen


def add_stamp(image: np.ndarray, region: Region, frame_id: int, display_size: tuple[int, int],
              align=None) -> tuple[np.ndarray, Region]:
    """``image`` (the rendered overlay at ``region``, RGB or grey) with the
    stamp of ``frame_id`` drawn in its corner of the display: the new
    ``(image, region)`` covering both, black elsewhere (as ``label.add_label``)."""
    bx, by, bw, bh = stamp.box(display_size)
    canvas, send = widen(image, region, (bx, by, bw, bh), align)
    stamp.draw(canvas, frame_id, (bx - send[0], by - send[1]), stamp.cell_size(display_size))
    return canvas, send
