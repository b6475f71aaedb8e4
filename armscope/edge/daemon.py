"""The real-time edge daemon: camera -> tissue/focus gate + preprocessing ->
ensemble inference -> Grad-CAM overlay -> ZeroMQ, as four threads joined by
newest-wins slots (``armscope.edge.pipeline``), so throughput is that of the slowest
stage (inference) and latency never grows with a backlog.

Threads: ``capture`` (armscope.edge.capture.Capture), ``preprocess``, ``inference``,
``render`` (overlay + publish), ``heartbeat`` (status at a fixed rate),
``control`` (REP socket). The inference backend releases the GIL, so the
other stages run while it computes. This module holds what the process goes
through (sockets, backends, threads, state, shutdown); what one frame goes
through is in ``armscope.edge.stages``, the control commands in
``armscope.edge.commands`` and snapshots in ``armscope.edge.snapshots``.

Shutdown (SIGTERM/SIGINT, ``max_frames``, a finite source ending with
``exit_on_source_end``): capture and preprocessing stop taking frames, the
frames already preprocessed or being inferred are finished and published
(unless older than the stale window), then a ``stopping`` status is
sent, sockets are closed and ``run`` returns 0.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import zmq

from armscope.core import protocol
from armscope.core.bundle import load_bundle, require_deployable
from armscope.core.decision import check_threshold
from armscope.core.errors import ArmscopeError
from armscope.core.tissue import TissueGate
from armscope.edge import commands, pacing
from armscope.edge.capture import Capture
from armscope.edge.cascade import load_steps, model_id
from armscope.edge.config import Config
from armscope.edge.control import ControlServer
from armscope.edge.metrics import Metrics, OverlayGapWatch, prometheus_text, serve_prometheus
from armscope.edge.pipeline import LatestSlot
from armscope.edge.publisher import Publisher, bind, make_curve_server, pub_socket, rep_socket, setup_curve_server
from armscope.edge.slides import SlideRecorder
from armscope.edge.sources import parse_source
from armscope.edge.stages import FrameStages
from armscope.edge.storage import check_output_dir

log = logging.getLogger(__name__)


class Daemon(FrameStages):
    def __init__(self, config: Config, context: zmq.Context | None = None):
        self.config = config
        try:
            self.bundle = require_deployable(load_bundle(config.bundle))
        except ArmscopeError as exc:
            raise ArmscopeError(f"key 'bundle': {exc}") from None
        self.spec = self.bundle.preprocessing
        self.source = parse_source(config.source)
        try:
            self.steps = load_steps(self.bundle)
        except ArmscopeError as exc:
            raise ArmscopeError(f"key 'bundle': {exc}") from None
        self.model_id = model_id(self.bundle)
        self.classes = self.bundle.classes
        self.threshold = None
        if config.threshold >= 0:
            check_threshold(config.threshold, self.bundle.task, "key 'threshold'")
            self.threshold = config.threshold
        self.gate = TissueGate.from_manifest(self.bundle.manifest, {     # config keys set (>= 0) win
            "min_tissue_fraction": config.min_tissue_fraction, "min_focus": config.min_focus,
            "min_saturation": config.tissue_min_saturation, "max_brightness": config.tissue_max_brightness})
        self.overlay_size = config.overlay_size or self.spec.center_crop or self.spec.resize
        self.metrics = Metrics()
        for key in ("slides_dir", "snapshot_dir"):   # writable, with free space: before any slide is lost
            check_output_dir(key, getattr(config, key))
        self.slides = SlideRecorder(config.slides_dir, self.classes, self.steps)
        self.stop = threading.Event()        # pipeline: stop taking new frames
        self.halt = threading.Event()        # heartbeat/control: the daemon is going away
        self.state_lock = threading.Lock()
        self.state, self.reason, self.measures = protocol.STATE_STARTING, None, None
        self.paused = False
        self.signal_ok = False
        self.last_reject_id = 0
        self.last_lock = threading.Lock()
        # (Frame, bitmap, header sent) of the newest overlay published; the bitmap is heat_rgba's RGBA if the
        # rendered topic drew it, else a callable that draws it (only a snapshot needs it: protocol v2)
        self.last = None
        self.last_status: dict | None = None   # the newest status header sent (a snapshot before any overlay)
        self.published = 0
        self.stale_run = 0                   # overlays refused as stale in a row
        # 0 = auto: derived from the inference time measured at start-up (armscope.edge.pacing); until then the floor
        self.stale_after_ms = config.stale_after_ms or pacing.FLOOR_MS
        self.gap_watch = OverlayGapWatch(self.stale_after_ms)
        self.stop_reason = None
        self.started_mono = time.monotonic()
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.backend = None
        self.backend_info = None
        self.step_backends: dict = {}   # step-one class -> backend of its second step
        self.backend_ready = threading.Event()   # set by the inference thread once it activated (or failed to)
        # the endpoints bound, {"publish": ..., "control": ...}: a wildcard port (tcp://HOST:*) resolved to the
        # OS's choice; ``bound`` is set once both are (logged, and in the status reply)
        self.endpoints: dict[str, str] = {}
        self.bound = threading.Event()
        self.backend_error: BaseException | None = None
        self.publisher: Publisher | None = None
        self.threads: list[threading.Thread] = []
        self.http = None
        self.auth = None

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Construct the backends (cheap: they are activated on the thread that infers,
        ``activate_backends``) and open the sockets (no threads yet)."""
        from armscope.edge.backends import open_backend

        cfg = self.config
        options = {"layout": cfg.layout, "cpu_precision": cfg.cpu_precision, "feed": cfg.feed}
        if cfg.threads:
            options["threads"] = cfg.threads
        self.backend = open_backend(self.bundle, cfg.backend, **options)
        self.backend_info = self.backend.describe()
        log.info("model %s, classes %s, backend %s (requested %r)", self.model_id, self.classes,
                 self.backend.name, cfg.backend)
        for when, step in self.steps.items():
            self.step_backends[when] = open_backend(step.bundle, cfg.backend, **options)
            log.info("cascade: when %r, then %s, classes %s, backend %s", when, model_id(step.bundle),
                     step.bundle.classes, self.step_backends[when].describe())
        pub = pub_socket(self.context, self.overlay_size if cfg.rendered_topic else None)
        rep = rep_socket(self.context)
        try:  # on any failure close both: an open socket would make shutdown's context.term() wait forever
            if cfg.curve_server_secret:
                self.auth = setup_curve_server(self.context, [pub, rep], cfg.curve_server_secret,
                                               cfg.curve_clients_dir)
                log.info("CurveZMQ on: %s", "only keys in " + cfg.curve_clients_dir if cfg.curve_clients_dir
                         else "any client with the server key")
            self.endpoints = {"publish": bind(pub, cfg.publish, "publish"),
                              "control": bind(rep, cfg.control, "control")}
        except BaseException:
            pub.close(0)
            rep.close(0)
            raise
        self.publisher = Publisher(pub, self.model_id, self.stale_after_ms)
        self._rep = rep
        log.info("publishing on %s, control on %s, source %s", self.endpoints["publish"], self.endpoints["control"],
                 cfg.source)
        self.bound.set()
        self._send_status(heartbeat=False)
        self.frames = LatestSlot("capture")
        self.inputs = LatestSlot("preprocessed")
        self.results = LatestSlot("inferred")

    def activate_backends(self) -> None:
        """Activate the backend and the cascade's second-step backends on the calling
        thread, the one that will infer (a CUDA context is current per thread); if one
        fails, those already active are deactivated before the error propagates."""
        try:
            self.backend.activate()
            for backend in self.step_backends.values():
                backend.activate()
        except BaseException:
            self.deactivate_backends()
            raise
        self.backend_info = self.backend.describe()
        log.info("backend active on thread %r: %s", threading.current_thread().name, self.backend_info)

    def deactivate_backends(self) -> None:
        """Free every backend's sessions, engines and device memory (idempotent)."""
        for backend in [self.backend, *self.step_backends.values()]:
            if backend is not None:
                try:
                    backend.deactivate()
                except Exception:
                    log.exception("freeing the %s backend failed", backend.name)

    def start(self) -> None:
        """Open sockets, start the heartbeat and control threads, then the inference
        thread, and wait until it has activated the backends (their errors are raised
        here, before any frame is taken); then start capture and the other stages.
        Returns once running.

        Why heartbeats and control come first: loading the model (sessions, engines,
        the stale window's timed inferences) takes seconds to a minute, and a
        subscriber that hears nothing for ``stale_after_ms`` must presume the daemon
        dead (docs/protocol.md 1.4); so it hears ``starting`` all along, and the
        control socket answers ``status`` meanwhile."""
        self.open()
        cfg = self.config
        self.aux = [threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
                    ControlServer(self._make_rep, self.handle_command, self.halt, sock=self._rep)]
        self.control = self.aux[1]
        for thread in self.aux:
            thread.start()
        inference = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        self.threads = [inference]
        inference.start()
        self.backend_ready.wait()
        if self.backend_error is not None:
            error, self.backend_error = self.backend_error, None
            raise error
        self.capture = Capture(self.source, self.frames, self.stop, on_signal=self._on_signal,
                               on_end=lambda: self.request_stop("source ended"),
                               backoff_min=cfg.reconnect_min_s, backoff_max=cfg.reconnect_max_s,
                               exit_on_end=cfg.exit_on_source_end,
                               on_frame=lambda frame: self.metrics.captured.tick(frame.capture_mono))
        others = [
            self.capture,
            threading.Thread(target=self._preprocess_loop, name="preprocess", daemon=True),
            threading.Thread(target=self._render_loop, name="render", daemon=True),
        ]
        self.threads = [*others[:2], inference, others[2]]  # shutdown joins them in pipeline order
        for thread in others:
            thread.start()
        if cfg.metrics_http:
            try:
                self.http = serve_prometheus(cfg.metrics_http, lambda: prometheus_text(self.metrics, self._counters()))
            except OSError as exc:
                self.request_stop("metrics_http failed")
                raise ArmscopeError(f"key 'metrics_http': cannot serve on {cfg.metrics_http} ({exc})") from None

    def _make_rep(self) -> zmq.Socket:
        """A new bound control socket, for the control thread to replace one that failed."""
        rep = rep_socket(self.context)
        try:
            if self.config.curve_server_secret:
                make_curve_server(rep, *protocol.load_keypair(self.config.curve_server_secret))
            bind(rep, self.endpoints["control"], "control")   # the port bound first, even if the OS chose it
        except BaseException:
            rep.close(0)
            raise
        return rep

    def request_stop(self, reason: str = "requested") -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            log.info("stopping: %s", reason)
            self.stop.set()

    def run(self, install_signals: bool = True) -> int:
        """Start, block until stopped, shut down cleanly; returns the exit code (0)."""
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _frame: self.request_stop(signal.Signals(signum).name))
        try:
            self.start()
            while not self.stop.wait(0.2):
                pass
        finally:
            self.shutdown()
        return 0

    def shutdown(self, timeout: float = 60.0) -> None:
        """Let the in-flight frame finish, then close everything. Idempotent."""
        self.request_stop(self.stop_reason or "shutdown")
        deadline = time.monotonic() + timeout
        for thread in getattr(self, "threads", []):
            if thread.is_alive():
                thread.join(max(0.1, deadline - time.monotonic()) if thread.name != "capture" else 2.0)
                if thread.is_alive():
                    log.warning("thread %s did not finish in time", thread.name)
        if self.publisher is not None and not self.publisher.closed:
            self._set_state(protocol.STATE_STOPPING, self.stop_reason)
        self.halt.set()
        for thread in getattr(self, "aux", []):
            thread.join(2.0)
        if not getattr(self, "aux", None) and getattr(self, "_rep", None) is not None:
            self._rep.close(0)          # opened for process_frame only: no control thread owns it
        if self.publisher is not None:
            self.publisher.close()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        inference = next((t for t in getattr(self, "threads", []) if t.name == "inference"), None)
        if inference is not None and inference.is_alive():
            log.warning("the inference thread is still running: its backend is freed when the process exits")
        else:
            self.deactivate_backends()  # process_frame's; the inference thread freed its own on its way out
        self.backend = None
        self.step_backends = {}
        if self._own_context and not self.context.closed:
            self.context.term()
        log.info("stopped after %d overlays", self.published)

    # ------------------------------------------------------------ state

    def _set_state(self, state: str, reason: str | None = None, measures: dict | None = None) -> None:
        with self.state_lock:
            changed = (state, reason) != (self.state, self.reason)
            self.state, self.reason = state, reason
            if measures is not None:
                self.measures = measures
            if changed:
                log.info("state %s%s", state, f" ({reason})" if reason else "")
                self._send_status(heartbeat=False)

    def _send_status(self, heartbeat: bool) -> None:
        header = {"state": self.state, "reason": self.reason, "heartbeat": heartbeat,
                  "frame_id": self.capture.captured if hasattr(self, "capture") and self.capture.captured else None,
                  "encoding": protocol.ENCODING_NONE,
                  "detail": {"fps": self.metrics.published.rate(), "measures": self.measures,
                             "threshold": self.effective_threshold(), "source": self.config.source,
                             **self._counters()}}
        self.last_status = self.publisher.send(protocol.TOPIC_STATUS, header, b"", self.slides.slide_id)

    def _on_signal(self, ok: bool, reason: str | None) -> None:
        self.signal_ok = ok
        if self.paused:
            return
        if ok:
            self._set_state(protocol.STATE_STARTING)
        else:
            self._set_state(protocol.STATE_NO_SIGNAL, reason)

    def effective_threshold(self) -> float | None:
        return self.threshold if self.threshold is not None else self.bundle.task.get("threshold")

    def _counters(self) -> dict:
        capture = getattr(self, "capture", None)
        slots = [getattr(self, name, None) for name in ("frames", "inputs", "results")]
        control = getattr(self, "control", None)
        return {"control": control.state if control else None,
                "control_restarts": control.restarts if control else 0,
                "control_bad_requests": control.bad_requests if control else 0,
                "frames_captured": capture.captured if capture else 0,
                "corrupt": capture.corrupt if capture else 0,
                "reconnects": capture.reconnects if capture else 0,
                "dropped": sum(s.dropped for s in slots if s is not None),
                "frames_published": self.published}

    def metrics_snapshot(self) -> dict:
        return self.metrics.snapshot(self._counters())

    def _heartbeat_loop(self) -> None:
        period = 1.0 / self.config.heartbeat_hz
        while not self.halt.wait(period):
            try:
                with self.state_lock:
                    self._send_status(heartbeat=True)
            except Exception:
                log.exception("heartbeat failed")

    # ------------------------------------------------------------ control (armscope.edge.commands)

    COMMANDS = commands.COMMANDS

    def handle_command(self, cmd: str, args: list[str]) -> dict:
        """Control-socket commands (docs/protocol.md, section 2). Raise ArmscopeError for bad requests."""
        return commands.handle_command(self, cmd, args)

    def status_reply(self) -> dict:
        return commands.status_reply(self)

    def snapshot(self) -> list[Path]:
        return commands.snapshot(self)


def run_daemon(config: Config) -> int:
    """Entry point for ``armscope run``."""
    from armscope.edge.logs import setup_logging

    setup_logging(config.log_format, config.log_level)
    return Daemon(config).run()
