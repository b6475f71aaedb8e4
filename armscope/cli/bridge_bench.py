"""``armscope bridge bench``'s two runs and their tables: the bridge's work per overlay on a
simulated controller (``bench_offline``), or delivered to a real output (``bench_display``).
The timing itself is armscope.firmware_bridge.bench; this module prints what it measured."""
from __future__ import annotations

import json
import os

from armscope.core.cpus import cpu_name, usable_cpus
from armscope.core.errors import ArmscopeError


def _write_json(path: str, doc: dict) -> None:
    """``--json``: the results, parents created (the path was checked before the run)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)


def _cpu() -> str:
    """``'<model name>, N CPUs'``: the CPUs this process may use, on the machine a bench figure belongs to."""
    return f"{cpu_name()}, {usable_cpus()} CPUs"


def bench_offline(args) -> int:
    """The overlays through a pty-simulated controller of --size/--format."""
    from armscope.firmware_bridge.bench import STAGES, run
    from armscope.firmware_bridge.displays import open_display
    from armscope.firmware_bridge.link import CRC_PATH
    from armscope.firmware_bridge.registration import (RegistrationError, check_fits_display, load_registration,
                                                       opencv_build, slow_warp_warning)
    from armscope.firmware_bridge.simulator import ControllerCore, PtyController

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
                    results += run(display, kind, frames=args.frames, warmup=args.warmup,
                                   registration=registration, camera=args.camera, crop=args.crop,
                                   max_payload=args.max_payload)
    except (RegistrationError, ValueError, OSError) as exc:
        raise ArmscopeError(str(exc)) from None
    cpu = _cpu()
    print(f"armscope bridge bench: {w}x{h} {fmt.slug}, {args.frames} overlays per case, on {cpu}"
          f" ({opencv_build()}; frame CRCs: {CRC_PATH})")
    if (warning := slow_warp_warning()) is not None:
        print(f"warning: {warning}")
    print(f"{'overlay':<11}{'protocol':<13}{'message KB':>11}  {'region sent':<22}" + "".join(f"{s:>9}" for s in STAGES)
          + f"{'total':>9}{'p95':>9}{'wire KB':>10}{'effic.':>8}{'at ' + str(args.baud):>13}")
    for r in results:
        x, y, rw, rh = r.region
        med = [r.stages_ms[s]["median"] for s in STAGES + ("total",)]
        form = "v2 overlay" if r.protocol == "v2" else "v1 rendered"
        print(f"{r.overlay:<11}{form:<13}{r.message_bytes / 1024:>11.1f}  {f'{rw}x{rh} at {x},{y}':<22}"
              + "".join(f"{m:>9.2f}" for m in med)
              + f"{r.stages_ms['total']['p95']:>9.2f}{r.wire_bytes / 1024:>10.0f}{r.link_efficiency:>8.3f}"
              + f"{r.wire_seconds(args.baud):>12.2f}s")
    print("(ms, medians; p95 of the total; message KB: header + payload on the ZeroMQ socket; v2 overlay is what "
          "the bridge runs, v1 rendered the bitmap it warped before protocol v2)")
    if args.json:
        _write_json(args.json, {"cpu": cpu, "opencv": opencv_build(), "crc": CRC_PATH,
                                "results": [r.as_dict(args.baud) for r in results]})
    return 0




def bench_display(args) -> int:
    """``--display URI``: show the overlays on a real output and time the delivery."""
    from armscope.firmware_bridge.bench import deliver
    from armscope.firmware_bridge.displays import open_display
    from armscope.firmware_bridge.registration import RegistrationError, check_fits_display, load_registration
    from armscope.firmware_bridge.tasks import user_errors

    """``armscope bridge bench --display URI``: show the overlays on a real output."""
    kinds = ("daemon", "fullscreen") if args.overlay == "both" else (args.overlay,)
    results = []
    try:
        registration = load_registration(args.registration) if args.registration else None
        with open_display(args.display) as display:
            check_fits_display(registration, args.registration, display.size, args.display)
            display.blank()
            try:
                for kind in kinds:
                    results += deliver(display, kind, frames=args.frames, warmup=args.warmup,
                                       registration=registration, camera=args.camera, crop=args.crop)
            finally:
                display.blank()
    except (RegistrationError, *user_errors()) as exc:
        raise ArmscopeError(str(exc)) from None
    d = results[0].display
    print(f"armscope bridge bench: {args.display} ({d['width']}x{d['height']} {d['format']}), "
          f"{args.frames} overlays per case, on {_cpu()}")
    print(f"{'overlay':<11}{'protocol':<13}{'region sent':<22}{'render':>9}{'show':>9}{'total':>9}{'p95':>9}"
          f"{'wire KB':>10}{'resent':>8}{'MB/s':>8}")
    for r in results:
        x, y, rw, rh = r.region
        med = [r.stages_ms[s]["median"] for s in ("render", "show", "total")]
        link = (f"{r.wire_bytes / r.frames / 1024:>10.0f}{r.resent_chunks:>8}{r.payload_mb_per_s:>8.2f}"
                if r.payload_bytes else f"{'-':>10}{'-':>8}{'-':>8}")
        form = "v2 overlay" if r.protocol == "v2" else "v1 rendered"
        print(f"{r.overlay:<11}{form:<13}{f'{rw}x{rh} at {x},{y}':<22}" + "".join(f"{m:>9.2f}" for m in med)
              + f"{r.stages_ms['total']['p95']:>9.2f}" + link)
    print("(ms, medians; render includes decoding the message; p95 of the total; wire KB per overlay incl. resends; "
          "MB/s of pixel bytes delivered)")
    if args.json:
        _write_json(args.json, {"cpu": _cpu(), "display": args.display, "results": [r.as_dict() for r in results]})
    return 0


