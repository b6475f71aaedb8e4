"""Calibration sets: camera frames sampled from images and videos, put through
the daemon's own preprocessing (``armscope.core.preprocess.preprocess_frame``), and
stored with a manifest of where every frame came from.

Sampling is stratified: classes (when an input directory has one subfolder per
class) take turns, and within a class the source files take turns, so a long
video or one huge field image cannot dominate the set. Frames without tissue
(blank glass) or out of focus are skipped and counted with the daemon's tissue
gate (``armscope.core.tissue.TissueGate``, the same thresholds the daemon uses), so INT8
ranges are fitted to what the model will actually be asked to classify.

File format (``.npz``, loadable with ``allow_pickle=False``):

* ``images``: uint8 (N, S, S, 3) RGB, S the preprocessing's ``resize`` (the
  bundle's input size, when made with ``--bundle``). ``preprocess_frame`` resizes a uint8
  crop and only then casts to float32, so its output is integer-valued and
  uint8 stores it losslessly (a quarter of the size); ``load_calibration_set``
  casts back to float32, bit-identical to what the daemon feeds the model.
* ``manifest``: a JSON string: format version, preprocessing, per-frame source
  (file, frame index or window, class, tissue measures), skipped counts.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import FILE_SUFFIXES as IMAGE_SUFFIXES
from armscope.core.preprocess import Preprocessing, crop_box, gate_region, preprocess_frame, read_frame

log = logging.getLogger(__name__)

FORMAT = "armscope-calibration-set"
FORMAT_VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm")
MIN_SIZE = 1


def tissue_gate():
    """The daemon's tissue/focus gate (edge/tissue.py), reused so calibration
    skips exactly the frames the daemon would not classify."""
    from armscope.core.tissue import TissueGate

    return TissueGate()


@dataclass
class Source:
    path: Path
    label: str | None  # class subfolder name, if the input directory has them
    kind: str  # "image" or "video"


@dataclass
class CalibrationSet:
    path: Path
    images: np.ndarray  # float32 (N, H, W, 3), exactly preprocess_frame's output
    manifest: dict

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_manifest(self.manifest["preprocessing"])

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def discover_sources(inputs: list[Path]) -> list[Source]:
    """Files named directly, and media files under directories (recursively).
    A directory whose subfolders hold the media gives each file the subfolder's
    name as its class label."""
    sources: list[Source] = []
    for item in inputs:
        item = Path(item)
        if item.is_file():
            kind = _kind(item)
            if kind is None:
                raise ArmscopeError(f"{item}: not an image or video file (expected one of "
                                    f"{', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
            sources.append(Source(item, None, kind))
        elif item.is_dir():
            subdirs = sorted(d for d in item.iterdir() if d.is_dir() and not d.name.startswith("."))
            found = []
            for path in sorted(item.rglob("*")):
                kind = _kind(path) if path.is_file() else None
                if kind is None or any(part.startswith(".") for part in path.relative_to(item).parts):
                    continue
                rel = path.relative_to(item)
                label = rel.parts[0] if subdirs and len(rel.parts) > 1 else None
                found.append(Source(path, label, kind))
            if not found:
                raise ArmscopeError(f"{item}: no image or video files in this directory")
            sources.extend(found)
        else:
            raise ArmscopeError(f"{item}: no such file or directory")
    return sources


def _windows(shape, frame_size: tuple[int, int] | None) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) camera-sized windows cut from a larger still
    image; the whole image when no frame size is given or it is too small."""
    h, w = shape[:2]
    if frame_size is None:
        return [(0, 0, h, w)]
    fw, fh = frame_size
    if fw > w or fh > h:
        return [(0, 0, h, w)]
    ys = np.linspace(0, h - fh, max(1, int(np.ceil(h / fh)) + (1 if h > fh else 0))).astype(int)
    xs = np.linspace(0, w - fw, max(1, int(np.ceil(w / fw)) + (1 if w > fw else 0))).astype(int)
    return [(int(y), int(x), fh, fw) for y in sorted(set(ys)) for x in sorted(set(xs))]


class _SourceFrames:
    """Lazily enumerates one source's candidate frames in a spread-out order."""

    def __init__(self, source: Source, frame_size, per_video: int, rng: np.random.Generator,
                 spec: Preprocessing | None = None):
        self.source = source
        self.error: str | None = None
        self._image = None
        self._capture = None
        if source.kind == "image":
            try:  # DICOM, 16-bit and grey files converted as the bundle says (armscope.core.preprocess)
                image = read_frame(source.path, spec or Preprocessing())[0]
            except ArmscopeError:
                image = None
            if image is None:
                self.error = "unreadable"
                self.candidates = []
                return
            self._image = image
            self.candidates = [("window", w) for w in _windows(image.shape, frame_size)]
        else:
            capture = cv2.VideoCapture(str(source.path))
            count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if capture.isOpened() else 0
            if count <= 0:
                capture.release()
                self.error = "unreadable"
                self.candidates = []
                return
            self._capture = capture
            picks = np.unique(np.linspace(0, count - 1, min(count, per_video)).astype(int))
            self.candidates = [("frame", int(i)) for i in picks]
        order = rng.permutation(len(self.candidates))
        self.candidates = [self.candidates[i] for i in order]

    def read(self, candidate) -> np.ndarray | None:
        what, where = candidate
        if what == "window":
            top, left, h, w = where
            return self._image[top : top + h, left : left + w]
        self._capture.set(cv2.CAP_PROP_POS_FRAMES, where)
        ok, frame = self._capture.read()
        return frame if ok else None

    def close(self):
        if self._capture is not None:
            self._capture.release()
        self._image = None


def _describe(candidate) -> dict:
    what, where = candidate
    if what == "window":
        top, left, h, w = where
        return {"window": {"top": top, "left": left, "height": h, "width": w}}
    return {"frame_index": where}


def parse_frame_size(text: str | None, option: str = "--frame-size") -> tuple[int, int] | None:
    """``WIDTHxHEIGHT`` (e.g. 1600x1200) -> (width, height); None for an empty value."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ArmscopeError(f"{option} {text!r}: expected WIDTHxHEIGHT, e.g. 1600x1200") from None
    if w < 1 or h < 1:
        raise ArmscopeError(f"{option} {text!r}: width and height must be positive")
    return w, h


def build_calibration_set(
    inputs: list[Path],
    out: Path,
    size: int,
    spec: Preprocessing | None = None,
    frame_size: tuple[int, int] | str | None = None,
    per_video: int = 64,
    seed: int = 0,
    gate=None,
    force: bool = False,
    bundle: Path | None = None,
) -> dict:
    """Sample ``size`` usable frames from ``inputs`` and write ``out`` (.npz).
    Returns the set's manifest. Nothing is written unless the whole set is made.
    ``bundle``: take ``spec`` and the tissue gate (its modality's, e.g. MRI: air) from
    this bundle where they are not given; ``frame_size`` may be ``WIDTHxHEIGHT`` text."""
    from armscope.core.bundle import check_out_apart, load_bundle
    from armscope.core.errors import check_output_file

    out = Path(out)
    check_out_apart(out, [*inputs, bundle])  # --force would replace an input
    check_output_file(out, "--out")
    if isinstance(frame_size, str):
        frame_size = parse_frame_size(frame_size)
    if bundle is not None:
        loaded = load_bundle(bundle)
        spec = spec or loaded.preprocessing
        if gate is None and loaded.manifest.get("tissue_gate"):
            from armscope.core.tissue import TissueGate

            gate = TissueGate.from_manifest(loaded.manifest)
    if size < MIN_SIZE:
        raise ArmscopeError(f"--size {size}: a calibration set needs at least {MIN_SIZE} frame")
    if out.suffix != ".npz":
        raise ArmscopeError(f"{out}: the calibration set is written as .npz (name it CALIB.npz)")
    if out.exists() and not force:
        raise ArmscopeError(f"{out}: already exists (use --force to replace it)")
    spec = spec or Preprocessing()
    gate = gate or tissue_gate()
    rng = np.random.default_rng(seed)
    sources = discover_sources(inputs)

    by_label: dict[str | None, list[Source]] = {}
    for source in sources:
        by_label.setdefault(source.label, []).append(source)
    skipped: Counter = Counter()
    skipped_files: dict[str, str] = {}
    queues: dict[str | None, list[_SourceFrames]] = {}
    for label, group in by_label.items():
        opened = []
        for source in group:
            frames = _SourceFrames(source, frame_size, per_video, rng, spec)
            if frames.error:
                skipped[frames.error] += 1
                skipped_files[str(source.path)] = frames.error
                continue
            opened.append(frames)
        if opened:
            queues[label] = opened
    if not queues:
        raise ArmscopeError(
            f"no readable images or videos among {len(sources)} file(s) in {', '.join(map(str, inputs))}")

    images: list[np.ndarray] = []
    records: list[dict] = []
    labels = list(queues)
    cursor = {label: 0 for label in labels}
    try:
        while len(images) < size and any(queues.values()):
            for label in labels:
                if len(images) >= size:
                    break
                group = queues[label]
                if not group:
                    continue
                # round-robin over this class's sources; a source with no
                # candidates left drops out
                frames = group[cursor[label] % len(group)]
                cursor[label] += 1
                if not frames.candidates:
                    frames.close()
                    group.remove(frames)
                    continue
                candidate = frames.candidates.pop(0)
                frame = frames.read(candidate)
                if frame is None:
                    skipped["unreadable_frame"] += 1
                    continue
                top, left, crop = crop_box(frame.shape, spec)
                if spec.center_crop and (top < 0 or left < 0):  # center_crop 0: whole images, padded
                    skipped["smaller_than_crop"] += 1
                    continue
                measures = gate.measure(gate_region(frame, spec))
                reason = gate.verdict(measures)
                if reason is not None:
                    skipped[reason] += 1
                    continue
                source_name = str(frames.source.path)
                x = preprocess_frame(np.ascontiguousarray(frame), spec, source=source_name)
                images.append(x.astype(np.uint8))
                records.append({"source": source_name, "class": label, **_describe(candidate),
                                "frame_shape": list(frame.shape[:2]), **measures})
    finally:
        for group in queues.values():
            for frames in group:
                frames.close()

    if len(images) < size:
        detail = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(skipped.items())) or "none skipped"
        raise ArmscopeError(
            f"{', '.join(map(str, inputs))}: only {len(images)} usable frame(s), --size asks for {size} "
            f"(skipped: {detail}); add frames, pass --frame-size to cut camera-sized windows from "
            f"large images, or lower --size")

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "size": len(images),
        "seed": seed,
        "frame_size": list(frame_size) if frame_size else None,
        "preprocessing": spec.to_manifest(),
        "preprocess_function": "armscope.core.preprocess.preprocess_frame",
        "storage": "uint8 (lossless: preprocess_frame output is integer-valued); cast to float32 to use",
        "tissue_gate": {k: v for k, v in vars(gate).items()} if hasattr(gate, "__dict__") else str(gate),
        "classes": sorted(str(k) for k in queues if k is not None),
        "per_class": dict(Counter(str(r["class"]) for r in records)),
        "per_source": dict(Counter(r["source"] for r in records)),
        "skipped": dict(skipped),
        "skipped_files": skipped_files,
        "frames": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.npz")
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, images=np.stack(images), manifest=np.array(json.dumps(manifest)))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def load_calibration_set(path: Path, spec: Preprocessing | None = None) -> CalibrationSet:
    """Read and check a calibration set; a corrupt or foreign file fails naming it."""
    path = Path(path)
    if not path.is_file():
        raise ArmscopeError(f"{path}: no such calibration set (make one with 'armscope calibration-set')")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a plain .npy array: no manifest, no preprocessing
            raise ArmscopeError(f"{path}: a single numpy array, not an armscope calibration set (.npz with "
                                "'images' and 'manifest'); make one with 'armscope calibration-set'")
        with loaded as data:
            if "images" not in data.files or "manifest" not in data.files:
                raise ArmscopeError(f"{path}: not an armscope calibration set (arrays {data.files}, "
                                    f"expected 'images' and 'manifest')")
            images = data["images"]
            manifest = json.loads(str(data["manifest"]))
    except ArmscopeError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, json.JSONDecodeError, KeyError) as exc:
        raise ArmscopeError(f"{path}: corrupt or unreadable calibration set ({type(exc).__name__}: "
                            f"{str(exc)[:200]}); rebuild it with 'armscope calibration-set'") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArmscopeError(f"{path}: field manifest.format: {manifest.get('format')!r} v"
                            f"{manifest.get('format_version')!r}, expected {FORMAT!r} v{FORMAT_VERSION}")
    pre = Preprocessing.from_manifest(manifest["preprocessing"])
    expected = (pre.resize, pre.resize, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ArmscopeError(f"{path}: field images: {images.dtype} {tuple(images.shape)}, expected uint8 "
                            f"(N, {expected[0]}, {expected[1]}, 3)")
    if images.shape[0] != manifest.get("size") or images.shape[0] != len(manifest.get("frames", [])):
        raise ArmscopeError(f"{path}: field manifest.size: {manifest.get('size')} does not match "
                            f"{images.shape[0]} stored frames")
    if spec is not None and pre != spec:
        raise ArmscopeError(
            f"{path}: field manifest.preprocessing: {pre} differs from the bundle's preprocessing {spec}; "
            f"rebuild the set with 'armscope calibration-set --bundle BUNDLE'")
    return CalibrationSet(path, images.astype(np.float32), manifest)
