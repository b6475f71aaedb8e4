"""An optional uint8 front for a bundle: the camera's centre crop goes into
the graph as it comes off the sensor (uint8, BGR, e.g. 1024 x 1024 x 3 =
3 MB) and the graph itself resizes, converts the colour order and makes the
float32 model input, instead of the host uploading a float32 640 x 640 x 3
frame (4.9 MB) it prepared on its CPU.

Why a separate file composed at load time: existing bundles and their hashes
(fidelity records, TensorRT engines) stay as they are; the front is one small
graph (``front_uint8.onnx``, a few kB) named in the manifest's ``uint8_front``
block with its sha256, and a backend asked to feed uint8 composes it in front
of the graph(s) it runs (``compose``). The float32 input keeps working.

Why not ONNX ``Resize``: the bundles are made with OpenCV's ``INTER_AREA``
(``armscope.core.preprocess``), which ``Resize`` does not have. Its nearest
(opset 18) is ``mode=linear`` with ``antialias=1``, a triangle filter
stretched by the scale, where ``INTER_AREA`` is a box filter (each output
pixel the mean of the input area it covers): a different image, so different
probabilities and maps. But every OpenCV interpolation is a linear map along
each axis, so its exact weights are OpenCV's own output for an identity
image, and the 2-D resize is ``W_rows @ X @ W_cols^T``. For a rational scale
(1024 -> 640 is 8 -> 5) the weights repeat in blocks, and the front is two
``MatMul`` with small constant matrices over reshaped views (the colour
flip folded into the second), then ``Round`` (OpenCV rounds its uint8 result
half to even, as ``Round`` does) and ``Clip``: the same pixels as
``preprocess_frame``, at any opset from 13, with operators TensorRT parses.
Where the weights do not form blocks (a scale with a long period, a kernel
wider than a block) the front gathers the few taps each output pixel uses
(``Gather``, ``Mul``, ``Add``).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.core.preprocess import INTERPOLATIONS, Preprocessing

FILE = "front_uint8.onnx"
INPUT = "camera_bgr"
OUTPUT = "front_image"  # connected to the bundle graphs' ``image`` input by ``compose``
PREFIX = "armscope_front/"  # the front's node and tensor names in a composed graph


def axis_weights(n_in: int, n_out: int, interpolation: str) -> np.ndarray:
    """(n_out, n_in) float32: OpenCV's resize along one axis, read off OpenCV
    itself by resizing an identity image (exact by construction)."""
    import cv2

    eye = np.eye(n_in, dtype=np.float32)
    return cv2.resize(eye, (n_in, n_out), interpolation=INTERPOLATIONS[interpolation])


def blocks(weights: np.ndarray) -> np.ndarray | None:
    """The (q, p) block that ``weights`` repeats along its diagonal, or None."""
    n_out, n_in = weights.shape
    g = math.gcd(n_in, n_out)
    q, p = n_out // g, n_in // g
    if p > 64:
        return None
    tiled = weights.reshape(g, q, g, p)
    block = tiled[0, :, 0, :]
    diag = np.stack([tiled[i, :, i, :] for i in range(g)])
    off = tiled.copy()
    for i in range(g):
        off[i, :, i, :] = 0
    return block if np.array_equal(diag, np.broadcast_to(block, diag.shape)) and not off.any() else None


def _taps(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (K, n_out): the K input pixels each output uses."""
    k = int((weights != 0).sum(axis=1).max())
    idx = np.zeros((k, weights.shape[0]), np.int64)
    w = np.zeros((k, weights.shape[0]), np.float32)
    for i, row in enumerate(weights):
        nz = np.flatnonzero(row)
        idx[: len(nz), i], w[: len(nz), i] = nz, row[nz]
    return idx, w


def check_spec(spec: Preprocessing) -> None:
    block = spec.to_manifest()
    if spec.input is not None and spec.input.kind == "grey":
        raise ArmscopeError("preprocessing.input is grey: the uint8 front makes RGB inputs only")
    if spec.center_crop <= 0:
        raise ArmscopeError("preprocessing.center_crop is 0 (whole images padded to a square): the uint8 front "
                            "takes a fixed camera crop; only bundles with a centre crop get one")
    wanted = {"channel_order": "RGB", "layout": "NHWC", "dtype": "float32", "value_range": [0.0, 255.0]}
    for key, value in wanted.items():
        if key in block and block[key] != value:
            raise ArmscopeError(f"preprocessing.{key} is {block[key]!r}: the uint8 front makes {value!r} only")


def front_model(spec: Preprocessing, opset: int, ir_version: int):
    """The front as an ONNX model: ``camera_bgr`` uint8 [N, C, C, 3] (the BGR
    centre crop) -> ``front_image`` float32 [N, S, S, 3] (RGB 0..255, what
    ``preprocess_frame`` makes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_spec(spec)
    c, s = spec.center_crop, spec.resize
    weights = axis_weights(c, s, spec.interpolation)
    flip = np.eye(3, dtype=np.float32)[:, ::-1]  # BGR -> RGB as a 3 x 3 map on the channel axis
    nodes, inits = [helper.make_node("Cast", [INPUT], ["x"], to=TensorProto.FLOAT)], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    block = blocks(weights)
    if block is not None:
        q, p = block.shape
        g = c // p
        # rows: [N, g, p, C*3] -> [N, g, q, C*3]; columns: [N, S, g, p*3] -> [N, S, g, q*3]
        # the weights at the rank of the data (1 x 1 x ...): TensorRT's ONNX parser would otherwise insert a
        # broadcast Shuffle of its own naming, which a build could not find to keep in FP32 (trt_engine)
        nodes += [helper.make_node("Reshape", ["x", const("rows_shape", [-1, g, p, c * 3])], ["xr"]),
                  helper.make_node("MatMul", [const("rows_w", block[None, None]), "xr"], ["yr"]),
                  helper.make_node("Reshape", ["yr", const("cols_shape", [-1, s, g, p * 3])], ["yc"]),
                  helper.make_node("MatMul", ["yc", const("cols_w", np.kron(block.T, flip)[None, None])], ["z"]),
                  helper.make_node("Reshape", ["z", const("out_shape", [-1, s, s, 3])], ["resized"])]
        how = f"two MatMul of OpenCV's {spec.interpolation} weights in {q}x{p} blocks"
    else:
        idx, w = _taps(weights)
        nodes.append(helper.make_node("Gather", ["x", const("bgr_to_rgb", np.array([2, 1, 0], np.int64))],
                                      ["x_rgb"], axis=3))
        src = "x_rgb"
        for axis, shape in ((1, [1, s, 1, 1]), (2, [1, 1, s, 1])):
            terms = []
            for t in range(len(idx)):
                nodes += [helper.make_node("Gather", [src, const(f"i{axis}_{t}", idx[t])], [f"g{axis}_{t}"], axis=axis),
                          helper.make_node("Mul", [f"g{axis}_{t}", const(f"w{axis}_{t}", w[t].reshape(shape))],
                                           [f"m{axis}_{t}"])]
                terms.append(f"m{axis}_{t}")
            nodes.append(helper.make_node("Sum", terms, [f"axis{axis}"]))
            src = f"axis{axis}"
        nodes.append(helper.make_node("Identity", [src], ["resized"]))
        how = f"Gather of OpenCV's {spec.interpolation} weights, {len(idx)} taps an output pixel"
    nodes += [helper.make_node("Round", ["resized"], ["rounded"]),
              helper.make_node("Clip", ["rounded", const("lo", np.float32(0)), const("hi", np.float32(255))],
                               [OUTPUT])]
    graph = helper.make_graph(
        nodes, "armscope_uint8_front",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", c, c, 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", s, s, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="armscope")
    model.ir_version = ir_version
    model.doc_string = how
    onnx.checker.check_model(model)
    return model, how


def prefixed(front) -> None:
    """Give every node and inner tensor of ``front`` (an ONNX ModelProto) the
    ``PREFIX``, in place; its input and output keep their names. Why: the
    composed graph must not collide with a lab model's own tensor names, and a
    TensorRT build finds the front's layers by this prefix to keep them in FP32
    (``armscope.calibration.trt_build``)."""
    keep = {INPUT, OUTPUT}

    def rename(name: str) -> str:
        return name if not name or name in keep or name.startswith(PREFIX) else PREFIX + name

    graph = front.graph
    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        node.name = PREFIX + (node.name or f"{node.op_type}_{node.output[0]}")
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for info in graph.value_info:
        info.name = rename(info.name)


def tf32_exact(front) -> tuple[bool, str]:
    """Whether the front (an ONNX ModelProto) makes the same pixels when its
    ``MatMul`` run in TF32, a GPU's default for float32 matrix products
    (TensorRT: ``BuilderFlag.TF32``, on by default; it rounds each operand to
    10 explicit mantissa bits, i.e. 11 significant bits, and accumulates in
    float32). The first MatMul multiplies pixels (integers 0..255, exact in
    TF32) by the weights; its results feed the second MatMul, so they must
    fit 11 significant bits too: with every weight a multiple of 2**-k and
    each output row summing to at most 1, a result is a multiple of 2**-k
    below 256, which needs 8 + k bits, so k <= 3. The second MatMul's
    products are then multiples of 2**-2k below 256 (8 + 2k <= 14 bits),
    exact in the float32 accumulator. The Gather form (no MatMul) and
    elementwise layers are not affected by TF32. Returns (exact, why)."""
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in front.graph.initializer}
    # (weights, the axis summed into one output): A @ X sums A's last axis, X @ B sums B's second-last
    used = [(constants[name], -1 if position == 0 else -2) for node in front.graph.node if node.op_type == "MatMul"
            for position, name in enumerate(node.input) if name in constants]
    if not used:
        return True, "no MatMul in the front (Gather form): TF32 does not apply"
    for weights, axis in used:
        scaled = weights * 8
        if (weights < 0).any() or (weights.sum(axis=axis) > 1 + 1e-12).any() or not np.array_equal(scaled, np.round(scaled)):
            return False, ("the front's MatMul weights are not all non-negative multiples of 1/8 summing to at "
                           "most 1 per output, so TF32 would round its intermediate pixels")
    return True, "every MatMul weight is a non-negative multiple of 1/8, at most 1 per output: exact in TF32"


def compose(front_path: Path, graph_path: Path, out_path: Path) -> Path:
    """``graph_path`` (a bundle graph with input ``image``) with the front in
    front of it, written to ``out_path``: input ``camera_bgr``, the graph's
    outputs; the front's nodes and inner tensors named ``PREFIX...``."""
    import onnx
    from onnx import compose as onnx_compose

    graph = onnx.load(str(graph_path))
    front = onnx.load(str(front_path))
    prefixed(front)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    front_opset = next(o.version for o in front.opset_import if o.domain in ("", "ai.onnx"))
    if opset != front_opset:  # the front's operators mean the same from opset 13 on
        del front.opset_import[:]
        front.opset_import.append(onnx.helper.make_opsetid("", opset))
    front.ir_version = graph.ir_version
    try:
        merged = onnx_compose.merge_models(front, graph, io_map=[(OUTPUT, "image")])
    except Exception as exc:  # onnx raises ValueError / checker errors with long texts
        raise ArmscopeError(f"{graph_path}: could not compose the uint8 front with it ({str(exc)[:300]})") from None
    onnx.save(merged, str(out_path))
    return out_path


def entry(bundle) -> dict | None:
    """The bundle's ``uint8_front`` manifest block (None: it has no front)."""
    return bundle.manifest.get("uint8_front")


def crop_shape(spec: Preprocessing) -> tuple[int, int, int]:
    """(C, C, 3): one camera crop as the front takes it (its input is N of them)."""
    return (spec.center_crop, spec.center_crop, 3)


def camera_crop(frame_bgr: np.ndarray, spec: Preprocessing, source: str = "frame") -> np.ndarray:
    """What the front takes for one frame: the centre crop, uint8 BGR (C, C, 3),
    contiguous (a runtime's input buffer), nothing else done on the host."""
    if frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3 or frame_bgr.dtype != np.uint8:
        raise ArmscopeError(f"{source}: expected a BGR uint8 image (H, W, 3), got {frame_bgr.dtype} {frame_bgr.shape}")
    h, w = frame_bgr.shape[:2]
    c = spec.center_crop
    if h < c or w < c:
        raise ArmscopeError(f"{source}: image is {w}x{h}, smaller than the {c}x{c} centre crop the bundle expects")
    top, left = (h - c) // 2, (w - c) // 2
    return np.ascontiguousarray(frame_bgr[top: top + c, left: left + c])


FEEDS = ("float32", "uint8")


def require(bundle, feed: str) -> None:
    """Refuse ``feed`` uint8 for a bundle without a front, and any unknown feed."""
    if feed not in FEEDS:
        raise ArmscopeError(f"feed {feed!r}: expected one of {', '.join(FEEDS)}")
    if feed == "uint8" and entry(bundle) is None:
        raise ArmscopeError(f"{bundle.root}: feed uint8 needs the bundle's uint8 front (manifest field uint8_front); "
                            f"'armscope front --bundle {bundle.root} --images FRAMES' adds it")


def composed(bundle, paths: list[Path]) -> tuple[object, list[Path]]:
    """(temporary directory, graphs): each of ``paths`` with the bundle's front
    composed in front of it, for a backend to load; the caller cleans the
    directory up (``TemporaryDirectory.cleanup``) when it releases the graphs."""
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="armscope-front-")
    try:
        front_path = bundle.root / entry(bundle)["file"]
        return tmp, [compose(front_path, p, Path(tmp.name) / f"{i}-{Path(p).name}") for i, p in enumerate(paths)]
    except BaseException:
        tmp.cleanup()
        raise
