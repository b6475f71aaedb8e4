"""Daemon configuration: one table of options that drives the TOML file
(``armscope run --config edge.toml``), the command-line flags (every option is
also ``--option-name``) and validation. One table means a new option can never
be settable in one place and silently ignored in the other, and every error
names the key (and the file) that is wrong.

Precedence: defaults < config file < flags. Relative paths in the file are
resolved against the file's directory (so a config can travel with its
bundle); paths given as flags are relative to the working directory.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: JetPack 6's; tomli is the library that became tomllib
    import tomli as tomllib

from armscope.core.errors import ArmscopeError
from armscope.edge.backends import BACKENDS, CPU_PRECISIONS
from armscope.core.protocol import DEFAULT_CONTROL, DEFAULT_PUBLISH, endpoint_problem


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    path: bool = False          # resolve relative to the config file
    check: Callable[[Any], str | None] | None = None   # returns an error text or None


def _endpoint(value: str) -> str | None:
    return endpoint_problem(value, bind=True)  # the daemon binds both its sockets


def _unset_or_non_negative(value) -> str | None:
    return None if value == -1 or value >= 0 else "expected -1 (the bundle's) or a value >= 0"


def _host_port(value: str) -> str | None:
    if value == "":
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "expected HOST:PORT (e.g. 127.0.0.1:9108) or empty to disable"
    return None


OPTIONS: tuple[Option, ...] = (
    Option("bundle", str, "samples/demo_bundle", "model bundle directory", path=True),
    Option("source", str, "v4l2:///dev/video0",
           "camera URI: v4l2:///dev/videoN, csi://N, rtsp://..., file://video.mp4[?fps=max|N&loop=1], "
           "dir://frames/?fps=N[&loop=1][&settle_ms=500] (writers must rename files into place), image://still.png[?fps=N]"),
    Option("publish", str, DEFAULT_PUBLISH, "ZeroMQ PUB endpoint for overlays and status", check=_endpoint),
    Option("control", str, DEFAULT_CONTROL, "ZeroMQ REP endpoint for control commands", check=_endpoint),
    Option("backend", str, "auto", "inference backend (auto: TensorRT where the bundle has engines for this GPU, "
           "else onnxruntime, or openvino when installed: INT8 bundles on a VNNI/AMX CPU, FP32 bundles in BF16 on a "
           "BF16 CPU once 'armscope accuracy --backend openvino --cpu-precision bf16' recorded a passing gate)",
           choices=BACKENDS),
    Option("cpu_precision", str, "f32", "openvino backend only: inference precision (bf16 needs AVX512-BF16 or AMX; auto chooses its own)",
           choices=CPU_PRECISIONS),
    Option("layout", str, "auto", "ensemble layout: concurrent per-member sessions/streams, or one merged graph; auto = the layout measured faster for the backend (members for ONNX Runtime and TensorRT, merged for OpenVINO; BENCHMARKS.md sections 1 and 4)", choices=("auto", "merged", "members")),
    Option("threads", int, 0, "inference threads (0 = all cores)", minimum=0, maximum=256),
    Option("encoding", str, "raw", "payload encoding of the opt-in 'rendered' topic", choices=("raw", "png")),
    Option("rendered_topic", bool, False, "also publish each overlay as an RGBA bitmap on the 'rendered' topic, "
           "for subscribers that only paste a picture (docs/protocol.md 1.3)"),
    Option("cam_dtype", str, "float16", "how the 'overlay' topic carries the CAM", choices=("float16", "uint8")),
    Option("feed", str, "float32", "what the backend gets per frame: float32 (resized on the host CPU) or uint8 "
           "(the camera crop; the bundle's uint8 front resizes it in the graph: 'armscope front' adds one; "
           "TensorRT runs the engines 'armscope build --feed uint8' made)", choices=("float32", "uint8")),
    Option("overlay_size", int, 0, "overlay side in pixels (0 = the model's crop size)", minimum=0, maximum=8192),
    Option("max_alpha", float, 0.6, "overlay opacity at the hottest CAM value", minimum=0.0, maximum=1.0),
    Option("threshold", float, -1.0, "decision threshold on the positive class (-1 = the manifest's)",
           minimum=-1.0, maximum=1.0,
           check=lambda v: None if v == -1.0 or v >= 0.0 else "expected -1 (the manifest's) or 0..1"),
    Option("heartbeat_hz", float, 2.0, "status heartbeats per second", minimum=0.1, maximum=100.0),
    Option("stale_after_ms", int, 0, "the oldest an overlay may be, from its camera capture: older ones are "
           "not published, and subscribers blank an overlay this long after its capture; 0 = auto: 3 x the "
           "inference time measured at start-up + 500 ms, at least 1500 (edge/pacing.py)",
           minimum=0, maximum=600000, check=lambda v: None if v == 0 or v >= 50 else "expected 0 (auto) or >= 50"),
    # The tissue gate's thresholds: -1 = the bundle's (manifest tissue_gate, which is where a
    # modality's values belong), else the gate's H&E defaults (armscope.core.tissue.TissueGate).
    Option("min_tissue_fraction", float, -1.0, "classify only crops with at least this tissue fraction "
           "(-1 = the bundle's tissue_gate, else 0.1)", minimum=-1.0, maximum=1.0, check=_unset_or_non_negative),
    Option("min_focus", float, -1.0, "classify only crops whose Laplacian variance is at least this "
           "(-1 = the bundle's tissue_gate, else 150)", minimum=-1.0, check=_unset_or_non_negative),
    Option("tissue_min_saturation", int, -1, "HSV saturation (0..255) below which a pixel is background "
           "(-1 = the bundle's tissue_gate, else 20)", minimum=-1, maximum=255, check=_unset_or_non_negative),
    Option("tissue_max_brightness", int, -1, "HSV value (0..255) above which a pixel is background "
           "(-1 = the bundle's tissue_gate, else 235)", minimum=-1, maximum=255, check=_unset_or_non_negative),
    Option("reconnect_min_s", float, 0.5, "first reconnect delay after the source is lost", minimum=0.01),
    Option("reconnect_max_s", float, 10.0, "longest reconnect delay (exponential backoff)", minimum=0.01),
    Option("exit_on_source_end", bool, False, "exit (code 0) when a file/dir/image source ends"),
    Option("max_frames", int, 0, "stop after publishing this many overlays (0 = run forever)", minimum=0),
    Option("slides_dir", str, "slides", "where 'slide end' writes per-slide JSON records", path=True),
    Option("snapshot_dir", str, "snapshots", "where 'snapshot' saves frame, overlay and header", path=True),
    Option("metrics_http", str, "", "serve Prometheus metrics on HOST:PORT (empty = off)", check=_host_port),
    Option("log_format", str, "text", "log line format", choices=("text", "json")),
    Option("log_level", str, "info", "log level", choices=("debug", "info", "warning", "error")),
    Option("curve_server_secret", str, "", "CurveZMQ: the daemon's .key_secret file (empty = no encryption)",
           path=True),
    Option("curve_clients_dir", str, "", "CurveZMQ: only clients whose .key files are here may connect",
           path=True),
)
BY_NAME = {o.name: o for o in OPTIONS}


@dataclass
class Config:
    """Validated options; attribute names are the TOML keys."""

    values: dict = field(default_factory=dict)
    origin: str = "defaults"

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes) -> "Config":
        values = dict(self.values)
        for key, value in changes.items():
            values[key] = validate_value(key, value, "override")
        return Config(values, self.origin)

    def to_dict(self) -> dict:
        return dict(self.values)


def validate_value(key: str, value: Any, where: str) -> Any:
    """Type/range/choice check for one option; raises ArmscopeError naming ``key``."""
    if key not in BY_NAME:
        known = ", ".join(sorted(BY_NAME))
        raise ArmscopeError(f"{where}: unknown key {key!r} (known keys: {known})")
    opt = BY_NAME[key]
    if opt.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if opt.type is not bool and isinstance(value, bool) or not isinstance(value, opt.type):
        raise ArmscopeError(f"{where}: key {key!r}: expected {opt.type.__name__}, got {type(value).__name__} {value!r}")
    if opt.type is float and not math.isfinite(value):
        raise ArmscopeError(f"{where}: key {key!r}: {value!r} is not a finite number")
    if opt.choices and value not in opt.choices:
        raise ArmscopeError(f"{where}: key {key!r}: {value!r} is not one of {', '.join(opt.choices)}")
    if opt.minimum is not None and value < opt.minimum:
        raise ArmscopeError(f"{where}: key {key!r}: {value!r} is below the minimum {opt.minimum}")
    if opt.maximum is not None and value > opt.maximum:
        raise ArmscopeError(f"{where}: key {key!r}: {value!r} is above the maximum {opt.maximum}")
    if opt.check:
        problem = opt.check(value)
        if problem:
            raise ArmscopeError(f"{where}: key {key!r}: {value!r}: {problem}")
    return value


def _cross_checks(values: dict, where: str) -> None:
    if values["reconnect_max_s"] < values["reconnect_min_s"]:
        raise ArmscopeError(f"{where}: key 'reconnect_max_s': {values['reconnect_max_s']} is below "
                            f"reconnect_min_s {values['reconnect_min_s']}")
    # tcp://HOST:* twice is two binds to two ports the OS chooses, not one endpoint
    if values["publish"] == values["control"] and not values["publish"].endswith(":*"):
        raise ArmscopeError(f"{where}: key 'control': same endpoint as 'publish' ({values['publish']})")
    if values["curve_clients_dir"] and not values["curve_server_secret"]:
        raise ArmscopeError(f"{where}: key 'curve_clients_dir' needs 'curve_server_secret'")
    if values["curve_server_secret"] and not Path(values["curve_server_secret"]).is_file():
        raise ArmscopeError(f"{where}: key 'curve_server_secret': {values['curve_server_secret']}: no such file")
    if values["curve_clients_dir"] and not Path(values["curve_clients_dir"]).is_dir():
        raise ArmscopeError(f"{where}: key 'curve_clients_dir': {values['curve_clients_dir']}: not a directory")


def read_toml(path: Path) -> dict:
    """The ``[edge]`` table of a TOML file, or its top level if there is no such table."""
    path = Path(path)
    if not path.is_file():
        raise ArmscopeError(f"{path}: no such config file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ArmscopeError(f"{path}: not valid TOML ({exc})") from None
    if "edge" in data:
        if not isinstance(data["edge"], dict):
            raise ArmscopeError(f"{path}: key 'edge': expected a table")
        other = [k for k in data if k != "edge"]
        if other:
            raise ArmscopeError(f"{path}: unknown key {other[0]!r} next to the [edge] table")
        data = data["edge"]
    return data


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the TOML file, then ``overrides`` (flags), each validated."""
    values = {o.name: o.default for o in OPTIONS}
    origin = "defaults"
    if path is not None:
        path = Path(path).resolve()
        origin = str(path)
        for key, value in read_toml(path).items():
            value = validate_value(key, value, str(path))
            if BY_NAME[key].path and value and not Path(value).is_absolute():
                value = str(path.parent / value)
            if key == "source":
                from armscope.edge.sources import resolve_relative

                value = resolve_relative(value, path.parent)
            values[key] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = validate_value(key, value, "command line")
    flags = any(v is not None for v in (overrides or {}).values())
    where = "command line" if path is None else (f"{origin} + command line" if flags else origin)
    _cross_checks(values, where)
    from armscope.edge.sources import parse_source

    try:
        parse_source(values["source"])
    except ArmscopeError as exc:
        raise ArmscopeError(f"{where}: key 'source': {exc}") from None
    return Config(values, origin)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per option, default None so unset flags do not override the file."""
    parser.add_argument("--config", help="TOML config file (keys as below, top level or in an [edge] table)")
    for opt in OPTIONS:
        flag = "--" + opt.name.replace("_", "-")
        text = f"{opt.help} (default: {opt.default!r})"
        if opt.type is bool:
            parser.add_argument(flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            # argparse's own {a,b} form for options with choices, as the other commands show them
            metavar = "{" + ",".join(map(str, opt.choices)) + "}" if opt.choices else opt.name.upper()
            parser.add_argument(flag, dest=opt.name, type=opt.type, default=None, choices=opt.choices,
                                help=text, metavar=metavar)


def from_args(args: argparse.Namespace) -> Config:
    overrides = {o.name: getattr(args, o.name, None) for o in OPTIONS}
    return load_config(getattr(args, "config", None), overrides)
