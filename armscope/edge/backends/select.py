"""Which CPU path ``--backend auto`` runs: the fastest one that stays faithful here.

Why a table and not one default: the fastest faithful path depends on three
things that differ between machines of one fleet. What the CPU computes
natively (BF16: AVX512-BF16 or AMX; exact INT8: VNNI or AMX, see
``cpu_features``), what the bundle holds (FP32, INT8 Q/DQ, FP16 graphs) and
what is installed (OpenVINO is optional). As measured (BENCHMARKS.md
section 4): on BF16 CPUs OpenVINO BF16 runs a DenseNet-121 member faster than
ONNX Runtime FP32, and on VNNI/AMX CPUs OpenVINO runs INT8 faster than FP32,
where ONNX Runtime runs INT8 slower than its FP32.

Faithful and fast are measured on the bundle, not assumed: BF16 runs only
after it passed the agreement gate on the bundle's hold-out images *and* ran
faster than ONNX Runtime FP32 in the same measurement (tiny models can run
slower in BF16), recorded once for this ensemble, this OpenVINO and this kind
of BF16 unit (``armscope.edge.backends.fidelity``); INT8 only where the CPU computes it
exactly.

The table, first row that applies:

+--------+------------------------------------------+--------------------------------------+
| bundle | this machine                             | auto runs                            |
+========+==========================================+======================================+
| INT8   | exact INT8, OpenVINO installed           | OpenVINO, INT8                       |
| INT8   | exact INT8, no OpenVINO                  | ONNX Runtime, INT8 (and says why)    |
| INT8   | INT8 inexact                             | ONNX Runtime, which refuses it       |
| FP16   | any                                      | ONNX Runtime (FP32 is faster on CPU) |
| FP32   | BF16 unit, OpenVINO, and a record here:  | OpenVINO, BF16, in the layout the    |
|        | gate passed, BF16 measured faster        | record measured fastest              |
| FP32   | otherwise                                | ONNX Runtime FP32 (says why not BF16)|
+--------+------------------------------------------+--------------------------------------+

Faster is measured as ``auto`` will run it: the record times ONNX Runtime
FP32 (per-member sessions, the FP32 default) against OpenVINO BF16 in *both*
layouts (merged graph, per-member requests), in one interleaved run
(``measure_speed``), and ``auto`` then runs BF16 in the layout that was
fastest; a ``--layout`` given by hand is honoured and compared as timed.

The choice is logged in one line and kept in the backend's ``selection``,
which its ``describe()`` and so the daemon's status reply carry.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass

from armscope.core.errors import ArmscopeError
from armscope.edge.backends import fidelity
from armscope.edge.backends.cpu_features import cpu_flags, int8_exact

log = logging.getLogger("armscope.edge.backends")

X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class Machine:
    """What the choice depends on, read once: the CPU's architecture and
    /proc/cpuinfo flags, and the OpenVINO version installed (None: none)."""

    arch: str
    flags: frozenset
    openvino: str | None

    @classmethod
    def here(cls) -> "Machine":
        return cls(platform.machine().lower(), frozenset(cpu_flags()), fidelity.openvino_version())

    @classmethod
    def from_cpuinfo(cls, text: str, openvino: str | None, arch: str = "x86_64") -> "Machine":
        return cls(arch, frozenset(cpu_flags(text)), openvino)

    @property
    def bf16_unit(self) -> str | None:
        return fidelity.bf16_unit(self.flags) if self.arch in X86 else None


@dataclass(frozen=True)
class CpuChoice:
    backend: str  # onnxruntime | openvino
    precision: str  # what computes: fp32, bf16, int8, fp16
    cpu_precision: str  # OpenVINO's inference precision hint for it (f32 | bf16)
    why: str
    fidelity_record: str | None = None  # the record that allowed BF16
    warn: bool = False  # logged as a WARNING: something the operator should fix
    layout: str = "auto"  # merged | members as measured fastest; auto: the backend's default (open_backend)


def record_command(bundle_root) -> str:
    return (f"armscope accuracy --bundle {bundle_root} --backend openvino --cpu-precision bf16 "
            "--images HOLDOUT_IMAGES --out REPORT_DIR")


def int8_choice(openvino_installed: bool, exact_here: bool) -> tuple[str, str]:
    """(runtime, why) for an INT8 bundle (the table's INT8 rows). On VNNI/AMX
    CPUs ONNX Runtime ran a full-size INT8 Q/DQ member *slower* than its FP32
    while OpenVINO ran it faster than FP32 and as exactly (BENCHMARKS.md
    section 4).
    Where INT8 is inexact both runtimes refuse the bundle; ONNX Runtime says so."""
    if not exact_here:
        return "onnxruntime", "INT8 bundle; this CPU's INT8 is inexact, see below"
    if openvino_installed:
        return "openvino", ("INT8 bundle on a VNNI/AMX CPU: OpenVINO runs it 1.8-2.4x faster than FP32, "
                            "ONNX Runtime slower")
    return "onnxruntime", ("INT8 bundle: ONNX Runtime runs INT8 Q/DQ no faster than FP32 on the CPUs measured; "
                           "pip install 'armscope[openvino]' for OpenVINO, 1.8-2.4x faster than FP32 on a VNNI/AMX CPU")


def decide(bundle, machine: Machine, records: "list[dict] | ArmscopeError", layout: str = "auto") -> CpuChoice:
    """The table above for ``bundle`` (``.manifest``, ``.root``) on ``machine``,
    given the bundle's BF16 fidelity records (or the error reading them);
    ``layout``: ``auto`` (the fastest recorded) or the one asked for."""
    precision = bundle.manifest.get("precision", "fp32")
    if precision == "int8":
        kind, why = int8_choice(machine.openvino is not None, int8_exact(machine.arch, machine.flags)[0])
        return CpuChoice(kind, "int8", "f32", why)
    if precision == "fp16":
        return CpuChoice("onnxruntime", "fp16", "f32",
                         "FP16 bundle: made for GPUs; ONNX Runtime runs it on the CPU through casts, 0.96x its "
                         "FP32 (BENCHMARKS.md section 4): the FP32 bundle is the faster CPU path")
    unit = machine.bf16_unit
    if unit is None:
        return CpuChoice("onnxruntime", "fp32", "f32",
                         "FP32: this CPU has no native BF16 (AVX512-BF16 or AMX), the default CPU runtime")
    if machine.openvino is None:
        return CpuChoice("onnxruntime", "fp32", "f32",
                         f"FP32: this CPU has {unit}, but BF16 runs on OpenVINO, which is not installed "
                         "(pip install 'armscope[openvino]'; BF16 against FP32: BENCHMARKS.md section 4)")
    if isinstance(records, ArmscopeError):
        return CpuChoice("onnxruntime", "fp32", "f32", f"FP32: {records}", warn=True)
    key = fidelity.make_key(bundle.manifest["ensemble"]["sha256"], machine.openvino, unit)
    record, why_not = fidelity.match(records, key)
    path = fidelity.record_path(bundle.root, "openvino", "bf16")
    if record is None:
        return CpuChoice("onnxruntime", "fp32", "f32",
                         f"FP32: this CPU has {unit} and OpenVINO, but BF16's fidelity on this bundle is {why_not}; "
                         f"'{record_command(bundle.root)}' measures and records it")
    s = record.get("summary", {})
    measured = (f"{s.get('n_images')} images from {record.get('images_from')}, top-1 agreement "
                f"{s.get('top1_agreement', 0):.2%}, max |dp| {s.get('max_abs_delta_p', 0):.2g}")
    if not record["passed"]:
        return CpuChoice("onnxruntime", "fp32", "f32",
                         f"FP32: OpenVINO BF16 failed the agreement gate on this bundle "
                         f"({'; '.join(record.get('failed', []))}; {measured}; {path})")
    speed = record.get("speed") or {}
    ort_s = speed.get("onnxruntime_fp32_s")
    timed = {k: v for k, v in bf16_times(speed).items() if layout in ("auto", k)}
    if not ort_s or not timed:
        what = "no speed measurement" if layout == "auto" or not ort_s else f"no timing of the {layout} layout"
        return CpuChoice("onnxruntime", "fp32", "f32", f"FP32: {path} has {what}; record it again "
                         f"('{record_command(bundle.root)}')", warn=True)
    best = min(timed, key=timed.get)
    ratio = ort_s / timed[best]
    times = (", ".join(f"OpenVINO BF16 {k} {v * 1000:.0f} ms" for k, v in sorted(timed.items(), key=lambda kv: kv[1]))
             + f" vs ONNX Runtime FP32 {ort_s * 1000:.0f} ms a frame when recorded, {ratio:.2f}x")
    if ratio <= 1.0:
        return CpuChoice("onnxruntime", "fp32", "f32", f"FP32: BF16 passed the agreement gate on this bundle but "
                         f"was not faster here ({times}; {path})")
    return CpuChoice("openvino", "bf16", "bf16",
                     f"FP32 bundle in BF16 on {unit}, {best} layout: passed the agreement gate on this bundle "
                     f"({measured}) and ran {times} ({path})", fidelity_record=str(path), layout=best)


def bf16_times(speed: dict) -> dict[str, float]:
    """OpenVINO BF16 seconds a frame by layout (merged, members) in a record's
    ``speed``. Records made before both layouts were timed hold one figure,
    ``openvino_bf16_s``, which timed the merged graph (what ``auto`` ran then)."""
    paths = speed.get("paths_s")
    if isinstance(paths, dict):
        return {name.rsplit(" ", 1)[1]: float(s) for name, s in paths.items()
                if name.startswith("openvino bf16 ") and s}
    return {"merged": float(speed["openvino_bf16_s"])} if speed.get("openvino_bf16_s") else {}


def speed_paths(n_members: int) -> list[tuple[str, str, str]]:
    """(backend, precision, layout) of the paths ``measure_speed`` times: ONNX
    Runtime FP32 as ``auto`` runs it without BF16 (per-member sessions), and
    OpenVINO BF16 in both layouts (one layout for a one-member bundle: its
    merged graph is its member)."""
    return [("onnxruntime", "fp32", "members"), ("openvino", "bf16", "merged")] + (
        [("openvino", "bf16", "members")] if n_members > 1 else [])


def measure_speed(bundle, frame, rounds: int = 9, threads: int | None = None) -> dict:
    """Seconds a frame of every path ``auto`` may run for an FP32 bundle on a
    BF16 CPU (``speed_paths``), each opened exactly as ``auto`` opens it, all
    open at once and timed in interleaved rounds (two warm-up calls each, the
    order rotating every round), so the load of a shared machine hits every
    path alike. Medians decide; minimums and the load average are kept to show
    how quiet the machine was. Recorded with the gate: ``auto`` runs BF16 only
    in a layout measured faster than ONNX Runtime FP32 (tiny models need not
    be; how much BF16 gains also moves with the load, BENCHMARKS.md)."""
    import contextlib
    import os
    import time

    import numpy as np

    from armscope.edge.backends import open_backend

    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    times: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        paths = {}
        for backend, precision, layout in speed_paths(len(bundle.member_paths)):
            opts = {"layout": layout, **({"threads": threads} if threads else {}),
                    **({"cpu_precision": precision} if backend == "openvino" else {})}
            paths[f"{backend} {precision} {layout}"] = stack.enter_context(open_backend(bundle, backend, **opts))
        for backend in paths.values():
            backend.infer(frame)
            backend.infer(frame)
        names = list(paths)
        times = {name: [] for name in names}
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                start = time.perf_counter()
                paths[name].infer(frame)
                times[name].append(time.perf_counter() - start)
    if load:
        load.append(os.getloadavg()[0])
    median = {name: float(np.median(t)) for name, t in times.items()}
    bf16 = bf16_times({"paths_s": median})
    layout = min(bf16, key=bf16.get)
    ort_s = median["onnxruntime fp32 members"]
    return {"paths_s": median, "min_s": {name: float(min(t)) for name, t in times.items()},
            "onnxruntime_fp32_s": ort_s, "openvino_bf16_s": bf16[layout], "bf16_layout": layout,
            "speedup": ort_s / bf16[layout], "rounds": rounds, "load_average_1min": load}


def choose(bundle, machine: Machine | None = None, layout: str = "auto") -> CpuChoice:
    """``decide`` on this machine with the bundle's records; a BF16 choice is
    confirmed against OpenVINO's own capability list (a hypervisor can hide a
    unit the flags show), else FP32 with a WARNING."""
    machine = machine or Machine.here()
    try:
        records = fidelity.read_records(bundle.root, "openvino", "bf16")
    except ArmscopeError as exc:
        records = exc
    choice = decide(bundle, machine, records, layout)
    if choice.precision == "bf16":
        from armscope.edge.backends.openvino_backend import cpu_capabilities

        capabilities = cpu_capabilities()
        if "BF16" not in capabilities:
            return CpuChoice("onnxruntime", "fp32", "f32",
                             f"FP32: the CPU flags show {machine.bf16_unit} but OpenVINO reports no BF16 "
                             f"({', '.join(capabilities)})", warn=True)
    return choice


def open_auto_cpu(bundle, gpu_reason: str, options: dict, level: int = logging.INFO):
    """Construct the CPU backend ``auto`` picks for ``bundle`` (``gpu_reason``:
    why not TensorRT), log the choice in one line and keep it in the backend's
    ``selection``, which its ``describe()`` (and so the daemon's status) shows."""
    from armscope.edge.backends import open_backend

    choice = choose(bundle, layout=options.get("layout", "auto"))
    layout = options.get("layout", "auto") if choice.layout == "auto" else choice.layout
    shown = layout if layout != "auto" else ("merged" if choice.backend == "openvino" else "members")
    log.log(logging.WARNING if choice.warn else level, "backend: %s %s %s on the CPU (%s; %s)",
            choice.backend, choice.precision.upper(), shown, gpu_reason, choice.why)
    backend = open_backend(bundle, choice.backend, **dict(options, cpu_precision=choice.cpu_precision, layout=layout))
    backend.selection = {"requested": "auto", "why": f"{gpu_reason}; {choice.why}",
                         "selected": {"backend": choice.backend, "precision": choice.precision, "layout": shown,
                                      "fidelity_record": choice.fidelity_record}}
    return backend
