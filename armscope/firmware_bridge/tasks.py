"""The eyepiece side's operator tasks as plain functions: run the bridge until stopped,
blank a display, serve a simulated display controller, fit the camera -> display
registration. ``armscope bridge ...`` (armscope/cli/bridge.py) parses the arguments and
calls these; what decides whether a setting, a fit or a display is safe to use lives here,
beside the code that uses it, so a script calling the library gets the same refusals.

Errors a user can fix raise ``ArmscopeError`` (or the bridge's own ``RegistrationError``,
``DisplayURIError``, ``LinkError``, ``ValueError``: ``USER_ERRORS``) naming the input.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import urllib.parse

import cv2
import numpy as np

from armscope.core.errors import ArmscopeError

from .registration import (
    Registration,
    RegistrationError,
    check_fits_display,
    from_camera_image,
    from_point_pairs,
    load_point_pairs,
    load_registration,
    mirrors,
    save_registration,
)
from .simulator import ControllerCore, PtyController

log = logging.getLogger("armscope.firmware_bridge")


def user_errors() -> tuple[type[BaseException], ...]:
    """What a bad URI, file or setting raises: shown as one line, exit 2 (imported late:
    the display and link modules bring numba/serial only when a command needs them)."""
    from .displays import DisplayURIError
    from .link import LinkError

    return (RegistrationError, DisplayURIError, ValueError, OSError, LinkError, ArmscopeError)


def with_query(uri: str, key: str, value: float) -> str:
    """Add ``key=value`` to a display URI; an URI that already sets it differently is an error."""
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    if key in query:
        try:
            given = float(query[key][-1])
        except ValueError:
            raise ValueError(f"display URI {uri!r}: option {key}={query[key][-1]!r} is not a number") from None
        if given != float(value):
            raise ValueError(f"--{key} {value} contradicts {key}={query[key][-1]} in the display URI")
        return uri
    extra = f"{key}={value}"
    return urllib.parse.urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


def _on_signals(handler) -> dict:
    """SIGINT/SIGTERM -> ``handler`` while a task runs (main thread only); returns what to restore."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: handler())
    return previous


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def serve_simulator(core: ControllerCore, duration: float, announce=print) -> str:
    """A simulated display controller on a new pty until SIGINT/SIGTERM or ``duration`` s
    (0: until stopped). ``announce`` gets the pty path first (scripts read it); returns
    the summary line."""
    sim = PtyController(core, announce_boot=True)
    announce(sim.start())
    stop = threading.Event()
    previous = _on_signals(stop.set)
    try:
        end = time.monotonic() + duration if duration > 0 else None
        while not stop.is_set():
            if end is not None and time.monotonic() >= end:
                break
            stop.wait(0.1)
    finally:
        _restore(previous)
        sim.stop()
    s = core.stats
    return (f"simulator stopped: frames={s.frames_shown} blanks={s.blanks} watchdog_blanks={s.watchdog_blanks} "
            f"resets={s.resets} acks={s.acks} naks={s.naks} rejected={core.decoder.rejected} bytes_in={s.bytes_in}")


def fit_registration(out: str, display_size: tuple[int, int], *, points: str | None = None,
                     camera_image: str | None = None, grid: tuple[int, int] | None = None,
                     margin: float | None = None, ransac: bool = False, ransac_threshold: float = 3.0,
                     mirrored: bool = False, force: bool = False) -> Registration:
    """The camera -> display registration from point pairs or a camera image of the dot grid,
    written to ``out``. Refused: replacing ``out`` unasked (the registration in use may be
    the only good one), options that do not apply, and a fit that mirrors the image unless
    the optics do (``mirrored``): a mirrored fit puts the heat on the wrong tissue."""
    if os.path.exists(out) and not force:
        raise ArmscopeError(f"{out}: already exists (use --force to replace it)")
    if points and (grid is not None or margin is not None):
        raise ArmscopeError("--grid and --margin describe a --camera-image; they do not apply to --points")
    if points:
        cam, disp = load_point_pairs(points)
        reg = from_point_pairs(cam, disp, display_size, ransac=ransac, ransac_threshold=ransac_threshold)
    else:
        if grid is None:
            raise ArmscopeError("--camera-image needs --grid COLSxROWS")
        if not os.path.isfile(camera_image):
            raise ArmscopeError(f"{camera_image}: no such image file")
        image = cv2.imread(camera_image, cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ArmscopeError(f"cannot read image {camera_image}")
        reg = from_camera_image(image, grid, display_size, margin=0.1 if margin is None else margin, ransac=ransac)
    centre = np.array([[[reg.display_size[0] / 2, reg.display_size[1] / 2]]])
    if mirrors(reg.matrix, cv2.perspectiveTransform(centre, np.linalg.inv(reg.matrix))[0, 0]) != mirrored:
        raise RegistrationError(
            "the fit mirrors the camera image on the display (left-right or up-down); if the optics do, pass "
            "--mirrored, else check the points or that --grid is COLSxROWS as the display shows it"
            if not mirrored else "--mirrored was given but the fit does not mirror the camera image")
    save_registration(reg, out)
    return reg


def blank_display(uri: str) -> None:
    """Blank the display at ``uri`` once (for a supervisor after the bridge stopped: a killed
    bridge cannot blank on its way out, and a framebuffer keeps its last picture)."""
    from .displays import open_display

    with open_display(uri) as display:
        display.blank()


def open_bridge(connect: str, display_uri: str, *, registration_path: str | None = None,
                brightness: float | None = None, gamma: float | None = None, curve: dict | None = None, **options):
    """A started ``Bridge`` on ``display_uri`` (with ``brightness``/``gamma`` merged into the URI),
    its registration checked against the display's size. On any error the display, if it
    was opened, is blanked and closed before the error propagates: never a stale overlay."""
    from .bridge import Bridge
    from .displays import open_display

    display = None
    try:
        registration = load_registration(registration_path) if registration_path else None
        uri = display_uri
        for key, value in (("brightness", brightness), ("gamma", gamma)):
            if value is not None:
                uri = with_query(uri, key, value)
        display = open_display(uri)
        check_fits_display(registration, registration_path, display.size, display_uri)
        bridge = Bridge(display, connect=connect, registration=registration, curve=curve, **options)
        if registration is None:
            log.warning("no --registration: assuming the display shows the whole camera frame (uncalibrated)")
        bridge.start()
        return bridge
    except BaseException:
        if display is not None:
            try:
                display.blank()
            except Exception:
                pass
            display.close()
        raise


def run_bridge(bridge, duration: float) -> None:
    """Run a started bridge until SIGINT/SIGTERM or ``duration`` s (0: until stopped).
    ``Bridge.run`` blanks and closes the display on the way out, whatever ends it."""
    previous = _on_signals(bridge.stop)
    try:
        bridge.run(duration=duration if duration > 0 else None)
    finally:
        _restore(previous)
