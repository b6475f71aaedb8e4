"""Slide mode: between ``slide start ID`` and ``slide end`` the daemon averages
the probabilities of every classified frame (the paper's slide-level result is
the mean over the fields viewed) and writes one JSON record per slide. For a
cascade bundle the record also has the second step of the slide's decision
(``armscope.edge.cascade.SubtypeMeans``)."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.edge.cascade import SubtypeMeans
from armscope.edge.storage import os_reason, write_atomic

SLIDE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_slide_id(slide_id: str) -> str:
    """The ID as given, or ArmscopeError: it names the record file, so no path
    separators and no leading dot. Apart from ``start`` so that ``slide start``
    can refuse a bad ID before it ends the slide that is running."""
    if not SLIDE_ID.match(slide_id) or slide_id.startswith("."):
        raise ArmscopeError(f"slide id {slide_id!r}: expected 1-64 characters from A-Z a-z 0-9 . _ -")
    return slide_id


class SlideRecorder:
    def __init__(self, directory: str | Path, classes: list[str], steps: dict | None = None):
        self.directory = Path(directory)
        self.classes = classes
        self.steps = steps or {}
        self._subtypes = SubtypeMeans(self.steps)
        self.lock = threading.Lock()
        self.slide_id: str | None = None
        self._sum = None
        self._n = 0
        self._started = 0.0

    def start(self, slide_id: str) -> None:
        check_slide_id(slide_id)
        with self.lock:
            self.slide_id, self._sum, self._n, self._started = slide_id, np.zeros(len(self.classes)), 0, time.time()
            self._subtypes = SubtypeMeans(self.steps)

    def add(self, probs, slide_id: str | None, subtype: dict | None = None) -> None:
        """Count one frame's probabilities (and its second step's, ``subtype``
        as ``Step.result`` gives it), if it belongs to the running slide."""
        with self.lock:
            if self.slide_id is not None and slide_id == self.slide_id:
                self._sum += np.asarray(probs, dtype=np.float64)
                self._n += 1
                if subtype is not None:
                    self._subtypes.add(subtype["when"], subtype["probs"])

    def end(self, extra: dict, decide) -> tuple[dict, Path]:
        """Close the slide; ``decide(mean_probs)`` gives the decision. Writes the record
        atomically (``armscope.edge.storage.write_atomic``). The slide is closed only once its
        record is on disk: if the write fails, the slide stays open with every frame
        counted so far, no temporary file is left, and the ArmscopeError says why
        (e.g. "No space left on device") so the operator can free space and end it again."""
        with self.lock:   # the record from one consistent state; the frames keep coming meanwhile
            if self.slide_id is None:
                raise ArmscopeError("slide end: no slide is running (send 'slide start ID' first)")
            slide_id, n, started = self.slide_id, self._n, self._started
            mean = self._sum / n if n else None
            decision = None if mean is None else decide(mean)
            record = {"slide_id": slide_id, **extra, "classes": self.classes, "started_wall": started,
                      "ended_wall": time.time(), "n_frames": n,
                      "probs": None if mean is None else {c: round(float(p), 6) for c, p in zip(self.classes, mean)},
                      "decision": decision}
            if self.steps:
                # the second step of the slide's decision, over the fields step one sent there
                record["subtype"] = self._subtypes.result(decision["label"] if decision else None)
                record["fields_per_step"] = self._subtypes.counts()
        target = self.directory / f"{slide_id}.json"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            k = 1
            while target.exists():
                target = self.directory / f"{slide_id}.{k}.json"
                k += 1
            write_atomic(target, (json.dumps(record, indent=2) + "\n").encode())
        except OSError as exc:
            raise ArmscopeError(f"slide end: could not write the record of slide {slide_id} to {target}: "
                                f"{os_reason(exc)}; the slide is still running with its {n} frames "
                                "(free space or fix the directory, then send 'slide end' again)") from None
        with self.lock:
            if self.slide_id == slide_id and self._started == started:
                self.slide_id = None       # frames that arrived while writing are not in the record
        return record, target
