"""The CPU's own sensors during a run: clock, temperature and energy, from Linux
sysfs, where the kernel exposes them and this user may read them.

Why: a CPU figure depends on the clock the cores actually ran at (turbo,
thermal throttling, a power cap) and on how hot they were; frames per joule
needs the energy the package used. Each of the three is reported as absent
with why when it is not there, never guessed.

* Clock: ``/sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq`` (kHz; the
  kernel's view of each CPU's current clock). Virtual machines and kernels
  without a cpufreq driver have no ``cpufreq`` directory.
* Temperature: thermal zones (``/sys/class/thermal/thermal_zone*/temp``,
  millidegrees, named by ``type``) and hwmon sensors
  (``/sys/class/hwmon/hwmon*/temp*_input``, millidegrees, named by the
  driver's ``name`` and ``temp*_label``: ``k10temp/Tctl``,
  ``coretemp/Package id 0``).
* Energy: RAPL through the powercap framework
  (``/sys/class/powercap/intel-rapl:N/energy_uj``, microjoules, a counter
  that wraps at ``max_energy_range_uj``; AMD Zen exposes the same files). The
  top-level ``package-N`` domains are summed (cores and uncore of each
  socket; not DRAM, and ``psys`` is left out because it contains the
  packages). Since Linux 5.10 ``energy_uj`` is readable by root only
  (CVE-2020-8694, the PLATYPUS side channel): without root it is absent.
"""
from __future__ import annotations

from itertools import pairwise
from pathlib import Path

RAPL_ROOT_ONLY = "readable by root only since Linux 5.10 (CVE-2020-8694); run as root or grant read access to measure energy"


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class CpuSensors:
    """Discovers the readable files under ``sys_root`` once; ``read()`` samples them."""

    def __init__(self, sys_root: Path | str = "/sys"):
        root = Path(sys_root)
        self.absent: dict[str, str | None] = {}
        cpus = root / "devices" / "system" / "cpu"
        self.freq_files = sorted(p for p in cpus.glob("cpu[0-9]*/cpufreq/scaling_cur_freq") if _read_int(p))
        self.absent["frequency"] = None if self.freq_files else \
            f"no readable {cpus}/cpu*/cpufreq/scaling_cur_freq (a VM or a kernel without a cpufreq driver exposes none)"
        self.temp_files = self._temperature_files(root)
        self.absent["temperature"] = None if self.temp_files else \
            f"no readable thermal zone ({root}/class/thermal/thermal_zone*/temp) nor hwmon sensor " \
            f"({root}/class/hwmon/hwmon*/temp*_input)"
        self.rapl, self.absent["energy"] = self._rapl_domains(root / "class" / "powercap")

    @staticmethod
    def _temperature_files(root: Path) -> list[tuple[str, Path]]:
        found = []
        for zone in sorted((root / "class" / "thermal").glob("thermal_zone*")):
            if _read_int(zone / "temp") is not None:
                kind = (zone / "type").read_text().strip() if (zone / "type").exists() else ""
                found.append((f"{zone.name}/{kind or '?'}", zone / "temp"))
        for mon in sorted((root / "class" / "hwmon").glob("hwmon*")):
            name = (mon / "name").read_text().strip() if (mon / "name").exists() else mon.name
            for sensor in sorted(mon.glob("temp*_input")):
                if _read_int(sensor) is None:
                    continue
                label = sensor.with_name(sensor.name.replace("_input", "_label"))
                found.append((f"{name}/{label.read_text().strip() if label.exists() else sensor.name[:-6]}", sensor))
        return found

    @staticmethod
    def _rapl_domains(powercap: Path) -> tuple[list[tuple[str, Path, int | None]], str | None]:
        tops = sorted(d for d in powercap.glob("intel-rapl:*") if d.name.count(":") == 1)
        if not tops:
            return [], f"no RAPL domains ({powercap}/intel-rapl:*: no powercap RAPL driver, e.g. in a VM or on ARM)"
        domains, unreadable = [], []
        for d in tops:
            name = (d / "name").read_text().strip() if (d / "name").exists() else d.name
            if not name.startswith("package"):
                continue
            try:
                int((d / "energy_uj").read_text())
            except PermissionError:
                unreadable.append(name)
                continue
            except (OSError, ValueError):
                continue
            domains.append((name, d / "energy_uj", _read_int(d / "max_energy_range_uj")))
        if domains:
            return domains, None
        if unreadable:
            return [], f"RAPL {', '.join(unreadable)} energy_uj {RAPL_ROOT_ONLY}"
        return [], f"no readable RAPL package domain under {powercap}"

    def read(self) -> dict:
        """{"cpu_mhz": [...], "temps_c": {...}, "energy_uj": {domain: counter}} of what is readable now."""
        out: dict = {}
        mhz = [v / 1000.0 for v in (_read_int(p) for p in self.freq_files) if v]
        if mhz:
            out["cpu_mhz"] = mhz
        temps = {name: v / 1000.0 for name, p in self.temp_files if (v := _read_int(p)) is not None}
        if temps:
            out["temps_c"] = temps
        energy = {name: v for name, p, _ in self.rapl if (v := _read_int(p)) is not None}
        if energy:
            out["energy_uj"] = energy
        return out

    def ranges(self) -> dict[str, int | None]:
        return {name: rng for name, _, rng in self.rapl}


def with_power(samples: list[tuple[float, dict]], ranges: dict[str, int | None]) -> list[tuple[float, dict]]:
    """Each sample after the first gains ``cpu_power_w``: the package energy used since the
    previous sample over the time between them (a counter that went down wrapped at its range)."""
    for (t0, a), (t1, b) in pairwise(samples):
        ea, eb = a.get("energy_uj"), b.get("energy_uj")
        if not ea or not eb or t1 <= t0 or set(ea) != set(eb):
            continue
        used = 0
        for name in eb:
            delta = eb[name] - ea[name]
            if delta < 0:
                if not ranges.get(name):
                    break
                delta += ranges[name]
            used += delta
        else:
            b["cpu_power_w"] = used / 1e6 / (t1 - t0)
    return samples


def summarize(sensors: CpuSensors, samples: list[tuple[float, dict]], interval_ms: int) -> dict:
    """Clock, temperature and energy over the run; each with ``absent`` (None, or why)."""
    out: dict = {"interval_ms": interval_ms, "samples": len(samples)}
    mhz = [sum(s["cpu_mhz"]) / len(s["cpu_mhz"]) for _, s in samples if s.get("cpu_mhz")]
    out["frequency"] = {"source": "cpufreq scaling_cur_freq (mean over the CPUs per sample)", "absent": sensors.absent["frequency"]}
    if mhz:
        out["frequency"].update(min_mhz=round(min(mhz), 1), mean_mhz=round(sum(mhz) / len(mhz), 1), max_mhz=round(max(mhz), 1))
    elif not out["frequency"]["absent"]:
        out["frequency"]["absent"] = "no sample was taken"
    hottest = [max(s["temps_c"].values()) for _, s in samples if s.get("temps_c")]
    out["temperature"] = {"sensors": [name for name, _ in sensors.temp_files], "absent": sensors.absent["temperature"]}
    if hottest:
        # first vs last: a rise while timing means the figures are not from a thermal steady state
        out["temperature"].update(first_c=hottest[0], last_c=hottest[-1], max_c=max(hottest))
    elif not out["temperature"]["absent"]:
        out["temperature"]["absent"] = "no sample was taken"
    watts = [s["cpu_power_w"] for _, s in samples if "cpu_power_w" in s]
    out["energy"] = {"source": "RAPL " + ", ".join(name for name, _, _ in sensors.rapl) if sensors.rapl else "RAPL",
                     "absent": sensors.absent["energy"]}
    if watts:
        span = samples[-1][0] - samples[0][0]
        out["energy"].update(mean_power_w=round(sum(watts) / len(watts), 3),
                             joules=round(sum(watts) / len(watts) * span, 2), over_s=round(span, 1))
    elif not out["energy"]["absent"]:
        out["energy"]["absent"] = "fewer than two RAPL readings"
    return out
