"""``armscope bridge [run|simulate|register|blank|bench]``: the eyepiece side's commands,
a branch of the one ``armscope`` argument tree (``bridge`` alone, or followed by options,
means ``bridge run``). ``run`` is the eyepiece runtime: subscribe to the daemon, drive
the display, blank on every unsafe condition. The others are bench tasks: a fake display
controller on a pseudo-terminal, the camera -> display registration, blanking a display
after the bridge stopped, and timing the bridge's work per overlay.

This module parses and prints; what the commands do, and the checks on the values that
decide whether the eyepiece shows something safe, are in armscope.firmware_bridge
(tasks.py, registration.py, bench.py). Exit codes: 0 ok, 1 unexpected error, 2 bad
arguments or input. ``main`` and the ``*_main`` functions take the words after
``armscope bridge`` (for tests and scripts).
"""
from __future__ import annotations

import argparse
import json
import sys

from armscope.core import protocol
from armscope.core.argtypes import number
from armscope.core.errors import ArmscopeError, output_file_problem

COMMANDS = ("run", "simulate", "register", "blank", "bench")
SECONDS = number(0.0)  # a duration or interval; 0 = the option's 'never'/'until stopped'
BRIGHTNESS = number(0.0, 1.0)


def size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 1280x720, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def connect_endpoint(text: str) -> str:
    from armscope.core.protocol import endpoint_problem

    if (problem := endpoint_problem(text, bind=False)) is not None:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"probability must be within [0, 1], got {text!r}")
    return v


def pixel_format(text: str):
    from armscope.firmware_bridge.pixel_formats import PixelFormat

    try:
        return PixelFormat.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def with_default_command(argv: list[str]) -> list[str]:
    """``armscope [-v] bridge --connect ...`` -> ``... bridge run --connect ...``: run is the
    default bridge command (the deployed service unit calls it so)."""
    words = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if not words or argv[words[0]] != "bridge":
        return argv
    at = words[0] + 1
    if at < len(argv) and (argv[at] in COMMANDS or argv[at] in ("-h", "--help")):
        return argv
    return [*argv[:at], "run", *argv[at:]]


# --------------------------------------------------------------------------- handlers

def _cmd_run(args) -> int:
    import logging

    from armscope.firmware_bridge.tasks import open_bridge, run_bridge, user_errors

    if args.bridge_verbose:
        logging.getLogger("armscope.firmware_bridge").setLevel(logging.INFO)
    if (args.curve_server_key is None) != (args.curve_keys is None):
        raise ArmscopeError("give both --curve-server-key and --curve-keys, or neither")
    curve = {"server_public": args.curve_server_key, "client_secret": args.curve_keys} if args.curve_keys else None
    try:
        bridge = open_bridge(args.connect, args.display, registration_path=args.registration,
                             brightness=args.brightness, gamma=args.gamma, curve=curve,
                             poll_interval=args.poll_ms / 1000.0, max_stale_ms=args.max_stale_ms,
                             clock_mode=args.clock, stats_interval=args.stats_interval, label=args.label,
                             stamp=args.stamp)
    except user_errors() as exc:
        raise ArmscopeError(str(exc)) from None
    code = 0
    try:
        run_bridge(bridge, args.duration)
    except Exception as exc:  # run() has blanked and closed on the way out
        print(f"armscope bridge: unexpected error: {exc!r}", file=sys.stderr)
        code = 1
    print("bridge stopped: " + json.dumps(bridge.stats(), default=str), file=sys.stderr)
    return code


def _require_serial_extra(what: str, hint: str = "") -> None:
    """One line, before any work, where the link's codec (numba, the [serial] extra) is absent."""
    from armscope.firmware_bridge.displays.serial import serial_extra_missing

    if serial_extra_missing() is not None:
        raise ArmscopeError(f"{what}, which needs the [serial] extra (numba, for the link's framing): "
                            f"pip install 'armscope[serial]'{hint}")


def _cmd_simulate(args) -> int:
    _require_serial_extra("the simulated display controller speaks the serial link")
    from armscope.firmware_bridge.simulator import ControllerCore, FaultPlan
    from armscope.firmware_bridge.tasks import serve_simulator

    try:
        faults = FaultPlan(drop_prob=args.drop, corrupt_prob=args.corrupt, reset_prob=args.reset_prob,
                           drop_reply_prob=args.drop_replies, seed=args.seed)
        core = ControllerCore(args.width, args.height, args.format, max_payload=args.max_payload,
                              png_dir=args.png_dir, faults=faults)
    except ValueError as exc:
        raise ArmscopeError(str(exc)) from None
    print(serve_simulator(core, args.duration, announce=lambda path: print(path, flush=True)), file=sys.stderr)
    return 0


def _cmd_register(args) -> int:
    from armscope.firmware_bridge.registration import RegistrationError
    from armscope.firmware_bridge.tasks import fit_registration

    try:
        reg = fit_registration(args.out, args.display_size, points=args.points, camera_image=args.camera_image,
                               grid=args.grid, margin=args.margin, ransac=args.ransac,
                               ransac_threshold=args.ransac_threshold, mirrored=args.mirrored, force=args.force)
    except RegistrationError as exc:
        raise ArmscopeError(str(exc)) from None
    print(f"wrote {args.out}: rms error {reg.rms_error:.3f} px, max {reg.max_error:.3f} px, "
          f"{reg.n_inliers}/{reg.n_points} points")
    return 0


def _cmd_blank(args) -> int:
    from armscope.firmware_bridge.tasks import blank_display, user_errors

    try:
        blank_display(args.display)
    except user_errors() as exc:
        raise ArmscopeError(str(exc)) from None
    print(f"armscope bridge blank: {args.display} blanked", file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    from armscope.cli.bridge_bench import bench_display, bench_offline

    if args.json and (problem := output_file_problem(args.json)):
        raise ArmscopeError(f"--json {args.json}: {problem}")  # before the run, not after
    if not args.display:
        # the offline bench is the link's cost on a simulated controller (wire KB, efficiency, time at
        # the baud rate): without the link nothing it reports remains; --display png://... still runs
        _require_serial_extra("without --display, bridge bench times the serial link to a simulated controller",
                              "; without it, --display png://DIR?width=W&height=H times the render")
    if args.frames is None:
        args.frames = 20 if args.display else 200
    return bench_display(args) if args.display else bench_offline(args)


# --------------------------------------------------------------------------- parsers

def add_parsers(sub) -> None:
    from armscope.firmware_bridge.bridge import CLOCK_MODES
    from armscope.firmware_bridge.link import MAX_PAYLOAD_RANGE
    from armscope.firmware_bridge.pixel_formats import GAMMA_RANGE, PixelFormat

    max_payload = number(*MAX_PAYLOAD_RANGE, integer=True)
    gamma = number(*GAMMA_RANGE)
    group = sub.add_parser("bridge", help="eyepiece side: 'bridge [run] --connect EP --display URI' (daemon -> "
                           "display), 'bridge simulate' (display controller on a pty), 'bridge register' "
                           "(camera->display homography); 'bridge --help' for details",
                           description="The eyepiece side. 'armscope bridge --connect ... --display ...' is "
                                       "'armscope bridge run ...'.")
    bridge = group.add_subparsers(dest="bridge_command", metavar="COMMAND", required=True)

    def command(name: str, handler, description: str, help: str, prog: str | None = None):
        p = bridge.add_parser(name, help=help, description=description, **({"prog": prog} if prog else {}))
        p.set_defaults(func=handler, error_prefix=f"{prog or 'armscope bridge ' + name}: ")
        return p

    p = command("run", _cmd_run, prog="armscope bridge", help="subscribe to the daemon and drive the display",
                description="Subscribe to the edge daemon and show its overlays on the eyepiece display. Blanks the "
                "display on start-up, on exit (SIGTERM/SIGINT too) and whenever an overlay is stale, the daemon is "
                "silent or not running, a message is invalid or the display link fails (docs/bridge.md). Prints "
                "the final counters as JSON on stderr.")
    p.epilog = ("Other bridge commands: 'armscope bridge simulate --help', 'armscope bridge register --help', "
                "'armscope bridge blank --help', 'armscope bridge bench --help'.")
    p.add_argument("--connect", required=True, type=connect_endpoint,
                   help="the daemon's publish endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--display", required=True, help="png://DIR, serial:///dev/ttyX?baud=N, fb:///dev/fbN, "
                   "window://[TITLE] (see armscope/firmware_bridge/displays/)")
    p.add_argument("--registration", help="camera -> display registration JSON ('armscope bridge register'); "
                   "without it the display is assumed to show the whole camera frame, scaled to fit")
    p.add_argument("--brightness", type=BRIGHTNESS, help="0..1, applied before pixel packing (default: the URI's, else 1)")
    p.add_argument("--gamma", type=gamma, help=f"{GAMMA_RANGE[0]:g}..{GAMMA_RANGE[1]:g} (default: the URI's, else 1)")
    p.add_argument("--curve-server-key", help="the daemon's public CurveZMQ key file (server.key)")
    p.add_argument("--curve-keys", help="this client's secret CurveZMQ key file (client.key_secret)")
    p.add_argument("--clock", choices=CLOCK_MODES, default="auto",
                   help="staleness also from the capture time: mono (same host), offset (another host: the clock "
                   "offset estimated from the heartbeats), wall (synchronised clocks), receipt (bridge clock only), "
                   "auto (mono for loopback/ipc endpoints, else offset); docs/protocol.md 1.5")
    p.add_argument("--max-stale-ms", type=number(0.0, 3_600_000.0, above=True), default=protocol.BRIDGE_MAX_STALE_MS,
                   help="cap on the daemon's stale_after_ms (default %(default)g)")
    p.add_argument("--poll-ms", type=number(0.0, 1000.0, above=True), default=50.0,
                   help="watchdog poll interval, ms (<= 1000)")
    p.add_argument("--stats-interval", type=SECONDS, default=10.0, help="log counters every N s (0 = never)")
    p.add_argument("--no-label", dest="label", action="store_false",
                   help="show the heat overlay only, without the decision (and subtype) written beside it")
    p.add_argument("--stamp", action="store_true",
                   help="measurement mode: draw each overlay's frame id as a binary stamp in the display's bottom-left "
                   "corner, for a camera watching the display (glass-to-glass latency, docs/latency.md)")
    p.add_argument("--duration", type=SECONDS, default=0.0, help="stop after N s (0 = until SIGINT/SIGTERM)")
    p.add_argument("-v", "--verbose", dest="bridge_verbose", action="store_true",
                   help="log at INFO (blanks, state changes, counters)")

    p = command("simulate", _cmd_simulate, help="a simulated display controller on a pty",
                description="Run a simulated display controller on a pty until SIGINT/SIGTERM or --duration. "
                "Prints the pty path as the first stdout line (for scripts), then a summary on stderr when it stops.")
    p.add_argument("--pty", action="store_true", required=True, help="serve on a new pseudo-terminal (the only transport)")
    p.add_argument("--width", type=number(1, 0xFFFF, integer=True), required=True)
    p.add_argument("--height", type=number(1, 0xFFFF, integer=True), required=True)
    p.add_argument("--format", type=pixel_format, default=PixelFormat.RGB565_LE,
                   help="rgb888, rgb565le, rgb565be, gray8, mono1")
    p.add_argument("--png-dir", help="write every shown frame/blank as a numbered PNG here")
    p.add_argument("--max-payload", type=max_payload, default=4096,
                   help=f"largest FRAME body the controller accepts ({MAX_PAYLOAD_RANGE[0]}..{MAX_PAYLOAD_RANGE[1]})")
    p.add_argument("--drop", type=probability, default=0.0, help="probability of dropping each received byte")
    p.add_argument("--corrupt", type=probability, default=0.0, help="probability of corrupting each received byte")
    p.add_argument("--reset-prob", type=probability, default=0.0,
                   help="probability of a controller reset per FRAME message")
    p.add_argument("--drop-replies", type=probability, default=0.0, help="probability of losing each reply")
    p.add_argument("--seed", type=number(0, 2**32 - 1, integer=True), default=None, help="fault random seed")
    p.add_argument("--duration", type=SECONDS, default=0.0,
                   help="stop after this many seconds (0 = until interrupted)")

    p = command("register", _cmd_register, help="the camera -> display registration (homography)",
                description="Compute the camera -> display registration and write it as JSON.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--points", help="JSON or CSV file of camera/display point pairs")
    src.add_argument("--camera-image", help="camera image of the dot grid shown on the display")
    p.add_argument("--grid", type=size, help="dot grid as COLSxROWS (with --camera-image)")
    p.add_argument("--margin", type=number(0.0, 0.45), help="grid margin as a fraction of the display size "
                   "(0..0.45, default 0.1; with --camera-image)")
    p.add_argument("--display-size", type=size, required=True, help="display size as WxH")
    p.add_argument("--ransac", action="store_true", help="reject outlier pairs with RANSAC")
    p.add_argument("--ransac-threshold", type=number(0.0, 1000.0, above=True), default=3.0,
                   help="RANSAC inlier distance, display px")
    p.add_argument("--out", required=True, help="registration JSON to write")
    p.add_argument("--force", action="store_true", help="replace an existing registration file")
    p.add_argument("--mirrored", action="store_true",
                   help="the optics mirror the display relative to the camera; without it a mirroring fit is refused "
                   "(e.g. --grid given as ROWSxCOLS)")

    p = command("blank", _cmd_blank, help="blank the display once (after the bridge stopped)",
                description="Blank the eyepiece display once and exit: for a supervisor to run after the bridge "
                "stops for any reason (systemd ExecStopPost, see deploy/armscope-bridge.service), since a killed "
                "bridge cannot blank on its own way out and a framebuffer keeps its last picture. Exit 0 when the "
                "display is blank, 2 when it could not be opened or blanked.")
    p.add_argument("--display", required=True, help="the bridge's display URI (png://, serial://, fb://, window://)")

    p = command("bench", _cmd_bench, help="time the bridge's work per overlay on this machine",
                description="Time the bridge's work per overlay on this machine (decoding the message, rendering "
                "it in display pixels, pixel conversion, link framing) for a display size and pixel format, with a "
                "real Grad-CAM (bundled; no model needed): what an integrator compares boards and displays with. "
                "Each overlay is timed in both protocol forms: v2 (the 'overlay' topic, the CAM as data, what the "
                "bridge runs) and v1 (the opt-in 'rendered' topic's bitmap, warped). Prints medians "
                "and the 95th percentile per stage, the bytes a frame puts on the link and how long that takes at "
                "--baud. With --display URI the overlays are shown on that output instead and the delivery is "
                "timed too (serial://: to the controller and back, with its ACKs and resends).")
    p.add_argument("--size", type=size, default=(1280, 720), help="display size WxH (default 1280x720)")
    p.add_argument("--format", type=pixel_format, default=PixelFormat.RGB565_LE,
                   help="display pixel format (default rgb565le)")
    p.add_argument("--overlay", choices=("daemon", "fullscreen", "both"), default="both",
                   help="daemon: its crop registered into the display; fullscreen: a display-sized overlay (worst case)")
    p.add_argument("--registration",
                   help="camera -> display registration JSON (default: the uncalibrated whole-frame fit)")
    p.add_argument("--camera", type=size, default=(1600, 1200), help="camera frame WxH (default 1600x1200)")
    p.add_argument("--crop", type=int, default=1024, help="the model's centre crop, camera px (default 1024)")
    p.add_argument("--display", help="show the overlays on this output and time the delivery "
                   "(e.g. serial:///dev/ttyACM0?baud=921600); its size and format replace --size/--format")
    p.add_argument("--frames", type=number(1, integer=True),
                   help="overlays timed per case (default 200; 20 with --display)")
    p.add_argument("--warmup", type=number(0, integer=True), default=10,
                   help="overlays run first, not timed (default 10)")
    p.add_argument("--dither", action="store_true", help="ordered dithering (MONO1)")
    p.add_argument("--brightness", type=BRIGHTNESS, default=1.0)
    p.add_argument("--gamma", type=gamma, default=1.0)
    p.add_argument("--max-payload", type=max_payload, default=4096, help="link FRAME body bytes (default 4096)")
    p.add_argument("--baud", type=number(1, integer=True), default=921600,
                   help="UART rate for the time-on-the-wire column")
    p.add_argument("--json", help="also write the results here")


# --------------------------------------------------------------------------- for tests and scripts

def main(argv: list[str] | None = None) -> int:
    """``armscope bridge ARGS...``: the words after ``bridge`` (default command: run)."""
    from armscope.cli import main as armscope_main

    return armscope_main(["bridge", *(sys.argv[1:] if argv is None else argv)])


def run_main(argv: list[str] | None = None) -> int:
    return main(["run", *(argv or [])])


def simulate_main(argv: list[str] | None = None) -> int:
    return main(["simulate", *(argv or [])])


def register_main(argv: list[str] | None = None) -> int:
    return main(["register", *(argv or [])])


def blank_main(argv: list[str] | None = None) -> int:
    return main(["blank", *(argv or [])])


def bench_main(argv: list[str] | None = None) -> int:
    return main(["bench", *(argv or [])])

