"""The daemon's per-frame stages, as a base class of ``armscope.edge.daemon.Daemon``:
gate and preprocess a frame, infer it (and a cascade's second step), render
and publish its overlay, and the three loops that run them on their own
threads joined by newest-wins slots (``armscope.edge.pipeline``).

Why apart from the daemon: these are what one frame goes through, while the
daemon module holds what the process goes through (sockets, threads, backends,
state, shutdown). ``Daemon.process_frame`` runs the same stages serially for the
benchmarks. The attributes used here (``spec``, ``gate``, ``backend``,
``publisher``, the slots...) are set by ``Daemon.__init__``/``open``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import cv2
import numpy as np

from armscope.core import protocol
from armscope.core.decision import decide
from armscope.core.overlay import heat_rgba
from armscope.core.front import camera_crop, crop_shape
from armscope.core.preprocess import crop_box, gate_region, preprocess_frame
from armscope.edge import pacing
from armscope.edge.capture import Frame
from armscope.edge.overlay_message import focus_bbox, overlay_message, rendered_message  # noqa: F401  (focus_bbox re-exported)
from armscope.edge.pipeline import SlotClosed

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
    cam: np.ndarray | None = None    # the CAM the overlay shows: of the most specific decision, as the region sees it
    cams: np.ndarray | None = None   # all maps of the step that made ``cam`` (C, h, w), as the model made them
    cam_index: int = 0               # ``cam``'s map in ``cams``


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


class FrameStages:
    """The stages of ``Daemon`` (see the module docstring)."""

    def _preprocess_loop(self) -> None:
        try:
            while not self.stop.is_set():
                # Just in time: take the newest frame only once inference is waiting for
                # work. Preprocessing every captured frame (30 fps) only for the slot to
                # replace it would take a core away from inference on a small CPU
                # (the frame rate halved with the full ensemble: BENCHMARKS.md section 2).
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
        if self.config.feed == "uint8":  # the crop as captured: the bundle's uint8 front resizes it in the graph
            batch = camera_crop(frame.image, self.spec, source=f"frame {frame.id}")[None]
        else:
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
        crop = None   # feed uint8: a mid-grey camera crop, so the front's resize is timed too
        if self.config.feed == "uint8":
            crop = np.full((1, *crop_shape(self.spec)), 128, np.uint8)
        frame_ms = pacing.time_inference_ms(self.backend.infer, size, crop)
        frame_ms += max((pacing.time_inference_ms(b.infer, size, crop) for b in self.step_backends.values()),
                        default=0.0)
        window = pacing.stale_window_ms(frame_ms)
        self.stale_after_ms = window
        self.publisher.stale_after_ms = window
        self.gap_watch.stale_after_ms = float(window)
        log.info("stale_after_ms auto: %d ms from %.0f ms per frame measured here (3 x frame + %d ms, at least %d)",
                 window, frame_ms, pacing.MARGIN_MS, pacing.FLOOR_MS)
        if window > protocol.BRIDGE_MAX_STALE_MS:
            log.warning("stale_after_ms auto = %d ms: overlays may be up to that old on this machine; a bridge with "
                        "the default --max-stale-ms %g blanks them sooner", window, protocol.BRIDGE_MAX_STALE_MS)

    def _infer(self, work: Work) -> Work:
        """Step one, and for a cascade bundle the second step its decision
        selects, on the same preprocessed field (timed together as inference)."""
        t0 = time.monotonic()
        work.outputs = self.backend.infer(work.batch)
        work.decision = decide(work.outputs["probs"][0], self.bundle.task, self.threshold)
        work.cams, work.cam_index = work.outputs["cam"][0], work.decision["index"]
        step = self.steps.get(work.decision["label"])
        if step is not None:
            sub = self.step_backends[step.when].infer(work.batch)
            work.subtype = step.result(sub["probs"][0])
            work.cams, work.cam_index = sub["cam"][0], work.subtype["decision"]["index"]
        work.cam = work.cams[work.cam_index]
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
        cfg = self.config
        header, payload = overlay_message(work, self.classes, max_alpha=cfg.max_alpha, dtype=cfg.cam_dtype,
                                          whole_image=self.spec.center_crop == 0)
        rgba = partial(heat_rgba, work.cam, self.overlay_size, max_alpha=cfg.max_alpha)  # for a snapshot
        if cfg.rendered_topic:
            rendered, rendered_payload, rgba = rendered_message(work, self.classes, size=self.overlay_size,
                                                                max_alpha=cfg.max_alpha, encoding=cfg.encoding)
        frame = work.frame
        t1 = time.monotonic()
        times = work.times
        times["render"] = (t1 - t0) * 1000
        times["total"] = (t1 - frame.capture_mono) * 1000
        header["latency_ms"] = {k: round(v, 2) for k, v in times.items() if not k.startswith("_")}
        slide_id = self.slides.slide_id
        # The field was classified: it counts for the slide even when too old to show, and before its overlay
        # goes out, so a client that ends the slide on seeing an overlay finds that frame in the record.
        self.slides.add(probs, slide_id, work.subtype)
        with self.last_lock:   # sent and recorded together: a snapshot asked for by a client that
            sent = self.publisher.send(protocol.TOPIC_OVERLAY, header, payload, slide_id)   # saw it finds it
            if sent is not None:
                self.last = (frame, rgba, sent)
        if sent is not None and cfg.rendered_topic:
            rendered["latency_ms"] = header["latency_ms"]
            self.publisher.send(protocol.TOPIC_RENDERED, rendered, rendered_payload, slide_id)
        t2 = time.monotonic()
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
