"""Writing a bundle derived from an FP32 bundle (INT8 Q/DQ, FP16): each member
transformed, the members merged again with ``armscope.export.merge`` (so the ensemble
graph is exactly the transformed members plus ``Mean``), manifest copied with
new hashes, precision and a ``quantization`` block."""
from __future__ import annotations

import copy
import datetime as dt
import shutil
from pathlib import Path

import onnx

import armscope
from armscope.core.bundle import Bundle, MANIFEST, sha256_file
from armscope.core.errors import ArmscopeError
from armscope.export.merge import merge_members


def refuse_derived_source(bundle: Bundle, action: str) -> None:
    """Only an FP32, never-quantized bundle can be the source of a reduced-precision one."""
    m = bundle.manifest
    if m["precision"] != "fp32" or "quantization" in m:
        raise ArmscopeError(
            f"{bundle.root / MANIFEST}: field precision: bundle is already {m['precision']}"
            f"{' (has a quantization block)' if 'quantization' in m else ''}; {action} needs the FP32 bundle "
            f"it was made from ({m.get('quantization', {}).get('source', {}).get('path', 'the exported bundle')})")


def write_graphs(source: Bundle, folder: Path, transform) -> tuple[list[Path], Path]:
    """``transform(src, dst, index)`` writes each member; returns member paths and the merged ensemble."""
    (folder / "members").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (entry, src) in enumerate(zip(source.manifest["members"], source.member_paths)):
        dst = folder / entry["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        transform(src, dst, i)
        paths.append(dst)
    merged = merge_members(paths)
    # per-member inferred shapes use symbolic dims ('unk__N') minted per graph, which can clash
    # between members in one graph (ONNX Runtime then reuses buffers of the wrong size)
    del merged.graph.value_info[:]
    ensemble = folder / source.manifest["ensemble"]["file"]
    onnx.save(merged, str(ensemble))
    return paths, ensemble


def move_graphs(source: Bundle, src_folder: Path, stage: Path) -> None:
    for entry in source.manifest["members"] + [source.manifest["ensemble"]]:
        dst = stage / entry["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src_folder / entry["file"]), str(dst))


def copy_front(source: Bundle, stage: Path, manifest: dict) -> None:
    """The source's uint8 front (``armscope.core.front``), if it has one, into a bundle
    derived from it (FP16, INT8, a subset of members), and its ``uint8_front`` block
    into that bundle's ``manifest``. The front takes the camera crop and makes the
    float32 input every precision's graphs take, so it is the same file. Its parity
    was measured on the source's graphs: where the front made exactly the CPU's pixels
    (max |pixel| 0) every graph gets the same input either way and the parity holds
    for this bundle too; otherwise the probability part is not claimed for it."""
    block = source.manifest.get("uint8_front")
    if block is None:
        return
    shutil.copy2(source.root / block["file"], stage / block["file"])
    block = copy.deepcopy(block)
    parity = block.get("parity", {})
    parity["measured_on"] = {"bundle": source.manifest["name"], "ensemble_sha256": source.manifest["ensemble"]["sha256"]}
    if parity.get("max_abs_pixel") != 0:
        for key in ("max_abs_delta_p", "decision_flips", "cam_pearson_min"):
            parity[key] = None
        parity["note"] = ("the front's pixels differ from the CPU preprocessing, so its effect on this bundle's "
                          "graphs is not measured: 'armscope front --bundle THIS --images FRAMES --force'")
    else:
        parity["note"] = "bit-identical input pixels: the same outputs for this bundle's graphs either way"
    manifest["uint8_front"] = block


def derived_manifest(source: Bundle, stage: Path, precision: str, block: dict, name_suffix: str) -> dict:
    manifest = copy.deepcopy(source.manifest)
    copy_front(source, stage, manifest)
    manifest["name"] = f"{source.manifest['name']}-{name_suffix}"
    manifest["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    manifest["precision"] = precision
    for entry in manifest["members"] + [manifest["ensemble"]]:
        entry.pop("parity_max_abs_probs", None)  # measured for the FP32 export, not this graph
        path = stage / entry["file"]
        if not path.is_file():
            raise ArmscopeError(f"{path}: missing after conversion")
        entry["sha256"] = sha256_file(path)
    manifest.pop("engines", None)  # engines are built from this bundle's graphs, on the target
    manifest["quantization"] = {
        **block,
        "source": {"path": str(source.root), "name": source.manifest["name"],
                   "ensemble_sha256": source.manifest["ensemble"]["sha256"]},
    }
    producer = dict(manifest.get("producer", {}))
    producer["armscope"] = armscope.__version__
    producer["onnx"] = onnx.__version__
    try:
        import onnxruntime

        producer["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    manifest["producer"] = producer
    return manifest


def subset_bundle(source: Bundle, members: list[int], out: Path, force: bool = False) -> Path:
    """A bundle of some of ``source``'s members (same manifest otherwise), merged again.
    Used to drop a member, and by the tests to keep calibration runs short."""
    from armscope.core.bundle import staged_directory, write_manifest

    picked = [source.manifest["members"][i] for i in members]
    with staged_directory(Path(out), overwrite=force) as stage:
        (stage / "members").mkdir()
        paths = []
        for entry in picked:
            shutil.copy2(source.root / entry["file"], stage / entry["file"])
            paths.append(stage / entry["file"])
        onnx.save(merge_members(paths), str(stage / source.manifest["ensemble"]["file"]))
        manifest = copy.deepcopy(source.manifest)
        copy_front(source, stage, manifest)
        manifest["name"] = f"{source.manifest['name']}-members-{'-'.join(map(str, members))}"
        manifest["members"] = copy.deepcopy(picked)
        manifest["ensemble"] = {"file": source.manifest["ensemble"]["file"],
                                "sha256": sha256_file(stage / source.manifest["ensemble"]["file"])}
        write_manifest(stage, manifest)
    return Path(out)
