"""The ``armscope`` command: one argparse tree, one module per command family
(export, bundles, calibrate, runtime, bridge). Handlers parse and print; the checks
on values live beside the code that uses them. Each subcommand imports its heavy
modules only when it runs, so ``armscope --help``, ``inspect`` and ``classify`` work
without TensorFlow, TensorRT or CUDA installed."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from armscope import __version__
from armscope.core.errors import ArmscopeError

from . import bridge, bundles, calibrate, export, runtime

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="armscope",
        description="Edge deployment toolkit for AR microscopes: Keras ensembles -> ONNX/TensorRT bundles with "
                    "in-graph Grad-CAM, the edge daemon, and the eyepiece bridge. Start with 'armscope demo'.")
    parser.add_argument("--version", action="version", version=f"armscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    export.add_parsers(sub)
    bundles.add_parsers(sub)
    bridge.add_parsers(sub)
    calibrate.add_parsers(sub)
    runtime.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = bridge.with_default_command(list(sys.argv[1:] if argv is None else argv))
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2): returned, as from the commands themselves
        return int(exc.code or 0)
    from armscope.edge.logs import CurrentStderrHandler, opencv_logs

    # force: main() may run more than once in a process (an application, the tests); each run
    # replaces the handlers the last one made, and they write to the current sys.stderr
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[CurrentStderrHandler()], force=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    opencv_logs(loud=args.verbose or getattr(args, "log_level", None) == "debug")
    prefix = getattr(args, "error_prefix", f"armscope {args.command}: error: ")
    try:
        rc = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return rc
    except ArmscopeError as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` or a pager that quit: not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush is quiet
        # (the recipe in Python's signal module documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE
    except OSError as exc:
        # An output or input path the system refused (permission, a file where a directory is needed, a
        # directory where a file is): name it, as every other bad input is named, instead of a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prefix}{where}{exc.strerror or exc}", file=sys.stderr)
        return 2
