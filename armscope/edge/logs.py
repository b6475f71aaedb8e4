"""Logging setup for the daemon: human text, or JSON lines (one object per
line: ``ts``, ``level``, ``logger``, ``msg``, plus ``exc`` on errors) for
journald/Loki/whatever collects the edge device's logs."""
from __future__ import annotations

import json
import logging
import os
import sys
import time


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 6),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "thread": record.threadName,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not to the
    stream it was when the handler was made: whoever swaps ``sys.stderr`` (an
    embedding application, a test's capture) never leaves a handler writing to a
    closed stream, which logging reports as a traceback of its own."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__/setStream assign it; the current one is always used
        pass


def setup_logging(fmt: str = "text", level: str = "info", stream=None) -> None:
    """Replace the root handlers (the CLI may have configured them already)."""
    handler = logging.StreamHandler(stream) if stream is not None else CurrentStderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    if level == "debug":  # the CLI quietened OpenCV (armscope.cli.main); debug wants its warnings back
        opencv_logs(loud=True)


_USER_OPENCV_LEVEL = os.environ.get("OPENCV_LOG_LEVEL")  # the user's own setting, read before we set ours


def opencv_logs(loud: bool) -> None:
    """OpenCV writes its own warnings straight to stderr ('[ WARN:0@1.0] global cap.cpp:212 open VIDEOIO(V4L2):
    ...' on every reconnect to a missing camera, 'loadsave.cpp ... imwrite_' on a refused write); armscope reports
    those failures itself, once and in words. So OpenCV says only errors unless -v or debug logging asks for its
    warnings; a user's own OPENCV_LOG_LEVEL wins. The environment variable covers a cv2 not imported yet (and child
    processes), setLogLevel one already imported (opencv-python-headless 4.x and 5.x read the variable once)."""
    name = (_USER_OPENCV_LEVEL or ("WARNING" if loud else "ERROR")).upper()
    os.environ["OPENCV_LOG_LEVEL"] = name
    cv2 = sys.modules.get("cv2")
    utils = getattr(getattr(cv2, "utils", None), "logging", None)
    level = getattr(utils, f"LOG_LEVEL_{name}", None)
    if level is not None:
        utils.setLogLevel(level)
