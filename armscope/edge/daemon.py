"""The real-time edge daemon: camera -> tissue/focus gate + preprocessing ->
ensemble inference -> Grad-CAM overlay -> ZeroMQ, as four threads joined by
newest-wins slots (``armscope.edge.pipeline``), so throughput is that of the slowest
stage (inference) and latency never grows with a backlog.

Threads: ``capture`` (armscope.edge.capture.Capture), ``preprocess``, ``inference``,
``render`` (overlay + publish), ``heartbeat`` (status at a fixed rate),
``control`` (REP socket). The inference backend releases the GIL, so the
other stages run while it computes.

Shutdown (SIGTERM/SIGINT, ``max_frames``, a finite source ending with
``exit_on_source_end``): capture and preprocessing stop taking frames, the
frames already preprocessed or being inferred are finished and published
(unless older than the stale window), then a ``stopping`` status is
sent, sockets are closed and ``run`` returns 0.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import zmq

from armscope.core import protocol
from armscope.core.bundle import load_bundle, require_deployable
from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import crop_box, gate_region, preprocess_frame
from armscope.edge import pacing
from armscope.edge.capture import Capture, Frame
from armscope.edge.cascade import load_steps, model_id
from armscope.edge.config import Config
from armscope.edge.control import ControlServer
from armscope.core.decision import check_threshold, decide
from armscope.edge.metrics import Metrics, OverlayGapWatch, prometheus_text, serve_prometheus
from armscope.core.overlay import focus_mask, heat_rgba
from armscope.edge.pipeline import LatestSlot, SlotClosed
from armscope.edge.publisher import Publisher, bind, make_curve_server, pub_socket, rep_socket, setup_curve_server
from armscope.edge.slides import SlideRecorder
from armscope.edge.sources import parse_source
from armscope.edge.storage import check_output_dir, write_all
from armscope.core.tissue import TissueGate

log = logging.getLogger(__name__)

POLL_S = 0.1


@dataclass
class Work:
    """One frame on its way through the pipeline, with its stage timings (ms)."""

    frame: Frame
    box: tuple[int, int, int]
    measures: dict
    times: dict
    batch: np.ndarray | None = None
    outputs: dict | None = None
    decision: dict | None = None     # step one's
    subtype: dict | None = None      # the second step's result (cascade bundles), else None
    cam: np.ndarray | None = None    # the CAM the overlay shows: of the most specific decision


def inner_square_cam(cam: np.ndarray, frame_shape) -> np.ndarray:
    """A whole-image bundle's CAM covers the frame padded to a square; the eyepiece
    region (the bridge takes squares inside the frame) is the largest centred square
    inside the frame: the CAM resampled to the padded square and cut there."""
    h, w = frame_shape[:2]
    if h == w:
        return cam
    side, inner = max(h, w), min(h, w)
    full = cv2.resize(cam.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    start = (side - inner) // 2
    return full[start:start + inner, start:start + inner]  # the frame sits centred in the square on both axes


def focus_bbox(cam: np.ndarray, size: int) -> list[int] | None:
    """[x, y, w, h] in overlay pixels of the AI-focused region (armscope.core.overlay.focus_mask)."""
    ys, xs = np.nonzero(focus_mask(cam))
    if len(xs) == 0:
        return None
    sy, sx = size / cam.shape[0], size / cam.shape[1]
    x0, y0 = int(xs.min() * sx), int(ys.min() * sy)
    return [x0, y0, int((xs.max() + 1) * sx) - x0, int((ys.max() + 1) * sy) - y0]


class Daemon:
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
        self.last: tuple[Frame, np.ndarray, dict] | None = None
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
        options = {"layout": cfg.layout, "cpu_precision": cfg.cpu_precision}
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
        pub = pub_socket(self.context, self.overlay_size)
        rep = rep_socket(self.context)
        try:  # on any failure close both: an open socket would make shutdown's context.term() wait forever
            if cfg.curve_server_secret:
                self.auth = setup_curve_server(self.context, [pub, rep], cfg.curve_server_secret,
                                               cfg.curve_clients_dir)
                log.info("CurveZMQ on: %s", "only keys in " + cfg.curve_clients_dir if cfg.curve_clients_dir
                         else "any client with the server key")
            bind(pub, cfg.publish, "publish")
            bind(rep, cfg.control, "control")
        except BaseException:
            pub.close(0)
            rep.close(0)
            raise
        self.publisher = Publisher(pub, self.model_id, self.stale_after_ms)
        self._rep = rep
        log.info("publishing on %s, control on %s, source %s", cfg.publish, cfg.control, cfg.source)
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
        """Open sockets, start the inference thread and wait until it has activated the
        backends (their errors are raised here, before any frame is taken), then start
        every other thread. Returns once running."""
        self.open()
        cfg = self.config
        rep = self._rep
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
        self.aux = [threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
                    ControlServer(self._make_rep, self.handle_command, self.halt, sock=rep)]
        self.control = self.aux[1]
        for thread in others + self.aux:
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
            bind(rep, self.config.control, "control")
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
        self.publisher.send(protocol.TOPIC_STATUS, header, b"", self.slides.slide_id)

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

    # ------------------------------------------------------------ stages

    def _preprocess_loop(self) -> None:
        try:
            while not self.stop.is_set():
                # Just in time: take the newest frame only once inference is waiting for
                # work. Preprocessing every captured frame (30 fps) only for the slot to
                # replace it would take a core away from inference on a 2-core CPU
                # (measured: 0.21 fps instead of ~0.5 with the full ensemble).
                if not self.inputs.wait_for_consumer(POLL_S):
                    continue
                try:
                    frame = self.frames.get(POLL_S)
                except SlotClosed:
                    break
                if frame is None:
                    continue
                if self.paused:
                    self.metrics.count("paused_frames")
                    continue
                work = self._preprocess(frame)
                if work is not None:
                    self.inputs.put(work)
        except Exception:
            log.exception("preprocess stage failed")
            self.request_stop("preprocess stage failed")
        finally:
            self.inputs.close()

    def _preprocess(self, frame: Frame) -> Work | None:
        """Gate and preprocess one frame; None when it is not to be classified."""
        t0 = time.monotonic()
        h, w = frame.image.shape[:2]
        c = self.spec.center_crop
        if c and (h < c or w < c):
            self.metrics.count("too_small")
            log.warning("frame %d is %dx%d, smaller than the bundle's %d px crop; skipped", frame.id, w, h, c)
            return None
        top, left, size = crop_box(frame.image.shape, self.spec)
        if c == 0:  # whole images: the published region is the largest centred square inside the frame
            size = min(h, w)
            top, left = (h - size) // 2, (w - size) // 2
        measures = self.gate.measure(gate_region(frame.image, self.spec))
        reason = self.gate.verdict(measures)
        if reason is not None:
            self.metrics.count("no_tissue")
            self.last_reject_id = frame.id
            self._set_state(protocol.STATE_NO_TISSUE, reason, measures)
            return None
        batch = preprocess_frame(frame.image, self.spec, source=f"frame {frame.id}")[None]
        t1 = time.monotonic()
        times = {"queue": (t0 - frame.capture_mono) * 1000, "preprocess": (t1 - t0) * 1000, "_t": t1}
        self.metrics.observe("queue", times["queue"])
        self.metrics.observe("preprocess", times["preprocess"])
        return Work(frame, (top, left, size), measures, times, batch=batch)

    def _inference_loop(self) -> None:
        """Activates the backends here, infers, and frees them here on the way out."""
        try:
            try:
                self.activate_backends()
                if not self.config.stale_after_ms:
                    self._derive_stale_window()
            except BaseException as exc:  # start() raises it on the main thread
                self.backend_error = exc
                return
            finally:
                self.backend_ready.set()
            # Until preprocessing closes its slot (it stops taking frames at once on stop), so a
            # field already preprocessed when the stop came is still inferred and published.
            while True:
                try:
                    work = self.inputs.get(POLL_S)
                except SlotClosed:
                    break
                if work is None:
                    continue
                self.results.put(self._infer(work))
        except Exception:
            log.exception("inference stage failed")
            self.request_stop("inference stage failed")
        finally:
            self.deactivate_backends()
            self.results.close()

    def _derive_stale_window(self) -> None:
        """stale_after_ms = 0 (auto): time this machine's inference, here on the thread
        that infers and before any frame, and set the window by armscope.edge.pacing's rule. A
        cascade frame runs step one and at most one second step: the slowest is counted."""
        size = self.bundle.input_size
        frame_ms = pacing.time_inference_ms(self.backend.infer, size)
        frame_ms += max((pacing.time_inference_ms(b.infer, size) for b in self.step_backends.values()), default=0.0)
        window = pacing.stale_window_ms(frame_ms)
        self.stale_after_ms = window
        self.publisher.stale_after_ms = window
        self.gap_watch.stale_after_ms = float(window)
        log.info("stale_after_ms auto: %d ms from %.0f ms per frame measured here (3 x frame + %d ms, at least %d)",
                 window, frame_ms, pacing.MARGIN_MS, pacing.FLOOR_MS)
        if window > 5000:
            log.warning("stale_after_ms auto = %d ms: overlays may be up to that old on this machine; a bridge with "
                        "the default --max-stale-ms 5000 blanks them sooner", window)

    def _infer(self, work: Work) -> Work:
        """Step one, and for a cascade bundle the second step its decision
        selects, on the same preprocessed field (timed together as inference)."""
        t0 = time.monotonic()
        work.outputs = self.backend.infer(work.batch)
        work.decision = decide(work.outputs["probs"][0], self.bundle.task, self.threshold)
        work.cam = work.outputs["cam"][0, work.decision["index"]]
        step = self.steps.get(work.decision["label"])
        if step is not None:
            sub = self.step_backends[step.when].infer(work.batch)
            work.subtype = step.result(sub["probs"][0])
            work.cam = sub["cam"][0, work.subtype["decision"]["index"]]
        if self.spec.center_crop == 0:
            work.cam = inner_square_cam(work.cam, work.frame.image.shape)
        work.batch = None
        t1 = time.monotonic()
        work.times["inference"] = (t1 - t0) * 1000
        work.times["_t"] = t1
        self.metrics.observe("inference", work.times["inference"])
        return work

    def process_frame(self, frame: Frame) -> dict | None:
        """All stages for one frame, serially, in the calling thread (after ``open``):
        what the benchmark compares with pure inference. Returns the header sent,
        or None if the gate rejected the frame or it was too old to publish. The
        backends are activated on the calling thread at the first call."""
        if not self.backend.active:
            self.activate_backends()
        work = self._preprocess(frame)
        if work is None:
            return None
        if not self._render_and_publish(self._infer(work)):
            return None
        with self.last_lock:
            return self.last[2]

    def _render_loop(self) -> None:
        """Runs until the inference stage has closed its slot, so the frame in
        flight at shutdown is still published."""
        try:
            while True:
                try:
                    work = self.results.get(POLL_S)
                except SlotClosed:
                    break
                if work is None:
                    continue
                if self.paused:
                    self.metrics.count("paused_frames")
                    continue
                self._render_and_publish(work)
                if self.config.max_frames and self.published >= self.config.max_frames:
                    self.request_stop(f"published max_frames={self.config.max_frames}")
        except Exception:
            log.exception("render stage failed")
            self.request_stop("render stage failed")

    def _render_and_publish(self, work: Work) -> bool:
        """Render and publish one classified frame; False if it was too old to publish."""
        t0 = time.monotonic()
        probs = work.outputs["probs"][0]
        decision, cam = work.decision, work.cam
        size = self.overlay_size
        rgba = heat_rgba(cam, size, max_alpha=self.config.max_alpha)
        if self.config.encoding == protocol.ENCODING_PNG:
            ok, png = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 1])
            payload = png.tobytes()
        else:
            payload = rgba.tobytes()
        frame = work.frame
        top, left, crop = work.box
        t1 = time.monotonic()
        times = work.times
        times["render"] = (t1 - t0) * 1000
        times["total"] = (t1 - frame.capture_mono) * 1000
        header = {
            "frame_id": frame.id, "capture_mono": frame.capture_mono, "capture_wall": frame.capture_wall,
            "classes": self.classes, "probs": [protocol.finite(p) for p in probs],
            "decision": {k: (protocol.finite(v) if k in ("score", "threshold") else v) for k, v in decision.items()},
            "width": size, "height": size, "format": protocol.FORMAT_RGBA8, "encoding": self.config.encoding,
            "region": {"frame_width": frame.image.shape[1], "frame_height": frame.image.shape[0],
                       "x": left, "y": top, "size": crop},
            "subtype": work.subtype,
            "focus_bbox": focus_bbox(cam, size), "measures": work.measures,
            "latency_ms": {k: round(v, 2) for k, v in times.items() if not k.startswith("_")},
        }
        slide_id = self.slides.slide_id
        sent = self.publisher.send(protocol.TOPIC_OVERLAY, header, payload, slide_id)
        t2 = time.monotonic()
        # The field was classified: it counts for the slide even when too old to show.
        self.slides.add(probs, slide_id, work.subtype)
        if sent is None:
            self._stale_overlay(frame)
            return False
        self.stale_run = 0
        self.published += 1
        self.metrics.observe("render", times["render"])
        self.metrics.observe("publish", (t2 - t1) * 1000)
        self.metrics.observe("capture_to_publish", (sent.get("publish_mono", t2) - frame.capture_mono) * 1000)
        self.metrics.published.tick(t2)
        gap_warning = self.gap_watch.observe(t2, (sent.get("publish_mono", t2) - frame.capture_mono) * 1000)
        if gap_warning:
            self.metrics.count("overlay_gap_warnings")
            log.warning("%s", gap_warning)
        with self.last_lock:
            self.last = (frame, rgba, sent)
        if self.signal_ok and not self.paused and frame.id > self.last_reject_id:
            self._set_state(protocol.STATE_RUNNING, None, work.measures)
        return True

    def _stale_overlay(self, frame: Frame) -> None:
        """An overlay too old to publish (Publisher.send refused it): count it, and
        log the first of each run of them, with the likely cause."""
        self.metrics.count("stale_dropped")
        self.stale_run += 1
        if self.stale_run == 1:
            age = self.publisher.last_stale_age_ms
            log.warning("frame %d not published: captured %.0f ms ago, over stale_after_ms=%d (the process was "
                        "paused, or the pipeline is slower than the stale window: raise stale_after_ms or use a "
                        "faster backend)", frame.id, age if age is not None else float("nan"),
                        self.stale_after_ms)

    def _heartbeat_loop(self) -> None:
        period = 1.0 / self.config.heartbeat_hz
        while not self.halt.wait(period):
            try:
                with self.state_lock:
                    self._send_status(heartbeat=True)
            except Exception:
                log.exception("heartbeat failed")

    # ------------------------------------------------------------ control

    COMMANDS = ("status", "pause", "resume", "slide start ID", "slide end", "threshold X", "threshold reset",
                "snapshot", "help")

    def handle_command(self, cmd: str, args: list[str]) -> dict:
        """Control-socket commands (docs/protocol.md, section 2). Raise ArmscopeError for bad requests."""
        def need(n: int, usage: str):
            if len(args) != n:
                raise ArmscopeError(f"{cmd}: usage: {usage}")

        if cmd == "status":
            need(0, "status")
            return self.status_reply()
        if cmd == "help":
            return {"commands": list(self.COMMANDS)}
        if cmd in ("pause", "resume"):
            need(0, cmd)
            self.paused = cmd == "pause"
            if self.paused:
                self._set_state(protocol.STATE_PAUSED)
            else:
                self._set_state(protocol.STATE_STARTING if self.signal_ok else protocol.STATE_NO_SIGNAL)
            return {"state": self.state}
        if cmd == "slide":
            if args[:1] == ["start"] and len(args) == 2:
                ended = None
                if self.slides.slide_id is not None:
                    ended = self._end_slide()
                self.slides.start(args[1])
                log.info("slide %s started", args[1])
                return {"slide_id": args[1], "ended": ended}
            if args == ["end"]:
                return self._end_slide()
            raise ArmscopeError("slide: usage: slide start ID | slide end")
        if cmd == "threshold":
            need(1, "threshold X (0..1) | threshold reset")
            if args[0] == "reset":
                self.threshold = None
            else:
                try:
                    value = float(args[0])
                except ValueError:
                    raise ArmscopeError(f"threshold: {args[0]!r} is not a number") from None
                check_threshold(value, self.bundle.task, "threshold")
                self.threshold = value
            return {"threshold": self.effective_threshold()}
        if cmd == "snapshot":
            need(0, "snapshot")
            return {"files": [str(p) for p in self.snapshot()]}
        raise ArmscopeError(f"unknown command {cmd!r} (commands: {', '.join(self.COMMANDS)})")

    def _end_slide(self) -> dict:
        record, path = self.slides.end({"model_id": self.model_id, "threshold": self.effective_threshold()},
                                       lambda mean: decide(mean, self.bundle.task, self.threshold))
        log.info("slide %s ended: %d frames -> %s", record["slide_id"], record["n_frames"], path)
        return {"slide": record, "record": str(path)}

    def status_reply(self) -> dict:
        return {"state": self.state, "reason": self.reason, "run_id": self.publisher.run_id,
                "model_id": self.model_id, "classes": self.classes,
                "steps": {when: model_id(step.bundle) for when, step in self.steps.items()},
                "backend": self.backend_info, "source": self.config.source,
                "slide_id": self.slides.slide_id, "threshold": self.effective_threshold(), "paused": self.paused,
                "uptime_s": round(time.monotonic() - self.started_mono, 3), "measures": self.measures,
                "metrics": self.metrics_snapshot()}

    def snapshot(self) -> list[Path]:
        """Save the last classified frame, its overlay and header (or, before any
        overlay, the newest captured frame and the daemon status)."""
        with self.last_lock:
            last = self.last
        directory = Path(self.config.snapshot_dir)
        if last is not None:
            frame, rgba, header = last
        else:
            frame = getattr(self, "capture", None) and self.capture.latest
            if frame is None:
                raise ArmscopeError("snapshot: no frame captured yet")
            rgba, header = None, {"topic": "status", "state": self.state, "reason": self.reason}
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}_frame{frame.id:06d}"
        files = [(directory / f"{stem}_frame.png", cv2.imencode(".png", frame.image)[1].tobytes())]
        if rgba is not None:
            files.append((directory / f"{stem}_overlay.png",
                          cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))[1].tobytes()))
        files.append((directory / f"{stem}_header.json", (json.dumps(header, indent=2, default=str) + "\n").encode()))
        return write_all(files, "snapshot")   # all three or none, and the reason if not


def run_daemon(config: Config) -> int:
    """Entry point for ``armscope run``."""
    from armscope.edge.logs import setup_logging

    setup_logging(config.log_format, config.log_level)
    return Daemon(config).run()
