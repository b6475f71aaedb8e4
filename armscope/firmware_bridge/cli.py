"""Entry points for ``armscope bridge [run]``, ``bridge simulate`` and ``bridge register``.

Why this module exists
----------------------
``run`` is the eyepiece-side runtime (``bridge.Bridge``): subscribe to the
daemon, drive the display, blank on every unsafe condition.  The other two
are operator tasks run at a bench: bring up a fake display controller on a
pseudo-terminal (to test a host set-up with no hardware), and measure the
camera -> display registration.  They are plain ``main(argv) -> int``
functions so the main ``armscope`` CLI can mount them as subcommands and
tests can call them directly.  Exit codes: 0 ok, 1 unexpected error,
2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

import cv2
import numpy as np

from armscope.core.cpus import cpu_name, usable_cpus
from armscope.core.argtypes import number as _number
from armscope.core.errors import output_file_problem

from .link import MAX_PAYLOAD_RANGE
from .pixel_formats import GAMMA_RANGE, PixelFormat
from .registration import (
    RegistrationError,
    check_fits_display,
    from_camera_image,
    from_point_pairs,
    load_point_pairs,
    mirrors,
    save_registration,
)
from .simulator import ControllerCore, FaultPlan, PtyController

__all__ = ["run_main", "simulate_main", "register_main", "blank_main", "bench_main", "main"]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1280x720, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


_SECONDS = _number(0.0)  # a duration or interval; 0 = the option's 'never'/'until stopped'
_MAX_PAYLOAD = _number(*MAX_PAYLOAD_RANGE, integer=True)
_BRIGHTNESS = _number(0.0, 1.0)
_GAMMA = _number(*GAMMA_RANGE)


def _connect_endpoint(text: str) -> str:
    from armscope.core.protocol import endpoint_problem

    if (problem := endpoint_problem(text, bind=False)) is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _prob(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"probability must be within [0, 1], got {text!r}")
    return v


def _fmt(text: str) -> PixelFormat:
    try:
        return PixelFormat.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def simulate_main(argv: list[str] | None = None) -> int:
    """Run a simulated display controller on a pty until SIGINT/SIGTERM or ``--duration``.

    Prints the pty path as the first stdout line (for scripts), then a
    summary on stderr when it stops.
    """
    p = argparse.ArgumentParser(prog="armscope bridge simulate", description=simulate_main.__doc__)
    p.add_argument("--pty", action="store_true", required=True, help="serve on a new pseudo-terminal (the only transport)")
    p.add_argument("--width", type=_number(1, 0xFFFF, integer=True), required=True)
    p.add_argument("--height", type=_number(1, 0xFFFF, integer=True), required=True)
    p.add_argument("--format", type=_fmt, default=PixelFormat.RGB565_LE, help="rgb888, rgb565le, rgb565be, gray8, mono1")
    p.add_argument("--png-dir", help="write every shown frame/blank as a numbered PNG here")
    p.add_argument("--max-payload", type=_MAX_PAYLOAD, default=4096,
                   help=f"largest FRAME body the controller accepts ({MAX_PAYLOAD_RANGE[0]}..{MAX_PAYLOAD_RANGE[1]})")
    p.add_argument("--drop", type=_prob, default=0.0, help="probability of dropping each received byte")
    p.add_argument("--corrupt", type=_prob, default=0.0, help="probability of corrupting each received byte")
    p.add_argument("--reset-prob", type=_prob, default=0.0, help="probability of a controller reset per FRAME message")
    p.add_argument("--drop-replies", type=_prob, default=0.0, help="probability of losing each reply")
    p.add_argument("--seed", type=_number(0, 2**32 - 1, integer=True), default=None, help="fault random seed")
    p.add_argument("--duration", type=_SECONDS, default=0.0, help="stop after this many seconds (0 = until interrupted)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        faults = FaultPlan(
            drop_prob=args.drop, corrupt_prob=args.corrupt, reset_prob=args.reset_prob,
            drop_reply_prob=args.drop_replies, seed=args.seed,
        )
        core = ControllerCore(args.width, args.height, args.format, max_payload=args.max_payload,
                              png_dir=args.png_dir, faults=faults)
    except (ValueError, OSError) as exc:
        print(f"armscope bridge simulate: {exc}", file=sys.stderr)
        return 2
    sim = PtyController(core, announce_boot=True)
    path = sim.start()
    print(path, flush=True)
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        end = time.monotonic() + args.duration if args.duration > 0 else None
        while not stop.is_set():
            if end is not None and time.monotonic() >= end:
                break
            stop.wait(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sim.stop()
    s = core.stats
    print(
        f"simulator stopped: frames={s.frames_shown} blanks={s.blanks} watchdog_blanks={s.watchdog_blanks} resets={s.resets} acks={s.acks} "
        f"naks={s.naks} rejected={core.decoder.rejected} bytes_in={s.bytes_in}",
        file=sys.stderr,
    )
    return 0


def register_main(argv: list[str] | None = None) -> int:
    """Compute the camera -> display registration and write it as JSON."""
    p = argparse.ArgumentParser(prog="armscope bridge register", description=register_main.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--points", help="JSON or CSV file of camera/display point pairs")
    src.add_argument("--camera-image", help="camera image of the dot grid shown on the display")
    p.add_argument("--grid", type=_size, help="dot grid as COLSxROWS (with --camera-image)")
    p.add_argument("--margin", type=_number(0.0, 0.45), help="grid margin as a fraction of the display size "
                   "(0..0.45, default 0.1; with --camera-image)")
    p.add_argument("--display-size", type=_size, required=True, help="display size as WxH")
    p.add_argument("--ransac", action="store_true", help="reject outlier pairs with RANSAC")
    p.add_argument("--ransac-threshold", type=_number(0.0, 1000.0, above=True), default=3.0,
                   help="RANSAC inlier distance, display px")
    p.add_argument("--out", required=True, help="registration JSON to write")
    p.add_argument("--force", action="store_true", help="replace an existing registration file")
    p.add_argument("--mirrored", action="store_true",
                   help="the optics mirror the display relative to the camera; without it a mirroring fit is refused "
                   "(e.g. --grid given as ROWSxCOLS)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if os.path.exists(args.out) and not args.force:
        # the registration in use may be the only good one: a worse calibration must not replace it unasked
        print(f"armscope bridge register: {args.out}: already exists (use --force to replace it)", file=sys.stderr)
        return 2
    if args.points and (args.grid is not None or args.margin is not None):
        print("armscope bridge register: --grid and --margin describe a --camera-image; they do not apply to --points",
              file=sys.stderr)
        return 2
    try:
        if args.points:
            cam, disp = load_point_pairs(args.points)
            reg = from_point_pairs(cam, disp, args.display_size, ransac=args.ransac,
                                   ransac_threshold=args.ransac_threshold)
        else:
            if args.grid is None:
                print("armscope bridge register: --camera-image needs --grid COLSxROWS", file=sys.stderr)
                return 2
            if not os.path.isfile(args.camera_image):
                print(f"armscope bridge register: {args.camera_image}: no such image file", file=sys.stderr)
                return 2
            image = cv2.imread(args.camera_image, cv2.IMREAD_GRAYSCALE)
            if image is None:
                print(f"armscope bridge register: cannot read image {args.camera_image}", file=sys.stderr)
                return 2
            reg = from_camera_image(image, args.grid, args.display_size,
                                    margin=0.1 if args.margin is None else args.margin, ransac=args.ransac)
        centre = np.array([[[reg.display_size[0] / 2, reg.display_size[1] / 2]]])
        if mirrors(reg.matrix, cv2.perspectiveTransform(centre, np.linalg.inv(reg.matrix))[0, 0]) != args.mirrored:
            raise RegistrationError(
                "the fit mirrors the camera image on the display (left-right or up-down); if the optics do, pass "
                "--mirrored, else check the points or that --grid is COLSxROWS as the display shows it"
                if not args.mirrored else "--mirrored was given but the fit does not mirror the camera image")
        save_registration(reg, args.out)
    except (RegistrationError, OSError) as exc:
        print(f"armscope bridge register: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: rms error {reg.rms_error:.3f} px, max {reg.max_error:.3f} px, "
        f"{reg.n_inliers}/{reg.n_points} points"
    )
    return 0


def _with_query(uri: str, key: str, value: float) -> str:
    """Add ``key=value`` to a display URI; an URI that already sets it differently is an error."""
    import urllib.parse

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


def run_main(argv: list[str] | None = None) -> int:
    """Subscribe to the edge daemon and show its overlays on the eyepiece display.

    Blanks the display on start-up, on exit (SIGTERM/SIGINT too) and whenever
    an overlay is stale, the daemon is silent or not running, a message is
    invalid or the display link fails (docs/bridge.md).  Prints the final
    counters as JSON on stderr.
    """
    import json
    import logging

    from armscope.core.errors import ArmscopeError

    from .bridge import CLOCK_MODES, Bridge
    from .displays import DisplayURIError, open_display
    from .link import LinkError
    from .registration import load_registration

    p = argparse.ArgumentParser(
        prog="armscope bridge",
        description=run_main.__doc__,
        epilog="Other bridge commands: 'armscope bridge simulate --help', 'armscope bridge register --help', "
               "'armscope bridge blank --help', 'armscope bridge bench --help'.",
    )
    p.add_argument("--connect", required=True, type=_connect_endpoint, help="the daemon's publish endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--display", required=True, help="png://DIR, serial:///dev/ttyX?baud=N, fb:///dev/fbN, window://[TITLE] (see displays.py)")
    p.add_argument("--registration", help="camera -> display registration JSON ('armscope bridge register'); "
                   "without it the display is assumed to show the whole camera frame, scaled to fit")
    p.add_argument("--brightness", type=_BRIGHTNESS, help="0..1, applied before pixel packing (default: the URI's, else 1)")
    p.add_argument("--gamma", type=_GAMMA, help=f"{GAMMA_RANGE[0]:g}..{GAMMA_RANGE[1]:g} (default: the URI's, else 1)")
    p.add_argument("--curve-server-key", help="the daemon's public CurveZMQ key file (server.key)")
    p.add_argument("--curve-keys", help="this client's secret CurveZMQ key file (client.key_secret)")
    p.add_argument("--clock", choices=CLOCK_MODES, default="auto",
                   help="staleness also from publish time: mono (same host), wall (synchronised clocks), "
                   "receipt (bridge clock only), auto (mono for loopback/ipc endpoints, else receipt)")
    p.add_argument("--max-stale-ms", type=_number(0.0, 3_600_000.0, above=True), default=5000.0,
                   help="cap on the daemon's stale_after_ms")
    p.add_argument("--poll-ms", type=_number(0.0, 1000.0, above=True), default=50.0, help="watchdog poll interval, ms (<= 1000)")
    p.add_argument("--stats-interval", type=_SECONDS, default=10.0, help="log counters every N s (0 = never)")
    p.add_argument("--no-label", dest="label", action="store_false",
                   help="show the heat overlay only, without the decision (and subtype) written beside it")
    p.add_argument("--stamp", action="store_true",
                   help="measurement mode: draw each overlay's frame id as a binary stamp in the display's bottom-left "
                   "corner, for a camera watching the display (glass-to-glass latency, docs/latency.md)")
    p.add_argument("--duration", type=_SECONDS, default=0.0, help="stop after N s (0 = until SIGINT/SIGTERM)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO (blanks, state changes, counters)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("armscope.firmware_bridge").setLevel(logging.INFO)
    if (args.curve_server_key is None) != (args.curve_keys is None):
        print("armscope bridge: give both --curve-server-key and --curve-keys, or neither", file=sys.stderr)
        return 2
    curve = None
    if args.curve_server_key:
        curve = {"server_public": args.curve_server_key, "client_secret": args.curve_keys}
    display = None
    try:
        registration = load_registration(args.registration) if args.registration else None
        uri = args.display
        for key in ("brightness", "gamma"):
            if getattr(args, key) is not None:
                uri = _with_query(uri, key, getattr(args, key))
        display = open_display(uri)
        check_fits_display(registration, args.registration, display.size, args.display)
        bridge = Bridge(display, connect=args.connect, registration=registration, curve=curve,
                        poll_interval=args.poll_ms / 1000.0, max_stale_ms=args.max_stale_ms, clock_mode=args.clock,
                        stats_interval=args.stats_interval, label=args.label, stamp=args.stamp)
        if registration is None:
            logging.getLogger("armscope.firmware_bridge").warning(
                "no --registration: assuming the display shows the whole camera frame (uncalibrated)")
        bridge.start()
    except (RegistrationError, DisplayURIError, ValueError, OSError, LinkError, ArmscopeError) as exc:
        print(f"armscope bridge: {exc}", file=sys.stderr)
        if display is not None:
            try:
                display.blank()
            except Exception:
                pass
            display.close()
        return 2
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: bridge.stop())
    code = 0
    try:
        bridge.run(duration=args.duration if args.duration > 0 else None)
    except Exception as exc:  # run() has blanked and closed on the way out
        print(f"armscope bridge: unexpected error: {exc!r}", file=sys.stderr)
        code = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("bridge stopped: " + json.dumps(bridge.stats(), default=str), file=sys.stderr)
    return code


def blank_main(argv: list[str] | None = None) -> int:
    """Blank the eyepiece display once and exit: for a supervisor to run after
    the bridge stops for any reason (systemd ExecStopPost, see
    deploy/armscope-bridge.service), since a killed bridge cannot blank on its
    own way out and a framebuffer keeps its last picture. Exit 0 when the
    display is blank, 2 when it could not be opened or blanked."""
    from armscope.core.errors import ArmscopeError

    from .displays import DisplayURIError, open_display
    from .link import LinkError

    p = argparse.ArgumentParser(prog="armscope bridge blank", description=blank_main.__doc__)
    p.add_argument("--display", required=True, help="the bridge's display URI (png://, serial://, fb://, window://)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        with open_display(args.display) as display:
            display.blank()
    except (DisplayURIError, ValueError, OSError, LinkError, ArmscopeError) as exc:
        print(f"armscope bridge blank: {exc}", file=sys.stderr)
        return 2
    print(f"armscope bridge blank: {args.display} blanked", file=sys.stderr)
    return 0


def _write_json(path: str, doc: dict) -> None:
    """``armscope bridge bench --json``: the results, parents created (the path was checked before the run)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def _cpu() -> str:
    """``'<model name>, N CPUs'``: the CPUs this process may use, on the machine a bench figure belongs to."""
    return f"{cpu_name()}, {usable_cpus()} CPUs"


def bench_main(argv: list[str] | None = None) -> int:
    """Time the bridge's work per overlay on this machine (warp, pixel
    conversion, link framing) for a display size and pixel format, with the
    daemon's heat overlay of a real Grad-CAM (bundled; no model needed): what
    an integrator compares boards and displays with. Prints medians and the
    95th percentile per stage, the bytes a frame puts on the link and how long
    that takes at --baud. With --display URI the overlays are shown on that
    output instead and the delivery is timed too (serial://: to the
    controller and back, with its ACKs and resends)."""
    from .bench import STAGES, deliver, run
    from .displays import DisplayURIError, open_display
    from .link import CRC_PATH, LinkError
    from .registration import load_registration, opencv_build, slow_warp_warning

    p = argparse.ArgumentParser(prog="armscope bridge bench", description=bench_main.__doc__)
    p.add_argument("--size", type=_size, default=(1280, 720), help="display size WxH (default 1280x720)")
    p.add_argument("--format", type=_fmt, default=PixelFormat.RGB565_LE, help="display pixel format (default rgb565le)")
    p.add_argument("--overlay", choices=("daemon", "fullscreen", "both"), default="both",
                   help="daemon: its crop registered into the display; fullscreen: a display-sized overlay (worst case)")
    p.add_argument("--registration", help="camera -> display registration JSON (default: the uncalibrated whole-frame fit)")
    p.add_argument("--camera", type=_size, default=(1600, 1200), help="camera frame WxH (default 1600x1200)")
    p.add_argument("--crop", type=int, default=1024, help="the model's centre crop, camera px (default 1024)")
    p.add_argument("--display", help="show the overlays on this output and time the delivery "
                   "(e.g. serial:///dev/ttyACM0?baud=921600); its size and format replace --size/--format")
    p.add_argument("--frames", type=_number(1, integer=True), help="overlays timed per case (default 200; 20 with --display)")
    p.add_argument("--warmup", type=_number(0, integer=True), default=10, help="overlays run first, not timed (default 10)")
    p.add_argument("--dither", action="store_true", help="ordered dithering (MONO1)")
    p.add_argument("--brightness", type=_BRIGHTNESS, default=1.0)
    p.add_argument("--gamma", type=_GAMMA, default=1.0)
    p.add_argument("--max-payload", type=_MAX_PAYLOAD, default=4096, help="link FRAME body bytes (default 4096)")
    p.add_argument("--baud", type=_number(1, integer=True), default=921600, help="UART rate for the time-on-the-wire column")
    p.add_argument("--json", help="also write the results here")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.json and (problem := output_file_problem(args.json)):
        print(f"armscope bridge bench: --json {args.json}: {problem}", file=sys.stderr)  # before the run, not after
        return 2
    if args.frames is None:
        args.frames = 20 if args.display else 200
    if args.display:
        return _bench_display(args, deliver, open_display, (DisplayURIError, LinkError))
    (w, h), fmt = args.size, args.format
    try:
        registration = load_registration(args.registration) if args.registration else None
        check_fits_display(registration, args.registration, (w, h), "--size")
        kinds = ("daemon", "fullscreen") if args.overlay == "both" else (args.overlay,)
        results = []
        with PtyController(ControllerCore(w, h, fmt, max_payload=args.max_payload)) as sim:
            uri = (f"serial://{sim.slave_path}?baud=921600&deadline=5&max_payload={args.max_payload}"
                   f"&dither={int(args.dither)}&brightness={args.brightness}&gamma={args.gamma}")
            with open_display(uri) as display:
                display.blank()  # nothing lit: each overlay is sent as the bridge sends a first one
                for kind in kinds:
                    results.append(run(display, kind, frames=args.frames, warmup=args.warmup,
                                       registration=registration, camera=args.camera, crop=args.crop,
                                       max_payload=args.max_payload))
    except (RegistrationError, ValueError, OSError) as exc:
        print(f"armscope bridge bench: {exc}", file=sys.stderr)
        return 2
    cpu = _cpu()
    print(f"armscope bridge bench: {w}x{h} {fmt.slug}, {args.frames} overlays per case, on {cpu}"
          f" ({opencv_build()}; frame CRCs: {CRC_PATH})")
    if (warning := slow_warp_warning()) is not None:
        print(f"warning: {warning}")
    print(f"{'overlay':<11}{'region sent':<22}" + "".join(f"{s:>9}" for s in STAGES)
          + f"{'total':>9}{'p95':>9}{'wire KB':>10}{'effic.':>8}{'at ' + str(args.baud):>13}")
    for r in results:
        x, y, rw, rh = r.region
        med = [r.stages_ms[s]["median"] for s in STAGES + ("total",)]
        print(f"{r.overlay:<11}{f'{rw}x{rh} at {x},{y}':<22}" + "".join(f"{m:>9.2f}" for m in med)
              + f"{r.stages_ms['total']['p95']:>9.2f}{r.wire_bytes / 1024:>10.0f}{r.link_efficiency:>8.3f}"
              + f"{r.wire_seconds(args.baud):>12.2f}s")
    print("(ms, medians; p95 of the total)")
    if args.json:
        _write_json(args.json, {"cpu": cpu, "opencv": opencv_build(), "crc": CRC_PATH,
                                "results": [r.as_dict(args.baud) for r in results]})
    return 0


def _bench_display(args, deliver, open_display, display_errors) -> int:
    """``armscope bridge bench --display URI``: show the overlays on a real output."""
    from .registration import load_registration

    kinds = ("daemon", "fullscreen") if args.overlay == "both" else (args.overlay,)
    results = []
    try:
        registration = load_registration(args.registration) if args.registration else None
        with open_display(args.display) as display:
            check_fits_display(registration, args.registration, display.size, args.display)
            display.blank()
            try:
                for kind in kinds:
                    results.append(deliver(display, kind, frames=args.frames, warmup=args.warmup,
                                           registration=registration, camera=args.camera, crop=args.crop))
            finally:
                display.blank()
    except (RegistrationError, ValueError, OSError, *display_errors) as exc:
        print(f"armscope bridge bench: {exc}", file=sys.stderr)
        return 2
    d = results[0].display
    print(f"armscope bridge bench: {args.display} ({d['width']}x{d['height']} {d['format']}), "
          f"{args.frames} overlays per case, on {_cpu()}")
    print(f"{'overlay':<11}{'region sent':<22}{'render':>9}{'show':>9}{'total':>9}{'p95':>9}"
          f"{'wire KB':>10}{'resent':>8}{'MB/s':>8}")
    for r in results:
        x, y, rw, rh = r.region
        med = [r.stages_ms[s]["median"] for s in ("render", "show", "total")]
        link = (f"{r.wire_bytes / r.frames / 1024:>10.0f}{r.resent_chunks:>8}{r.payload_mb_per_s:>8.2f}"
                if r.payload_bytes else f"{'-':>10}{'-':>8}{'-':>8}")
        print(f"{r.overlay:<11}{f'{rw}x{rh} at {x},{y}':<22}" + "".join(f"{m:>9.2f}" for m in med)
              + f"{r.stages_ms['total']['p95']:>9.2f}" + link)
    print("(ms, medians; p95 of the total; wire KB per overlay incl. resends; MB/s of pixel bytes delivered)")
    if args.json:
        _write_json(args.json, {"cpu": _cpu(), "display": args.display, "results": [r.as_dict() for r in results]})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``armscope bridge [run|simulate|register|blank|bench] ...``: the first word picks the command (default run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_main, "simulate": simulate_main, "register": register_main, "blank": blank_main,
                "bench": bench_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return run_main(argv)
