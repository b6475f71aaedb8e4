"""How a model expects its RGB 0..255 input scaled: the one table behind both
``export --input-scaling NAME`` (one scaling for every member) and ``export
--scaling MEMBER=NAME`` (per member), so the two flags take the same names and
mean the same numbers.

Why one table: the flags grew apart (``symmetric``/``unit``/``imagenet`` in one,
``x/127.5-1``/``x/255``/``torch``/``caffe`` in the other), and a lab that
learnt one spelling got an argparse error from the other flag for the very
same scaling. Each row has its canonical name and, where it has one, the
older ``--input-scaling`` name; both are accepted everywhere and the manifest
keeps recording what it always recorded (``preprocessing.scaling.name``:
``symmetric``/``unit``/``imagenet``; ``members[i].preprocessing.scaling``:
the canonical name), so bundles made before still load and read the same.

Every scaling is ``x[..., order] * scale + offset`` per channel. The graph of a
single member or of ``--weights`` scales with a per-channel multiply-add (a
Keras ``Rescaling`` layer for ``--weights``) and cannot reorder channels, so
``caffe`` (RGB -> BGR) is refused there by name; ``--scaling`` (the per-member
graph) applies any row.
"""
from __future__ import annotations

from dataclasses import dataclass

from armscope.core.errors import ArmscopeError

IMAGENET_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RGB = (0, 1, 2)


@dataclass(frozen=True)
class Scaling:
    name: str                       # canonical: members[i].preprocessing.scaling
    means: str                      # in words, for manifests and --explain
    scale: tuple[float, float, float]
    offset: tuple[float, float, float]
    order: tuple[int, int, int] = RGB  # input channels taken, in this order, before scale and offset
    alias: str | None = None        # the --input-scaling name: preprocessing.scaling.name

    @property
    def identity(self) -> bool:
        return self.order == RGB and self.scale == (1.0, 1.0, 1.0) and self.offset == (0.0, 0.0, 0.0)

    @property
    def recorded_name(self) -> str:
        """What a single-graph manifest's preprocessing.scaling.name (and a --weights sidecar) records."""
        return self.alias or self.name

    def affine(self, option: str) -> tuple[list[float], list[float]]:
        """(scale, offset) per channel, for graphs that scale with a multiply-add only; refused,
        naming ``option``, for a scaling that reorders channels."""
        if self.order != RGB:
            raise ArmscopeError(f"{option} {self.name}: swaps RGB -> BGR, which a single-member or --weights export "
                                "cannot do (its graph only multiplies and adds per channel); give it per member "
                                f"with --scaling MEMBER={self.name}")
        return list(self.scale), list(self.offset)

    def numpy(self, x):
        """RGB 0..255 (..., 3) -> what the model was trained on (float32), as the graph computes it."""
        import numpy as np

        return (x[..., list(self.order)] * np.asarray(self.scale, np.float32)
                + np.asarray(self.offset, np.float32)).astype(np.float32)

    def tensorflow(self, x):
        """The same as TensorFlow ops (for a member's graph)."""
        import tensorflow as tf

        if self.identity:
            return x
        x = tf.convert_to_tensor(x, tf.float32)
        if self.order != RGB:
            x = tf.gather(x, list(self.order), axis=-1)
        return x * tf.constant(self.scale, x.dtype) + tf.constant(self.offset, x.dtype)


SCALINGS = {s.name: s for s in (  # this order is the order --help and the error messages list them in
    Scaling("none", "none outside the model (the model scales its own input)", (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    Scaling("x/127.5-1", "x/127.5-1 (-1..1)", (1 / 127.5,) * 3, (-1.0,) * 3, alias="symmetric"),
    Scaling("x/255", "x/255 (0..1)", (1 / 255.0,) * 3, (0.0,) * 3, alias="unit"),
    Scaling("torch", "x/255, minus the ImageNet mean (0.485, 0.456, 0.406), divided by the ImageNet std "
                     "(0.229, 0.224, 0.225) (keras.applications DenseNet's preprocess_input)",
            tuple(1 / (255.0 * s) for s in IMAGENET_STD), tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),
            alias="imagenet"),
    Scaling("caffe", "RGB->BGR, minus the ImageNet mean (B, G, R) = (103.939, 116.779, 123.68) "
                     "(keras.applications ResNet50's preprocess_input)",
            (1.0, 1.0, 1.0), tuple(-m for m in IMAGENET_CAFFE_BGR_MEAN), order=(2, 1, 0)),
)}
ALIASES = {s.alias: s.name for s in SCALINGS.values() if s.alias}
NAMES = [*SCALINGS, *ALIASES]

# the help both flags print
HELP = "how the model was trained to see RGB 0..255, put in its graph: " + "; ".join(
    f"{s.name}{f' (or {s.alias})' if s.alias else ''}: {s.means}" for s in SCALINGS.values())


def parse_scaling(name: str, option: str) -> Scaling:
    """A scaling by its canonical or its --input-scaling name, or ArmscopeError naming ``option``."""
    found = SCALINGS.get(ALIASES.get(name, name))
    if found is None:
        raise ArmscopeError(f"{option} {name!r}: expected one of {', '.join(NAMES)}")
    return found
