"""The deployable forward graph: the member's own layers (tiling included) plus
Grad-CAM, all in one TensorFlow function that tf2onnx turns into ONNX, so every
runtime computes the CAM in the same pass as the prediction.

Which Grad-CAM (``armscope.export.structure`` decides; A is the pooled feature map in
image layout, H x W cells, K channels; cam^c = ReLU(sum_d alpha^c_d A_d)):

* patch-weighted (the paper's, when per-patch heads exist): on A, the gradient
  of each patch head's class score is weighted by that patch's share of the
  class confidence, G^c = sum_k p_k^c / sum_i p_i^c * dz_k^c/dA, and
  alpha^c = mean over A of G^c. Every patch head is linear after a global
  average pool over its cells, so dz_k^c/dA is W_k[:, c] / cells_k on patch k's
  cells and 0 elsewhere, and alpha^c_d = (1 / HW) * sum_k share_k^c W_k[d, c]:
  a few matmuls, no backward pass.
* plain Grad-CAM, closed form (no per-patch heads, a Dense right after the
  pool): alpha^c = W[:, c] / HW, a constant.
* plain Grad-CAM by gradient (a head that is not linear after the pool): a
  ``tf.GradientTape`` inside the traced function differentiates the head from
  the pooled vector v to the score; tf2onnx converts the gradient ops
  (``armscope.export.tf2onnx_grads`` supplies the few it lacks). The pool's own share is
  exact without a tape: a global average pool gives every cell dy/dv / HW and a
  global max pool gives dy/dv to its maximal cells, so in both cases
  alpha = mean over A of dy/dA = dy/dv / HW. (TensorFlow's gradient of the
  pool itself converts to an ONNX Reshape that fails at run time.)

The score differentiated is the class logit (before softmax); for a single
sigmoid unit with logit z it is z for class 1 (p) and -z for class 0 (1 - p),
and probs are exported as [1 - p, p]. ``armscope.export.gradcam_reference`` computes each
form with tf.GradientTape on the original model, and the tests compare.

Saliency (optional, whole-image models): the vanilla gradient map
max_channels |d score_c / d image| at the input's S x S, the image being the
bundle's input (RGB 0..255, before any scaling). A tape over the backbone gives
d/d image of the pooled feature map A weighted by dscore/dA, which is known
without differentiating the pool (see above: dy/dv / HW on every cell for a
global average pool, dy/dv shared among the maximal cells for a global max
pool); the backbone's backward ops convert through ``armscope.export.tf2onnx_pool_grads``.
For a sigmoid unit |d(-z)| = |dz|, so both classes share one map.

Input scaling (``export --input-scaling``, for models trained on pre-scaled
pixels): x * scale + offset per channel, prepended inside the graph so the
bundle still takes RGB 0..255.
"""
from __future__ import annotations

from armscope.export.graph import shape_of, sub_model
from armscope.export.structure import GRADCAM_CLOSED, GRADCAM_GRADIENT, PATCH_WEIGHTED, ModelStructure, assemble_map


def _two_class(p):
    """A single sigmoid unit's p (B, ..., 1) -> [1 - p, p]."""
    import tensorflow as tf

    return tf.concat([1.0 - p, p], axis=-1)


def _signed(kernel):
    """A sigmoid unit's kernel (..., K, 1) -> (..., K, 2): the score is -z for class 0, z for class 1."""
    import tensorflow as tf

    return tf.concat([-kernel, kernel], axis=-1)


def closed_form_cam(feature_map, patch_probs, kernel):
    """Patch-weighted Grad-CAM: (B, H, W, K), (B, P, C) probabilities, (P, K, C) -> (B, C, H, W)."""
    import tensorflow as tf

    share = patch_probs / tf.reduce_sum(patch_probs, axis=1, keepdims=True)  # (B, P, C)
    cells = tf.cast(tf.shape(feature_map)[1] * tf.shape(feature_map)[2], feature_map.dtype)
    # alpha[b, d, c] = sum_k share[b, k, c] * W[k, d, c] / cells
    alpha = tf.reduce_sum(share[:, :, None, :] * kernel[None], axis=1) / cells  # (B, K, C)
    return tf.nn.relu(tf.einsum("bijd,bdc->bcij", feature_map, alpha))


class MemberGraph:
    """One member's deploy computation: image -> {probs, cam[, patch_probs][, saliency]}."""

    def __init__(self, model, structure: ModelStructure, saliency: bool = False, input_scaling=None):
        self.st = st = structure
        self.saliency = saliency
        self.input_scaling = input_scaling  # (scale[3], offset[3]) or None
        if saliency and (st.tiled or st.final.layout != "map"):
            from armscope.core.errors import ArmscopeError

            raise ArmscopeError(f"{st.source}: a saliency map is supported for whole-image models; this one is "
                                f"tiled ({st.grid}x{st.grid} patches)")
        tensors = [st.final.output, *st.final.maps]
        self.score_index = None
        if st.cam_form == GRADCAM_GRADIENT:
            self.score_index = len(tensors)
            tensors.append(st.final.logits if st.final.logits is not None else st.final.classifier.inputs[0])
            tensors.append(st.final.pooled)
        self.patch_index = len(tensors)
        tensors.extend(h.output for h in st.patch_heads)
        self.parts = sub_model(model, tensors, f"{model.name}_deploy_parts")
        self.n_maps = len(st.final.maps)

    def _patch_terms(self, outs):
        """Per-patch probabilities (B, P, C) and kernels (P, K, C), in head order."""
        import tensorflow as tf

        st = self.st
        probs, kernels = [], []
        for head, p in zip(st.patch_heads, outs[self.patch_index:]):
            kernel = tf.convert_to_tensor(head.kernel_and_bias()[0])
            if head.per_patch_stack:
                n = shape_of(head.output)[1]
                probs.append(p)
                kernels.append(kernel if kernel.shape.rank == 3 else tf.tile(kernel[None], (n, 1, 1)))
            else:
                probs.append(p[:, None, :])
                kernels.append(kernel[None])
        probs, kernel = tf.concat(probs, axis=1), tf.concat(kernels, axis=0)
        if st.final.activation == "sigmoid":
            probs, kernel = _two_class(probs), _signed(kernel)
        return probs, kernel

    def _score(self, outs):
        """The differentiated score (B, C): class logits, or [-z, z] for a sigmoid unit."""
        import tensorflow as tf

        st = self.st
        z = outs[self.score_index]
        if st.final.logits is None:  # the Dense applies the activation itself: recompute its logits
            kernel, bias = st.final.kernel_and_bias()
            z = tf.matmul(z, kernel) + (bias if bias is not None else 0.0)
        return tf.concat([-z, z], axis=-1) if st.final.activation == "sigmoid" else z

    def __call__(self, image) -> dict:
        import tensorflow as tf

        st = self.st
        tape = None
        if st.cam_form == GRADCAM_GRADIENT or self.saliency:
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(image)
                outs = self._outputs(self._scaled(image))
                if st.cam_form == GRADCAM_GRADIENT:
                    score = self._score(outs)
                    # one-hot products, not score[:, c]: a strided slice's gradient has no ONNX form
                    targets = [tf.reduce_sum(score * tf.one_hot(c, st.n_classes, dtype=score.dtype))
                               for c in range(st.n_classes)]
        else:
            outs = self._outputs(self._scaled(image))
        maps = outs[1:1 + self.n_maps]
        fmap = assemble_map(maps, st.final.layout, st.order, st.grid)
        p = outs[0]
        result = {"probs": _two_class(p) if st.final.activation == "sigmoid" else p}
        if st.cam_form == PATCH_WEIGHTED:
            patch_probs, kernel = self._patch_terms(outs)
            result["cam"] = closed_form_cam(fmap, patch_probs, kernel)
            inverse = [st.patch_blocks.index(j) for j in range(len(st.patch_blocks))]
            result["patch_probs"] = tf.gather(patch_probs, inverse, axis=1)  # image block order, row-major
        elif st.cam_form == GRADCAM_CLOSED:
            kernel = tf.convert_to_tensor(st.final.kernel_and_bias()[0])
            if st.final.activation == "sigmoid":
                kernel = _signed(kernel)
            cells = float(st.map_size[0] * st.map_size[1])
            result["cam"] = tf.nn.relu(tf.einsum("bijd,dc->bcij", fmap, kernel / cells))
        else:
            pooled = outs[self.score_index + 1]
            cells = float(st.map_size[0] * st.map_size[1])
            cams, self._dv = [], []
            for target in targets:
                dv = tape.gradient(target, pooled)  # (B, K)
                self._dv.append(dv)
                alpha = dv / cells  # = mean over A of dy/dA
                cams.append(tf.nn.relu(tf.einsum("bijd,bd->bij", fmap, alpha)))
            result["cam"] = tf.stack(cams, axis=1)
        if self.saliency:
            result["saliency"] = self._saliency_maps(tape, image, maps[0])
        del tape
        return result

    def _scaled(self, image):
        if self.input_scaling is None:
            return image
        import tensorflow as tf

        scale, offset = self.input_scaling
        return image * tf.constant(scale, image.dtype) + tf.constant(offset, image.dtype)

    def _saliency_maps(self, tape, image, fmap):
        """(B, C, S, S): max over channels of |d score_c / d image|, through the backbone only
        (dscore/dA is known: see the module docstring)."""
        import tensorflow as tf

        st = self.st
        if st.final.pool == "GlobalMaxPooling2D":
            peak = tf.reduce_max(fmap, axis=(1, 2), keepdims=True)
            weight = tf.cast(tf.equal(fmap, peak), fmap.dtype)
            weight = weight / tf.reduce_sum(weight, axis=(1, 2), keepdims=True)
        else:
            weight = tf.ones_like(fmap) / float(st.map_size[0] * st.map_size[1])
        if st.cam_form == GRADCAM_GRADIENT:
            dvs = [dv[:, None, None, :] for dv in self._dv]
        else:
            kernel = tf.convert_to_tensor(st.final.kernel_and_bias()[0])
            if st.final.activation == "sigmoid":
                kernel = _signed(kernel)
            dvs = [kernel[:, c] for c in range(kernel.shape[-1])]
        sigmoid = st.final.activation == "sigmoid"
        maps = []
        for dv in dvs[1:] if sigmoid else dvs:  # a sigmoid's classes share |dz|: class 1's map serves both
            grad = tape.gradient(fmap, image, output_gradients=weight * dv)
            maps.append(tf.reduce_max(tf.abs(grad), axis=-1))
        if sigmoid:
            maps = [maps[0], maps[0]]
        return tf.stack(maps, axis=1)

    def _outputs(self, image) -> list:
        outs = self.parts(image, training=False)
        return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def make_deploy_function(models, structures: list[ModelStructure] | None = None, saliency: bool = False,
                         input_scaling=None):
    """One tf.function over ``models`` with their outputs averaged. The exporter
    traces one member at a time (the bundle's merged graph is assembled from the
    member ONNX graphs by ``armscope.export.merge``). Members must agree on input size and
    outputs. ``saliency``: add the saliency output; ``input_scaling``: (scale,
    offset) per channel applied to the image first."""
    import tensorflow as tf

    from armscope.export.structure import find_structure

    if structures is None:
        structures = [find_structure(m, m.name) for m in models]
    if saliency or any(s.cam_form == GRADCAM_GRADIENT for s in structures):
        import armscope.export.tf2onnx_grads  # noqa: F401  (whichever route converts this graph needs the gradient ops)
    members = [MemberGraph(m, s, saliency, input_scaling) for m, s in zip(models, structures)]
    size = structures[0].input_size
    spec = tf.TensorSpec((None, size, size, 3), tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def deploy(image):
        results = [member(image) for member in members]
        n = float(len(results))
        return {key: tf.add_n([r[key] for r in results]) / n for key in results[0]}

    return deploy, spec
