"""Each inference figure against the machine's limit: the model's FLOPs per
frame, counted from the ONNX graph, over the time, against an estimate of the
CPU's peak for that precision.

FLOPs: 2 x the multiply-accumulates of every Conv, ConvTranspose, MatMul and
Gemm, from the shapes ONNX shape inference gives with the batch fixed to 1
(element-wise ops, pooling and the softmax are left out: they are memory-bound
and a few percent of the arithmetic). A bundle's members are counted one by one
and summed for an ensemble of k.

Peak: usable cores x clock x SIMD lanes x FMA units x 2 (a fused multiply-add
is two FLOPs), as far as /proc/cpuinfo, lscpu and cpufreq tell. It is an
ESTIMATE, and says which of its inputs were assumed: the number of FMA units
per core is not in /proc/cpuinfo (2 assumed: recent x86 server cores and the
Jetson Orin's Cortex-A78AE have two vector FMA pipes; some Xeons have one
512-bit unit), the clock is the highest one reported (turbo under load on all
cores is often lower, and a VM reports its nominal clock), and logical CPUs of
one core (SMT) share its units. The memory-bandwidth limit is not derived (no
file tells the DRAM bandwidth); the weight bytes per frame are reported so it
can be judged.
"""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path

from armscope.core.cpus import usable_cpus
from armscope.edge.backends.cpu_features import cpu_flags

COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@lru_cache(maxsize=None)
def graph_cost(path: str) -> dict:
    """{"flops", "weight_bytes", "ops"} of one ONNX graph for one frame."""
    import numpy as np
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(path)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if dims and not dims[0].HasField("dim_value"):
        dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes, elem = {}, {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                           for d in vi.type.tensor_type.shape.dim]
        elem[vi.name] = vi.type.tensor_type.elem_type
    weight_bytes = 0
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
        weight_bytes += numpy_helper.to_array(init).nbytes if init.data_type else 0
    macs, unknown, counted = 0, 0, 0

    def known(shape):
        return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)

    for node in model.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        out, ins = shapes.get(node.output[0]), [shapes.get(i) for i in node.input]
        if not known(out) or not all(known(s) for s in ins[:2]):
            unknown += 1
            continue
        counted += 1
        if node.op_type in ("Conv", "ConvTranspose"):
            w = ins[1]   # Conv: (Cout, Cin/groups, kh, kw): each output sums Cin/groups x kh x kw products;
            # ConvTranspose: (Cin, Cout/groups, kh, kw): each input spreads into Cout/groups x kh x kw outputs
            macs += int(np.prod(out if node.op_type == "Conv" else ins[0])) * int(np.prod(w[1:]))
        elif node.op_type == "MatMul":
            macs += int(np.prod(out)) * ins[0][-1]
        else:   # Gemm: (M, K) x (K, N), transA decides where K is
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            macs += int(np.prod(out)) * (ins[0][0] if trans_a else ins[0][-1])
    activations = activation_bytes(model.graph, shapes, elem)
    return {"flops": 2 * macs, "weight_bytes": int(weight_bytes), "ops_counted": counted, "ops_unknown_shape": unknown,
            **activations}


def activation_bytes(graph, shapes: dict, elem: dict) -> dict:
    """Bytes of activations one frame moves: every tensor a node produces is written
    once and read once by each node that consumes it; the graph's input is read by
    its consumers. Weights (initializers, Constant nodes) are not activations. An
    upper bound on DRAM traffic: a runtime fuses chains (Conv+Relu never stores the
    Conv's output) and small tensors stay in cache."""
    import numpy as np
    from onnx import helper

    weights = {i.name for i in graph.initializer}
    weights |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    size: dict[str, int | None] = {}

    def nbytes(name: str) -> int | None:
        if name not in size:
            shape, kind = shapes.get(name), elem.get(name)
            known = shape is not None and kind and all(isinstance(d, int) and d >= 0 for d in shape)
            size[name] = int(np.prod(shape, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(kind)).itemsize \
                if known else None
        return size[name]

    written = read = 0
    unknown: set[str] = set()
    produced = {o for n in graph.node if n.op_type != "Constant" for o in n.output if o} | {i.name for i in graph.input}
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if name and (b := nbytes(name)) is not None:
                written += b
            elif name:
                unknown.add(name)
        for name in node.input:
            if not name or name in weights or name not in produced:
                continue
            if (b := nbytes(name)) is not None:
                read += b
            else:
                unknown.add(name)
    return {"activation_bytes_written": written, "activation_bytes_read": read,
            "activation_tensors_unknown_shape": len(unknown)}


def ensemble_cost(member_paths) -> dict:
    costs = [graph_cost(str(p)) for p in member_paths]
    total = {k: sum(c[k] for c in costs) for k in ("flops", "weight_bytes", "ops_unknown_shape", "activation_bytes_written",
                                                     "activation_bytes_read", "activation_tensors_unknown_shape")}
    # what a frame must move: the weights read once, every activation written and read back
    total["bytes_per_frame"] = total["weight_bytes"] + total["activation_bytes_written"] + total["activation_bytes_read"]
    return {**total, "members": len(costs)}


def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def clock_mhz() -> tuple[float | None, str]:
    """The highest clock reported, and where it came from."""
    lscpu = _lscpu()
    if lscpu.get("CPU max MHz"):
        return float(lscpu["CPU max MHz"]), "lscpu 'CPU max MHz'"
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1000.0, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("cpu mhz"):
                return float(line.split(":", 1)[1]), "/proc/cpuinfo 'cpu MHz' (current or nominal clock; no max reported)"
    except (OSError, ValueError):
        pass
    return None, "no clock reported"


def cores() -> tuple[int, str]:
    usable = usable_cpus()
    per_core = _lscpu().get("Thread(s) per core", "1")
    smt = int(per_core) if per_core.isdigit() and int(per_core) > 0 else 1
    n = max(1, usable // smt)
    return n, f"{usable} usable logical CPUs / {smt} thread(s) per core (lscpu)"


def cpu_peak(precision: str, flags: set[str] | None = None, machine: str | None = None) -> dict:
    """{"gflops": estimate or None, "derivation": text, "assumed": [...]} for ``precision``
    (fp32, bf16, int8, fp16) on this CPU."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    mhz, clock_from = clock_mhz()
    n_cores, cores_from = cores()
    fma_units = 2
    assumed = [f"{fma_units} vector FMA units per core (not reported by /proc/cpuinfo)",
               f"clock from {clock_from}; sustained all-core clock under load may be lower"]
    arm = machine in ("aarch64", "arm64")
    if arm:
        lanes, isa = 4, "128-bit NEON (asimd)"
    elif "avx512f" in flags:
        lanes, isa = 16, "AVX-512"
    elif "avx2" in flags or "avx" in flags:
        lanes, isa = 8, "AVX2" if "avx2" in flags else "AVX"
    else:
        lanes, isa = 4, "SSE"
    if "fma" not in flags and not arm:
        assumed.append("no FMA flag: a multiply and an add per lane per cycle counted as one FMA")
    per_cycle = lanes * 2 * fma_units            # FP32 FLOPs per cycle per core
    factor, how = 1.0, f"FP32 on {isa}: {lanes} lanes x 2 FLOPs x {fma_units} units"
    if precision == "bf16":
        if "amx_bf16" in flags:
            per_cycle, how = 1024, "BF16 on AMX: 1024 operations per cycle per core (Intel's figure), counted as FLOPs"
        elif "avx512_bf16" in flags or (arm and "bf16" in flags):
            factor, how = 2.0, f"BF16 dot products ({'vdpbf16ps' if not arm else 'BFDOT'}): 2 x the FP32 rate; {how}"
        else:
            return {"gflops": None, "derivation": "no native BF16 on this CPU (runs as FP32)", "assumed": []}
    elif precision == "int8":
        if "amx_int8" in flags:
            per_cycle, how = 2048, "INT8 on AMX: 2048 operations per cycle per core (Intel's figure)"
        elif "avx512_vnni" in flags or "avx_vnni" in flags or (arm and "asimddp" in flags):
            vnni_lanes = 16 if "avx512_vnni" in flags else (4 if arm else 8)
            per_cycle = vnni_lanes * 4 * 2 * fma_units
            how = f"INT8 dot products (VNNI/SDOT): {vnni_lanes} lanes x 4 MACs x 2 x {fma_units} units"
        else:
            return {"gflops": None, "derivation": "no INT8 dot-product instructions (VNNI/AMX/SDOT): not derived",
                    "assumed": []}
    elif precision == "fp16":
        how = f"FP16 bundles compute in FP32 on the CPU (the runtimes insert casts): {how}"
    if mhz is None:
        return {"gflops": None, "derivation": f"{how}; no clock reported: peak not derived", "assumed": assumed}
    gflops = n_cores * mhz / 1000.0 * per_cycle * factor
    return {"gflops": round(gflops, 1),
            "derivation": f"{n_cores} cores ({cores_from}) x {mhz / 1000.0:.2f} GHz x "
                          f"{per_cycle * factor:g} FLOPs/cycle ({how}); an estimate",
            "assumed": assumed}


def against_limit(flops: int, median_ms: float, peak: dict) -> dict:
    """Achieved GFLOP/s and its fraction of ``peak`` (None where the peak is not derived)."""
    achieved = flops / (median_ms / 1000.0) / 1e9
    fraction = achieved / peak["gflops"] if peak.get("gflops") else None
    return {"gflops_achieved": round(achieved, 2), "fraction_of_peak": round(fraction, 4) if fraction else None}
