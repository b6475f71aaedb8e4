"""``armscope run``, ``bench``, ``demo`` and ``keys``: the edge daemon and what measures or secures it."""
from __future__ import annotations

from pathlib import Path

from armscope.cli.common import int_in
from armscope.core.errors import ArmscopeError, check_output_file

def _cmd_run(args) -> int:
    from armscope.edge.config import from_args
    from armscope.edge.daemon import run_daemon

    return run_daemon(from_args(args))


def _cmd_bench(args) -> int:
    from armscope.bench.daemon_latency import run_bench
    from armscope.edge.config import from_args

    if args.suite:
        return _cmd_bench_suite(args)
    if args.out or args.quick or args.benchmarks_md:
        raise ArmscopeError("--out, --quick and --benchmarks-md belong to --suite")
    check_output_file(args.json, "--json")  # before the daemon starts; run_bench writes them at the end
    check_output_file(args.plot, "--plot", suffix=".png")
    report = run_bench(from_args(args), frames=args.frames, json_out=args.json, plot=args.plot,
                       warmup=args.warmup)
    e2e = report["latency_ms"]["capture_to_publish"]
    print(f"{report['frames']} overlays in {report['wall_s']:.1f} s: {report['fps']:.2f} fps; capture->publish "
          f"p50 {e2e['p50']} ms, p95 {e2e['p95']} ms, p99 {e2e['p99']} ms; pure inference p50 "
          f"{report['latency_ms']['inference']['p50']} ms")
    for path in report["files"]:
        print(f"wrote {path}")
    return 0


def _cmd_bench_suite(args) -> int:
    """``armscope bench --suite``: every stage, the inference matrix with peers and limits,
    the pipeline, glass-to-glass, power; JSON + BENCHMARKS.md section + plots (armscope.bench)."""
    import shlex
    import sys

    from armscope.bench.suite import run_suite
    from armscope.export.merge import merge_members  # onnx only: sub-ensembles of 1 and 3 members get merged graphs too

    if not args.out:
        raise ArmscopeError("--suite needs --out DIR (the JSON, tables and plots go there)")
    result = run_suite(args.bundle or "samples/demo_bundle", Path(args.out), quick=args.quick, rounds=args.rounds,
                       extra_bundles=args.extra_bundle or [], keras_members=args.keras, merge=merge_members,
                       source=args.source, benchmarks_md=Path(args.benchmarks_md) if args.benchmarks_md else None,
                       command="armscope bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    c, g = result["comparison"], result["glass"]
    print(f"{result['machine']['cpu']}, {result['machine']['usable_cpus']} CPUs, load {result['machine']['load_average_start']}"
          f" -> {result['load_average_end']}")
    print(f"default ({c['ours']}): {c['ours_ms']:.1f} ms per frame; peers: "
          + ", ".join(f"{p['name']} {p['ratio']:.2f}x" for p in c["peers"]))
    print(f"pipeline {result['pipeline']['fps']} fps; glass-to-glass median {g['glass_to_glass_ms']['median']:.0f} ms, "
          f"p95 {g['glass_to_glass_ms']['p95']:.0f} ms ({g['frames']} overlays); stale window "
          f"{result['pacing']['stale_after_ms']} ms from {result['pacing']['frame_ms']:.0f} ms per frame")
    print(f"wrote {Path(args.out) / 'suite.json'}, {Path(args.out) / 'suite.md'}"
          + (f", {args.benchmarks_md}" if args.benchmarks_md else "")
          + "".join(f", {f}" for f in result["plots"]["files"]))
    return 0


def _cmd_demo(args) -> int:
    from armscope.demo import run_demo

    run_demo(args.bundle, args.source, args.overlays, Path(args.out), args.timeout, threads=args.threads)
    return 0


def _cmd_keys(args) -> int:
    from armscope.core.curve import write_keypairs

    for public, secret in write_keypairs(Path(args.out), args.names, force=args.force):
        print(f"wrote {public} (public) and {secret} (secret, mode 0600)")
    return 0


def add_parsers(sub) -> None:
    from armscope.edge.config import add_arguments

    p = sub.add_parser("run", help="the real-time edge daemon: camera -> ensemble -> Grad-CAM overlays on ZeroMQ")
    add_arguments(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("bench", help="end-to-end latency and fps of the daemon pipeline on a config's source")
    add_arguments(p)
    p.add_argument("--frames", type=int_in(1), default=50, help="overlays to measure (after warm-up)")
    p.add_argument("--warmup", type=int_in(0), default=3, help="overlays to discard first")
    p.add_argument("--json", dest="json", help="write the report here")
    p.add_argument("--plot", help="write a latency histogram PNG here")
    p.add_argument("--suite", action="store_true",
                   help="the whole benchmark suite: every stage, inference per backend x precision x layout x "
                   "ensemble size (1, 3, 5) with peers, the compute and memory-bandwidth limits, the pipeline, "
                   "glass-to-glass latency, power, clocks, temperatures and frames per joule where known (docs/latency.md)")
    p.add_argument("--out", help="--suite: directory for suite.json, suite.md and plots")
    p.add_argument("--quick", action="store_true", help="--suite: a reduced run (fewer paths and rounds; CI)")
    p.add_argument("--rounds", type=int_in(2), help="--suite: interleaved rounds per path (default 10, quick 3)")
    p.add_argument("--extra-bundle", action="append", help="--suite: also time this bundle (e.g. its INT8 or FP16 form)")
    p.add_argument("--keras", nargs="+", help="--suite: the Keras members, for the Keras predict peer (needs [tf])")
    p.add_argument("--benchmarks-md", help="--suite: regenerate the suite's section of this BENCHMARKS.md")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="daemon + eyepiece bridge on the bundled real H&E frames, on the CPU: "
                       "prints decisions and latency, writes what the eyepiece display shows")
    p.add_argument("--bundle", default="samples/demo_bundle",
                   help="model bundle (default: %(default)s, a DEMO ONLY model; a relative path not found here "
                        "is looked for in the armscope checkout)")
    p.add_argument("--source", default="dir://samples/frames/?fps=2&loop=1",
                   help="camera URI, as 'run --source' (default: %(default)s: the bundled real H&E frames; a "
                        "relative path not found here is looked for in the armscope checkout)")
    p.add_argument("--overlays", type=int, default=8, help="stop after this many overlays reached the eyepiece")
    p.add_argument("--out", default="out/demo", help="eyepiece PNGs go to OUT/eyepiece")
    p.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds")
    p.add_argument("--threads", type=int_in(0, 256), default=0, help="inference threads (0 = all cores)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("keys", help="make CurveZMQ keypairs for the daemon's sockets (server, client)")
    p.add_argument("--out", required=True, help="directory for NAME.key and NAME.key_secret")
    p.add_argument("--names", nargs="+", default=["server", "client"])
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=_cmd_keys)
