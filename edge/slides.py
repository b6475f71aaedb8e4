"""Slide mode: between ``slide start ID`` and ``slide end`` the daemon averages
the probabilities of every classified frame (the paper's slide-level result is
the mean over the fields viewed) and writes one JSON record per slide. For a
cascade bundle the record also has the second step of the slide's decision
(``edge.cascade.SubtypeMeans``)."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import numpy as np

from armscope.errors import ArmscopeError
from edge.cascade import SubtypeMeans

SLIDE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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
        if not SLIDE_ID.match(slide_id) or slide_id.startswith("."):
            raise ArmscopeError(f"slide id {slide_id!r}: expected 1-64 characters from A-Z a-z 0-9 . _ -")
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
        """Close the slide; ``decide(mean_probs)`` gives the decision. Writes the record atomically."""
        with self.lock:
            if self.slide_id is None:
                raise ArmscopeError("slide end: no slide is running (send 'slide start ID' first)")
            slide_id, total, n, started, subtypes = self.slide_id, self._sum, self._n, self._started, self._subtypes
            self.slide_id = None
        mean = total / n if n else None
        decision = None if mean is None else decide(mean)
        record = {"slide_id": slide_id, **extra, "classes": self.classes, "started_wall": started,
                  "ended_wall": time.time(), "n_frames": n,
                  "probs": None if mean is None else {c: round(float(p), 6) for c, p in zip(self.classes, mean)},
                  "decision": decision}
        if self.steps:
            # the second step of the slide's decision, over the fields step one sent there
            record["subtype"] = subtypes.result(decision["label"] if decision else None)
            record["fields_per_step"] = subtypes.counts()
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.directory / f"{slide_id}.json"
        k = 1
        while target.exists():
            target = self.directory / f"{slide_id}.{k}.json"
            k += 1
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(target)
        return record, target
