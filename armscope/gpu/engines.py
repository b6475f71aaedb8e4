"""Where TensorRT engines live, and which ones may run here.

Engines belong to the bundle they were built for: ``armscope build BUNDLE``
writes them into ``BUNDLE/engines/<key>/`` and ``armscope run`` /
``classify --backend auto`` on the same ``BUNDLE`` look there. An engine is
valid only for the exact graphs, precision, TensorRT version, GPU and DLA
core it was compiled for, so all of these make the key (a readable directory
name) and are recorded again in ``<key>/engine.json`` with each engine
file's sha256:

    BUNDLE/engines/fp16-trt10.3.0.30-sm87-nvidia-jetson-agx-orin-bc4acda63578/
        engine.json          key fields, build settings, {graph: {file, sha256, onnx_sha256}}
        member_0.engine ...  per-member engines (the default layout), or ensemble.engine (--layout merged)
    BUNDLE/engines/timing.cache   TensorRT's timing cache, shared by every build on this device

With ``build --feed uint8`` the engines take the camera crop as uint8 through
the bundle's uint8 front (``armscope.core.front``), composed in front of each
graph before TensorRT parses it: the key ends ``-u8`` and the index records
``feed`` and the front's sha256, so float32 and uint8 engine sets live side by
side and a changed front makes its engines stale.

The bundle hash in the key is the sha256 of ``BUNDLE``'s ensemble graph
(manifest ``ensemble.sha256``), which covers its members: an FP16 or INT8
build compiles the derived graphs (``BUNDLE-fp16``, ``BUNDLE-int8``) but is
keyed by, and stored with, the bundle it came from. The manifest is not
changed, so its hashes keep describing the model, and the engines stay a
device-local cache that ``build`` can replace at any time.

When several engine sets fit this device (e.g. FP16 and INT8 builds), the
most recently built one runs: the last ``build`` is what ``run`` uses, and
``describe()`` / the daemon's status say which.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

from armscope.core.bundle import Bundle, sha256_file
from armscope.core.errors import ArmscopeError

ENGINE_DIR = "engines"
INDEX = "engine.json"
TIMING_CACHE = "timing.cache"
FORMAT = 1
LAYOUTS = ("merged", "members")
FEEDS = ("float32", "uint8")


def bundle_hash(bundle: Bundle) -> str:
    """The sha256 that identifies ``bundle``'s model for its engines (its ensemble graph's)."""
    return bundle.manifest["ensemble"]["sha256"]


def graphs_for(bundle: Bundle, layout: str) -> list[str]:
    """The engine graphs a layout runs: ``ensemble``, or ``member_0`` ... ``member_{n-1}``."""
    if layout not in LAYOUTS:
        raise ArmscopeError(f"tensorrt layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return ["ensemble"] if layout == "merged" else [f"member_{i}" for i in range(len(bundle.member_paths))]


def engine_key(source_sha256: str, precision: str, trt_version: str, gpu: dict, dla_core: int | None,
               feed: str = "float32") -> str:
    """The directory name of one engine set: everything an engine is only valid for."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu["name"].lower()).strip("-") or "gpu"
    cc = gpu["compute_capability"].replace(".", "")
    dla = f"-dla{int(dla_core)}" if dla_core is not None else ""
    u8 = "-u8" if feed == "uint8" else ""
    return f"{precision}-trt{trt_version}-sm{cc}-{slug}{dla}-{source_sha256[:12]}{u8}"


def front_sha256(bundle: Bundle) -> str | None:
    """The sha256 of the bundle's uint8 front (manifest ``uint8_front``), None without one."""
    block = bundle.manifest.get("uint8_front")
    return block.get("sha256") if block else None


@dataclass
class EngineSet:
    """One ``engines/<key>/`` directory: where, what it was built for, and its engine files."""

    root: Path
    index: dict

    @property
    def precision(self) -> str:
        return self.index["precision"]

    @property
    def dla_core(self) -> int | None:
        return self.index.get("dla_core")

    @property
    def feed(self) -> str:
        return self.index.get("feed", "float32")   # sets built before the uint8 front took float32

    def path(self, graph: str) -> Path:
        return self.root / self.index["engines"][graph]["file"]

    def has(self, graphs: list[str]) -> bool:
        return all(g in self.index["engines"] for g in graphs)

    def verify(self, graphs: list[str]) -> None:
        """Each engine file present, with the sha256 recorded at build time."""
        for graph in graphs:
            path, want = self.path(graph), self.index["engines"][graph]["sha256"]
            if not path.is_file():
                raise ArmscopeError(f"{path}: engine file missing (listed in {self.root / INDEX}); rebuild it")
            got = sha256_file(path)
            if got != want:
                raise ArmscopeError(f"{path}: sha256 {got[:12]}... differs from {self.root / INDEX}'s "
                                    f"{want[:12]}... (a changed or damaged engine); rebuild it")


def read_index(directory: Path) -> dict | None:
    """``directory/engine.json``, or None where there is none; a damaged one is an error naming it."""
    path = directory / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        fields = ("format", "bundle_sha256", "precision", "tensorrt", "gpu", "compute_capability", "engines")
        if not isinstance(index, dict) or any(f not in index for f in fields) or not isinstance(index["engines"], dict):
            raise ValueError(f"expected an object with {', '.join(fields)}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArmscopeError(f"{path}: not a valid engine index ({str(exc)[:200]}); delete {directory} and rebuild") from None
    return index


def engine_sets(bundle: Bundle) -> list[EngineSet]:
    """Every engine set stored with ``bundle``, newest build first."""
    root = bundle.root / ENGINE_DIR
    if not root.is_dir():
        return []
    found = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):  # not build stages
        index = read_index(directory)
        if index is not None:
            found.append(EngineSet(directory, index))
    return sorted(found, key=lambda s: s.index.get("built", ""), reverse=True)


def mismatch(index: dict, source_sha256: str, trt_version: str, gpu: dict, dla_core: int | None = None,
             feed: str = "float32", front: str | None = None) -> str | None:
    """Why an engine set cannot run here (None when it can); ``front``: the
    bundle's uint8 front sha256, checked for uint8 sets."""
    if index["bundle_sha256"] != source_sha256:
        return "built for another version of this bundle (its ensemble sha256 differs)"
    built_feed = index.get("feed", "float32")
    if built_feed != feed:
        return f"built for feed {built_feed}, feed {feed} was asked for"
    if feed == "uint8" and index.get("front_sha256") != front:
        return "built with another uint8 front (the bundle's front_uint8.onnx changed since)"
    if index["tensorrt"] != trt_version:
        return f"built with TensorRT {index['tensorrt']}, this device has TensorRT {trt_version}"
    if index["compute_capability"] != gpu["compute_capability"]:
        return (f"built for compute capability {index['compute_capability']} ({index['gpu']}), this GPU is "
                f"{gpu['compute_capability']} ({gpu['name']})")
    if index["gpu"] != gpu["name"]:
        return f"built on {index['gpu']}, this GPU is {gpu['name']}"
    if dla_core is not None and index.get("dla_core") != dla_core:
        return f"built for DLA core {index.get('dla_core')}, DLA core {dla_core} was asked for"
    return None


def build_command(bundle: Bundle, precision: str | None = None, layout: str = "members",
                  feed: str = "float32", options: str = "") -> str:
    """The ``armscope build`` command that makes these engines; ``options``: more of its
    options (``--out``, ``--int8-mode``), placed after ``--precision``."""
    cmd = f"armscope build {bundle.root} --precision {precision or bundle.manifest['precision']}{options}"
    return cmd + (" --layout merged" if layout == "merged" else "") + (" --feed uint8" if feed == "uint8" else "")


def find_engines(bundle: Bundle, trt_version: str, gpu: dict, layout: str = "members",
                 dla_core: int | None = None, feed: str = "float32") -> EngineSet:
    """The newest engine set stored with ``bundle`` that runs ``layout`` with ``feed``
    on this TensorRT and GPU, its files checked; else one error saying what was found
    and the command that builds what is missing."""
    if feed not in FEEDS:
        raise ArmscopeError(f"feed {feed!r}: expected one of {', '.join(FEEDS)}")
    graphs = graphs_for(bundle, layout)
    sets = engine_sets(bundle)
    here, front = bundle_hash(bundle), front_sha256(bundle)
    reasons = []
    for engine_set in sets:
        why = mismatch(engine_set.index, here, trt_version, gpu, dla_core, feed, front)
        if why is None and not engine_set.has(graphs):
            why = (f"has engines for {', '.join(sorted(engine_set.index['engines']))}, not the {layout} layout's "
                   f"{', '.join(graphs)}")
        if why is None:
            engine_set.verify(graphs)
            return engine_set
        reasons.append(f"{engine_set.root.name}: {why}")
    precision = sets[0].precision if sets else None
    found = ("; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else "")
             if reasons else f"no engines in {bundle.root / ENGINE_DIR}")
    raise ArmscopeError(f"{bundle.root}: no TensorRT engines for this device ({gpu['name']}, sm "
                        f"{gpu['compute_capability']}, TensorRT {trt_version}): {found}; build them here with: "
                        f"{build_command(bundle, precision, layout, feed)}")


def new_index(source: Bundle, compiled: Bundle, precision: str, trt_version: str, gpu: dict, *,
              dla_core: int | None, int8_mode: str | None, max_batch: int, workspace_mb: int,
              feed: str = "float32", tf32: bool = True) -> dict:
    """engine.json for a set being built; ``add_engine`` fills ``engines``."""
    return {
        "format": FORMAT, "bundle": source.manifest.get("name"), "bundle_sha256": bundle_hash(source),
        "precision": precision, "tensorrt": trt_version, "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"], "dla_core": dla_core,
        "gpu_fallback": dla_core is not None,  # layers DLA cannot run go to the GPU (BuilderFlag.GPU_FALLBACK)
        "compiled_from": {"bundle": str(compiled.root), "precision": compiled.manifest["precision"],
                          "ensemble_sha256": bundle_hash(compiled),
                          "deployable": compiled.manifest.get("quantization", {}).get("deployable", True)},
        "int8_mode": int8_mode, "max_batch": max_batch, "workspace_mb": workspace_mb,
        "feed": feed, "front_sha256": front_sha256(source) if feed == "uint8" else None, "tf32": tf32,
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "engines": {},
    }


def write_index(directory: Path, index: dict) -> None:
    tmp = directory / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(directory / INDEX)
