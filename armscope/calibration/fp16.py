"""FP16 graphs: onnxconverter-common's ``convert_float_to_float16`` with
``keep_io_types=True``, so the bundle's I/O contract (float32 image in, float32
probs/cam, and patch_probs where present, out) is unchanged and the host code is the same. Verified
on ONNX Runtime's CPU provider (which runs most FP16 ops through inserted
casts: correct, not fast; FP16 pays off on a GPU/TensorRT or an FP16 NPU)."""
from __future__ import annotations

from pathlib import Path

import onnx

from armscope.core.errors import require_module

# Kept in FP32: the softmaxes and the share normalisation of the Grad-CAM weights
# (exp/sum in half precision underflows for confident patches).
# ScatterElements (a max pool's gradient, in saliency graphs): ONNX Runtime's CPU provider
# has no float16 kernel for reduction "add", and summing gradients is better in FP32 anyway.
# Loop (an SVM head's pairwise coupling, armscope.export.svm_head): kept FP32 with its body, which the
# converter otherwise half-converts into a body whose types ONNX Runtime rejects.
DEFAULT_OP_BLOCK = ["Softmax", "ReduceSum", "Div", "ScatterElements", "Loop"]


def convert_member(src: Path, dst: Path, op_block_list: list[str] | None = None) -> None:
    float16 = require_module("onnxconverter_common.float16", "quant", "FP16 conversion")
    model = onnx.load(str(src))
    blocked = list(float16.DEFAULT_OP_BLOCK_LIST) + list(op_block_list if op_block_list is not None
                                                          else DEFAULT_OP_BLOCK)
    converted = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked,
                                                 disable_shape_infer=False)
    # onnxconverter-common 1.16 leaves value_info entries typed float16 for the outputs of
    # blocked (FP32) nodes, which ONNX Runtime then refuses ("Type (tensor(float)) of output arg
    # ... does not match expected type (tensor(float16))"); drop them (ONNX Runtime and TensorRT
    # infer types themselves; re-inferring here would mint 'unk__N' dims that collide between
    # members once they are merged).
    del converted.graph.value_info[:]
    _keep_output_types(model, converted)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(dst))


def _keep_output_types(source: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """keep_io_types does not hold for an output produced by a blocked (FP32) node: the converter
    casts that node's result to float16 for its consumers, and the graph output is one of them
    (e.g. a member's probs straight from a Softmax, a CAM straight from a Resize). Cast such
    outputs back to their source type: the bundle's I/O contract is float32 out, and the merged
    ensemble's Mean needs every member's output in one type."""
    wanted = {o.name: o.type.tensor_type.elem_type for o in source.graph.output}
    for output in converted.graph.output:
        elem = wanted.get(output.name)
        if elem is None or output.type.tensor_type.elem_type == elem:
            continue
        inner = f"{output.name}_before_output_cast"
        for node in converted.graph.node:
            node.output[:] = [inner if name == output.name else name for name in node.output]
            node.input[:] = [inner if name == output.name else name for name in node.input]
        converted.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=elem,
                                                          name=f"{output.name}_output_cast"))
        output.type.tensor_type.elem_type = elem
