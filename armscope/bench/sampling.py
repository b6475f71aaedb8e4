"""Power, clocks and temperatures during the run, where the machine tells them.

Why: a Jetson's figures mean nothing without its power mode (``nvpmodel``),
whether its clocks are pinned (``jetson_clocks``), and what it drew and how
hot it ran meanwhile; a discrete GPU's likewise (NVML). What is not there is
reported as absent, with why, never guessed.

Sources, chosen at run time:

* Jetson: ``nvpmodel -q`` (prints ``NV Power Mode: <NAME>`` then the mode
  number), ``jetson_clocks --show`` (lines such as ``cpu0: Online=1
  Governor=schedutil MinFreq=... MaxFreq=... CurrentFreq=...``, ``GPU
  MinFreq=... MaxFreq=... CurrentFreq=...``, ``EMC ...``; jetson_clocks pins
  MinFreq to MaxFreq, so min == max reads as "pinned"; both usually need
  root), and ``tegrastats --interval MS`` (one line per interval: ``CPU
  [12%@1190,...]``, ``GR3D_FREQ 45%``, temperatures ``name@45.5C``, and power
  rails ``NAME current/average`` in mW: ``VDD_IN 4525mW/4525mW`` on Orin,
  ``POM_5V_IN 2545/2547`` on Nano/TX2, ``GPU 0/0 CPU 311/311 ...`` on
  Xavier). Board input power: ``VDD_IN``, ``POM_5V_IN`` or ``VIN_SYS_5V0``,
  else the sum of the rails, said so. (jetson-stats' ``jtop`` reads the same
  sysfs nodes through a root service; tegrastats ships with JetPack, so it is
  the one used.)
* Other NVIDIA GPUs: NVML through ``pynvml`` (nvidia-ml-py) when installed
  (``nvmlDeviceGetPowerUsage`` mW, ``nvmlDeviceGetTemperature``,
  ``nvmlDeviceGetClockInfo`` SM MHz, ``nvmlDeviceGetUtilizationRates``), else
  ``nvidia-smi --query-gpu=power.draw,temperature.gpu,clocks.sm,utilization.gpu
  --format=csv,noheader,nounits -lms MS``.
* Everywhere, beside the above: the CPU's own clock, temperatures and RAPL
  energy (``armscope.bench.cpusensors``), polled in a second thread.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

from armscope.bench import cpusensors

INTERVAL_MS = 200
BOARD_RAILS = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_GR3D = re.compile(r"GR3D_FREQ (\d+)%")
_CPU = re.compile(r"CPU \[([^\]]*)\]")


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> {"rails_mw": {name: current}, "temps_c": {...}, "gpu_util", "cpu_util"}."""
    rails = {name: float(cur) for name, cur, _avg in _RAIL.findall(line)}
    temps = {name: float(t) for name, t in _TEMP.findall(line)}
    out = {"rails_mw": rails, "temps_c": temps}
    if m := _GR3D.search(line):
        out["gpu_util"] = float(m.group(1))
    if m := _CPU.search(line):
        loads = [float(x.split("%")[0]) for x in m.group(1).split(",") if "%" in x]
        if loads:
            out["cpu_util"] = sum(loads) / len(loads)
    board = next((r for r in BOARD_RAILS if r in rails), None)
    if board:
        out["power_w"], out["power_from"] = rails[board] / 1000.0, board
    elif rails:
        out["power_w"], out["power_from"] = sum(rails.values()) / 1000.0, "sum of the listed rails"
    return out


def parse_nvpmodel(text: str) -> dict:
    m = re.search(r"NV Power Mode:\s*(.+)", text)
    mode = re.search(r"^\s*(\d+)\s*$", text, re.M)
    return {"mode": m.group(1).strip() if m else None, "id": int(mode.group(1)) if mode else None}


def parse_jetson_clocks(text: str) -> dict:
    """{"units": {name: {min, max, current}}, "pinned": bool|None}."""
    units = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\w+):?\s.*?MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)", line)
        if m:
            units[m.group(1)] = {"min": int(m.group(2)), "max": int(m.group(3)), "current": int(m.group(4))}
    # jetson_clocks pins the CPUs' and the GPU's MinFreq to MaxFreq; the EMC shows FreqOverride=1 instead
    cores = [u for name, u in units.items() if name != "EMC"]
    pinned = all(u["min"] == u["max"] for u in cores) if cores else None
    emc = re.search(r"EMC .*FreqOverride=(\d)", text)
    return {"units": units, "pinned": pinned, "emc_override": bool(int(emc.group(1))) if emc else None}


def _run(cmd: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        return p.returncode, p.stdout + p.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        return -1, str(exc)


def board_state() -> dict:
    """Power mode and clock state now: Jetson, NVIDIA GPU, or absent (with why)."""
    from armscope.gpu.trt_env import gpu_info, is_jetson

    if is_jetson():
        state = {"kind": "jetson"}
        for tool, parse, args in (("nvpmodel", parse_nvpmodel, ["-q"]), ("jetson_clocks", parse_jetson_clocks, ["--show"])):
            if shutil.which(tool) is None:
                state[tool] = {"absent": f"{tool} not on PATH"}
                continue
            rc, text = _run([tool, *args])
            state[tool] = parse(text) if rc == 0 else {"absent": f"{tool} {' '.join(args)} exit {rc}: {text.strip()[:200]} "
                                                                  "(needs root on most JetPacks)"}
        return state
    gpu = gpu_info()
    if gpu is not None:
        rc, text = _run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm", "--format=csv,noheader"])
        return {"kind": "nvidia-gpu", "gpu": gpu, "nvidia_smi": text.strip() if rc == 0 else None}
    return {"kind": "none", "absent": "no Jetson (no /etc/nv_tegra_release) and no NVIDIA GPU here"}


class Sampler:
    """Samples in a thread from ``start()`` to ``stop()``: [(monotonic_s, {power_w, temps_c, ...})]."""

    def __init__(self, interval_ms: int = INTERVAL_MS):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, dict]] = []
        self.source, self.absent = self._choose()
        self.cpu = cpusensors.CpuSensors()
        self.cpu_samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def _choose(self) -> tuple[str | None, str | None]:
        from armscope.gpu.trt_env import is_jetson

        if is_jetson():
            return ("tegrastats", None) if shutil.which("tegrastats") else (None, "Jetson without tegrastats on PATH")
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                return "nvml", None
        except Exception:
            pass
        if shutil.which("nvidia-smi") and _run(["nvidia-smi", "-L"])[0] == 0:
            return "nvidia-smi", None
        return None, "no board or GPU power sensor here (no Jetson, no NVIDIA GPU); the CPU's own sensors: see 'cpu'"

    def start(self) -> "Sampler":
        if any(not why for why in self.cpu.absent.values()):
            self._cpu_thread = threading.Thread(target=self._poll_cpu, name="bench-cpu-sensors", daemon=True)
            self._cpu_thread.start()
        if self.source is None:
            return self
        target = {"tegrastats": self._lines, "nvidia-smi": self._lines, "nvml": self._poll_nvml}[self.source]
        self._thread = threading.Thread(target=target, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        for thread in (self._thread, self._cpu_thread):
            if thread is not None:
                thread.join(5)
        cpusensors.with_power(self.cpu_samples, self.cpu.ranges())

    def _lines(self) -> None:
        if self.source == "tegrastats":
            cmd, parse = ["tegrastats", "--interval", str(self.interval_ms)], parse_tegrastats
        else:
            cmd = ["nvidia-smi", "--query-gpu=power.draw,temperature.gpu,clocks.sm,utilization.gpu",
                   "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)]
            parse = _parse_smi
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as exc:
            self.absent = f"{cmd[0]} could not start: {exc}"
            return
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            sample = parse(line)
            if sample:
                self.samples.append((time.monotonic(), sample))

    def _poll_nvml(self) -> None:
        import pynvml

        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        while not self._stop.wait(self.interval_ms / 1000.0):
            try:
                self.samples.append((time.monotonic(), {
                    "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, "power_from": "NVML board power",
                    "temps_c": {"gpu": float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))},
                    "sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                    "gpu_util": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)}))
            except Exception as exc:
                self.absent = f"NVML read failed: {exc}"
                return

    def _poll_cpu(self) -> None:
        self.cpu_samples.append((time.monotonic(), self.cpu.read()))
        while not self._stop.wait(self.interval_ms / 1000.0):
            self.cpu_samples.append((time.monotonic(), self.cpu.read()))

    # -- summaries -------------------------------------------------------------

    def mean_power_w(self, intervals: list[tuple[float, float]] | None = None, key: str = "power_w") -> float | None:
        """Mean power over the samples inside ``intervals`` (all samples without); None with fewer than 3.
        ``key``: "power_w" (board or GPU: the source above), "cpu_power_w" (RAPL packages; after ``stop()``)."""
        samples = self.cpu_samples if key == "cpu_power_w" else self.samples
        vals = [s[key] for t, s in samples if key in s
                and (intervals is None or any(a <= t <= b for a, b in intervals))]
        return sum(vals) / len(vals) if len(vals) >= 3 else None

    def summary(self) -> dict:
        cpu = cpusensors.summarize(self.cpu, self.cpu_samples, self.interval_ms)
        if self.source is None or not self.samples:
            return {"source": self.source, "absent": self.absent or "no samples were taken", "samples": 0, "cpu": cpu,
                    "series": self._cpu_series()}
        temps: dict[str, float] = {}
        for _, s in self.samples:
            for k, v in s.get("temps_c", {}).items():
                temps[k] = max(temps.get(k, v), v)
        power = self.mean_power_w()
        t0 = self.samples[0][0]
        return {"source": self.source, "absent": self.absent, "samples": len(self.samples),
                "interval_ms": self.interval_ms, "mean_power_w": round(power, 3) if power else None,
                "power_from": next((s.get("power_from") for _, s in self.samples if "power_from" in s), None),
                "max_temps_c": temps, "cpu": cpu,
                "series": [{"t_s": round(t - t0, 3), "power_w": s.get("power_w"),
                            "temp_c": max(s["temps_c"].values()) if s.get("temps_c") else None}
                           for t, s in self.samples] + self._cpu_series(t0)}

    def _cpu_series(self, t0: float | None = None) -> list[dict]:
        """The CPU's samples for the power/temperature plot (its package power and hottest sensor)."""
        if not self.cpu_samples:
            return []
        t0 = self.cpu_samples[0][0] if t0 is None else t0
        return [{"t_s": round(t - t0, 3), "cpu_power_w": s.get("cpu_power_w"),
                 "cpu_temp_c": max(s["temps_c"].values()) if s.get("temps_c") else None,
                 "cpu_mhz": round(sum(s["cpu_mhz"]) / len(s["cpu_mhz"]), 1) if s.get("cpu_mhz") else None}
                for t, s in self.cpu_samples if s]


def _parse_smi(line: str) -> dict | None:
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        power, temp, sm, util = (float(p) for p in parts)
    except ValueError:
        return None   # "[N/A]" on boards without a power sensor
    return {"power_w": power, "power_from": "nvidia-smi power.draw", "temps_c": {"gpu": temp}, "sm_mhz": sm,
            "gpu_util": util}
