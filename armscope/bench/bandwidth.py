"""The machine's sustained memory bandwidth, measured, and each inference
figure against it: the roofline's second limit beside ``limits``' compute peak.

CPU: a STREAM triad (``a[i] = b[i] + q * c[i]``, McCalpin's STREAM benchmark)
in numpy, on arrays each at least 4 x the summed last-level caches (STREAM's
own sizing rule; the caches are read from
``/sys/devices/system/cpu/cpu*/cache/index*``, one per distinct
``shared_cpu_list``), so the arrays stream from DRAM. One thread per usable
CPU, each on its own contiguous slice, walking it in 256 KiB blocks: the
``q * c`` temporary of a block stays in the L2 cache, so DRAM sees what a
compiled triad moves: b and c read, a written. Bytes counted as STREAM counts
them, 24 per element (the write-allocate read of ``a`` is not counted); the
best of the repetitions is the figure (STREAM's convention), the median beside
it. numpy releases the GIL inside its loops, so the threads run in parallel.

GPU: device-to-device ``cudaMemcpyAsync`` of a 256 MiB buffer (cuda-python or
pycuda, ``armscope.gpu.cuda_runtime``), repeated on one stream and timed
from the host around a stream synchronize; bytes counted 2 x the size (read
and write), as CUDA's ``bandwidthTest`` sample counts device-to-device
copies. Absent, with why, without a GPU or a CUDA Python API. On a Jetson the
GPU and the CPU share the same DRAM, so both figures measure it.

Against the limit: bytes a frame must move (``limits.ensemble_cost``:
weights read once + every activation written once and read by each
consumer) over the median time, as a fraction of the bandwidth; arithmetic
intensity (FLOPs / byte) against the machine balance (peak FLOP/s /
bandwidth) says which limit binds: below the balance the memory, above it
the compute (the roofline model, Williams, Waterman & Patterson 2009).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from armscope.core.cpus import usable_cpus

BLOCK = 32 * 1024            # float64 elements per block: 256 KiB, inside any L2
MIN_ARRAY = 64 << 20         # bytes; with no cache size readable, STREAM's rule on a 16 MiB cache
GPU_BUFFER = 256 << 20
GPU_BACKENDS = ("tensorrt",)


def _size(text: str) -> int | None:
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)
    except ValueError:
        return None


def last_level_cache(cpu_root: Path | str = "/sys/devices/system/cpu") -> dict:
    """{"level", "bytes_each", "instances", "total_bytes", "source"} of the highest
    data/unified cache level, summed over its distinct instances; or {"absent": why}."""
    root = Path(cpu_root)
    found: dict[int, dict[str, int]] = {}
    for index in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _size((index / "size").read_text())
            shared = (index / "shared_cpu_list").read_text().strip() if (index / "shared_cpu_list").exists() \
                else index.parent.parent.name
        except (OSError, ValueError):
            continue
        if size:
            found.setdefault(level, {})[shared] = size
    if not found:
        return {"absent": f"no cache sizes under {root}/cpu*/cache/index*"}
    level = max(found)
    sizes = list(found[level].values())
    return {"level": level, "bytes_each": max(sizes), "instances": len(sizes), "total_bytes": sum(sizes),
            "source": f"{root}/cpu*/cache/index*/size, level {level}, one per distinct shared_cpu_list"}


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_triad(repetitions: int = 10, threads: int | None = None, cpu_root: Path | str = "/sys/devices/system/cpu") -> dict:
    """The STREAM triad's sustained bandwidth of this CPU's memory (GB/s, 1e9 bytes)."""
    cache = last_level_cache(cpu_root)
    notes = []
    array = 4 * cache["total_bytes"] if "total_bytes" in cache else MIN_ARRAY
    if "total_bytes" not in cache:
        notes.append(f"cache size unknown ({cache['absent']}): {MIN_ARRAY >> 20} MiB arrays")
    array = max(array, MIN_ARRAY)
    available = _available_bytes()
    if available and 3 * array > available // 4:
        array = max(BLOCK * 8, available // 12)
        notes.append("arrays capped to a quarter of MemAvailable: they may not be 4 x the caches")
    n = array // 8 // BLOCK * BLOCK
    threads = threads or usable_cpus()
    a, b, c = np.zeros(n), np.full(n, 1.0), np.full(n, 2.0)
    q = 3.0
    bounds = np.linspace(0, n // BLOCK, threads + 1).astype(int) * BLOCK

    def slice_triad(i: int) -> None:
        tmp = np.empty(BLOCK)
        for s in range(bounds[i], bounds[i + 1], BLOCK):
            np.multiply(c[s:s + BLOCK], q, out=tmp)
            np.add(b[s:s + BLOCK], tmp, out=a[s:s + BLOCK])

    times = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(slice_triad, range(threads)))        # first touch done by np.zeros/full; this warms the threads
        for _ in range(repetitions):
            t0 = time.perf_counter()
            list(pool.map(slice_triad, range(threads)))
            times.append(time.perf_counter() - t0)
    if not np.all(a == 1.0 + q * 2.0):
        raise RuntimeError("STREAM triad produced wrong values")   # a measurement of nothing is no measurement
    moved = 3 * 8 * n
    rates = sorted(moved / t / 1e9 for t in times)
    return {"gbs": round(rates[-1], 2), "gbs_median": round(float(np.median(rates)), 2),
            "how": f"STREAM triad a = b + q*c, numpy, {threads} thread(s), 3 arrays of {n * 8 / 2**20:.0f} MiB "
                   f"(float64), best of {repetitions} (median beside it); 24 bytes per element counted",
            "array_bytes": n * 8, "last_level_cache": cache, "notes": notes, "repetitions": repetitions}


def gpu_copy(repetitions: int = 20) -> dict:
    """Device-to-device copy bandwidth of GPU 0 (GB/s), or {"absent": why}."""
    from armscope.gpu.trt_env import gpu_info

    gpu = gpu_info()
    if gpu is None:
        return {"absent": "no NVIDIA GPU here"}
    from armscope.gpu.cuda_runtime import CudaRuntime, cuda_flavours

    if not cuda_flavours():
        return {"absent": f"{gpu['name']}: neither cuda-python nor pycuda is installed (pip install 'armscope[gpu]')"}
    from armscope.core.errors import ArmscopeError

    try:
        rt = CudaRuntime()
    except ArmscopeError as exc:
        return {"absent": f"{gpu['name']}: {exc}"}
    try:
        src, dst, stream = rt.device(GPU_BUFFER), rt.device(GPU_BUFFER), rt.stream()
        rt.dtod(dst, src, GPU_BUFFER, stream)
        rt.synchronize(stream)
        t0 = time.perf_counter()
        for _ in range(repetitions):
            rt.dtod(dst, src, GPU_BUFFER, stream)
        rt.synchronize(stream)
        seconds = time.perf_counter() - t0
    except ArmscopeError as exc:
        return {"absent": f"{gpu['name']}: the copy failed: {exc}"}
    finally:
        rt.close()
    return {"gbs": round(2 * GPU_BUFFER * repetitions / seconds / 1e9, 1), "gpu": gpu["name"], "flavour": rt.flavour,
            "how": f"cudaMemcpyAsync device-to-device, {GPU_BUFFER >> 20} MiB x {repetitions} on one stream "
                   "(host-timed around a synchronize); 2 x size counted (read + write), as CUDA's bandwidthTest"}


def measure(quick: bool = False) -> dict:
    """{"cpu": cpu_triad(...), "gpu": gpu_copy(...) or absent}."""
    return {"cpu": cpu_triad(repetitions=4 if quick else 10), "gpu": gpu_copy(repetitions=5 if quick else 20)}


def is_gpu_row(row: dict) -> bool:
    return str(row.get("backend", "")).lower() in GPU_BACKENDS


def roofline(row: dict, peak: dict, bandwidth: dict) -> dict:
    """The row against the memory limit, and which limit binds."""
    side = "gpu" if is_gpu_row(row) else "cpu"
    bw = bandwidth.get(side) or {}
    seconds = row["ms"]["median"] / 1000.0
    moved = row.get("bytes_per_frame") or 0
    out = {"bandwidth_from": side, "gbs_achieved": round(moved / seconds / 1e9, 2) if moved else None,
           "intensity_flop_per_byte": round(row["flops_per_frame"] / moved, 2) if moved else None,
           "fraction_of_bandwidth": None, "machine_balance_flop_per_byte": None, "binds": None}
    if not bw.get("gbs"):
        out["why"] = f"no {side.upper()} bandwidth measured ({bw.get('absent', 'not measured')})"
        return out
    if out["gbs_achieved"] is not None:
        out["fraction_of_bandwidth"] = round(moved / seconds / 1e9 / bw["gbs"], 4)
    gflops = peak.get("gflops") if side == "cpu" else None
    if not gflops:
        out["why"] = "no compute peak derived for this device and precision: the binding limit is not decided"
        return out
    balance = gflops / bw["gbs"]
    out["machine_balance_flop_per_byte"] = round(balance, 2)
    if out["intensity_flop_per_byte"] is not None:
        out["binds"] = "memory" if out["intensity_flop_per_byte"] < balance else "compute"
        attainable = min(gflops, out["intensity_flop_per_byte"] * bw["gbs"])
        out["fraction_of_attainable"] = round(row["limit"]["gflops_achieved"] / attainable, 4)
    return out
