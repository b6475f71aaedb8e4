"""The control socket's commands (docs/protocol.md, section 2): what each one
does to a running daemon and what it answers.

Why apart from ``armscope.edge.control``: that module owns the REP socket and
the request/reply contract (one JSON object per request, whatever happens);
this one holds the commands' meaning, which needs the daemon's state
(``daemon`` is an ``armscope.edge.daemon.Daemon``). Bad requests raise
ArmscopeError; the control thread turns that into an ``ok: false`` reply.
"""
from __future__ import annotations

import logging
import time

from armscope.core import protocol
from armscope.core.decision import check_threshold, decide
from armscope.core.errors import ArmscopeError
from armscope.edge.cascade import model_id
from armscope.edge.slides import check_slide_id
from armscope.edge.snapshots import write_snapshot

log = logging.getLogger(__name__)

COMMANDS = ("status", "pause", "resume", "slide start ID", "slide end", "threshold X", "threshold reset",
            "snapshot", "help")


def handle_command(daemon, cmd: str, args: list[str]) -> dict:
    """One command's reply keys (besides ``ok`` and ``cmd``). Raise ArmscopeError for bad requests."""
    def need(n: int, usage: str):
        if len(args) != n:
            raise ArmscopeError(f"{cmd}: usage: {usage}")

    if cmd == "status":
        need(0, "status")
        return status_reply(daemon)
    if cmd == "help":
        return {"commands": list(COMMANDS)}
    if cmd in ("pause", "resume"):
        need(0, cmd)
        daemon.paused = cmd == "pause"
        if daemon.paused:
            daemon._set_state(protocol.STATE_PAUSED)
        else:
            daemon._set_state(protocol.STATE_STARTING if daemon.signal_ok else protocol.STATE_NO_SIGNAL)
        return {"state": daemon.state}
    if cmd == "slide":
        if args[:1] == ["start"] and len(args) == 2:
            check_slide_id(args[1])      # a bad ID is refused before the running slide is touched
            ended = None
            if daemon.slides.slide_id is not None:
                ended = end_slide(daemon)
            daemon.slides.start(args[1])
            log.info("slide %s started", args[1])
            return {"slide_id": args[1], "ended": ended}
        if args == ["end"]:
            return end_slide(daemon)
        raise ArmscopeError("slide: usage: slide start ID | slide end")
    if cmd == "threshold":
        need(1, "threshold X (0..1) | threshold reset")
        if args[0] == "reset":
            daemon.threshold = None
        else:
            try:
                value = float(args[0])
            except ValueError:
                raise ArmscopeError(f"threshold: {args[0]!r} is not a number") from None
            check_threshold(value, daemon.bundle.task, "threshold")
            daemon.threshold = value
        return {"threshold": daemon.effective_threshold()}
    if cmd == "snapshot":
        need(0, "snapshot")
        return {"files": [str(p) for p in snapshot(daemon)]}
    raise ArmscopeError(f"unknown command {cmd!r} (commands: {', '.join(COMMANDS)})")


def end_slide(daemon) -> dict:
    record, path = daemon.slides.end({"model_id": daemon.model_id, "threshold": daemon.effective_threshold()},
                                     lambda mean: decide(mean, daemon.bundle.task, daemon.threshold))
    log.info("slide %s ended: %d frames -> %s", record["slide_id"], record["n_frames"], path)
    return {"slide": record, "record": str(path)}


def status_reply(daemon) -> dict:
    return {"state": daemon.state, "reason": daemon.reason, "run_id": daemon.publisher.run_id,
            "model_id": daemon.model_id, "classes": daemon.classes,
            "steps": {when: model_id(step.bundle) for when, step in daemon.steps.items()},
            "backend": daemon.backend_info, "source": daemon.config.source,
            "slide_id": daemon.slides.slide_id, "threshold": daemon.effective_threshold(), "paused": daemon.paused,
            "uptime_s": round(time.monotonic() - daemon.started_mono, 3), "measures": daemon.measures,
            "endpoints": dict(daemon.endpoints), "metrics": daemon.metrics_snapshot()}


def snapshot(daemon) -> list:
    """Save the last classified frame, its overlay and its header as published (or,
    before any overlay, the newest captured frame and the status header published
    last, which says why there is none)."""
    with daemon.last_lock:
        last = daemon.last
    if last is not None:
        frame, rgba, header = last
        rgba = rgba() if callable(rgba) else rgba   # the bitmap is drawn only when asked for (protocol v2)
    else:
        frame = getattr(daemon, "capture", None) and daemon.capture.latest
        if frame is None:
            raise ArmscopeError("snapshot: no frame captured yet")
        rgba, header = None, daemon.last_status   # why there is no overlay (starting, no_tissue, ...)
    return write_snapshot(daemon.config.snapshot_dir, frame, rgba, header)
