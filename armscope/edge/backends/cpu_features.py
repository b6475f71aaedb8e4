"""Whether this CPU computes INT8 Q/DQ graphs exactly.

Why: on x86 CPUs without VNNI (AVX-VNNI, AVX512-VNNI) or AMX, ONNX Runtime's
and OpenVINO's INT8 convolutions multiply unsigned 8-bit activations by signed
8-bit weights with ``vpmaddubsw``, which adds each pair of products into a
*saturating* 16-bit sum. Measured on the demo ensemble (AMD EPYC, AVX2 only;
BENCHMARKS.md section 4):
the same Q/DQ graph gave 64-68% top-1 agreement with FP32 through either
runtime's INT8 kernels and 100% (max |delta p| 0.011) computed exactly (ONNX
Runtime with graph optimisations off, which runs Q/DQ as float arithmetic on
integer values, as TensorRT and VNNI CPUs do with 32-bit accumulators). So an
INT8 bundle is refused on such CPUs: the eyepiece must not show an overlay
computed wrongly. ARM CPUs (Jetson) accumulate INT8 dot products in 32 bits
(SDOT/UDOT) and are taken as exact.
"""
from __future__ import annotations

import platform
from pathlib import Path

EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of /proc/cpuinfo (empty when not readable, e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def int8_exact(machine: str | None = None, flags: set[str] | None = None) -> tuple[bool, str]:
    """(exact, why) for INT8 Q/DQ inference on this CPU."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686"):
        return True, f"{machine}: INT8 dot products accumulate in 32 bits"
    flags = cpu_flags() if flags is None else flags
    have = [f for f in EXACT_INT8_FLAGS if f in flags]
    if have:
        return True, f"x86 with {', '.join(have)}: INT8 dot products accumulate in 32 bits"
    return False, ("x86 without AVX-VNNI, AVX512-VNNI or AMX: ONNX Runtime's and OpenVINO's INT8 kernels "
                   "add u8 x s8 products in saturating 16-bit sums (vpmaddubsw)")


def require_exact_int8(bundle, runtime: str, allow_inexact: bool = False) -> None:
    """Refuse an INT8 bundle where ``runtime`` would compute it inexactly (see the module docstring)."""
    from armscope.core.errors import ArmscopeError

    if bundle.manifest.get("precision") != "int8" or allow_inexact:
        return
    exact, why = int8_exact()
    if not exact:
        raise ArmscopeError(
            f"{bundle.root}: an INT8 bundle cannot run exactly on this CPU with {runtime} ({why}; measured "
            "on the demo ensemble: 64-68% top-1 agreement with FP32 instead of 100%). Run the FP32 bundle "
            "here, or the INT8 bundle on TensorRT or a CPU with VNNI/AMX"
        )
