"""Is there in-focus tissue under the objective? Two cheap measures on the
model's centre crop, so the daemon does not classify (and show a confident
overlay for) glass, the slide label, or a field the pathologist is still
focusing.

* tissue fraction: share of pixels that are not background. H&E tissue is
  stained (saturated) and darker than the bright, grey-white glass, so a pixel
  is background when its HSV saturation is low *or* it is very bright.
* focus: variance of the Laplacian of the grey image (Pech-Pacheco et al.,
  2000), large for sharp nuclei edges, small when blurred.

Both run on the crop downscaled to 256 px (cheap: BENCHMARKS.md section 10), which also makes the
focus value independent of the camera resolution.

One gate serves the daemon and ``armscope classify``. The defaults suit H&E
brightfield; a bundle for another stain or modality carries its own in the
manifest's optional ``tissue_gate`` block (``TissueGate.from_manifest``). An
MRI slice has no stain: its background is the dark air around the head, so
``MRI_GATE`` counts a pixel as background when it is darker than
``min_brightness`` (saturation and brightness caps off); a slice of air, or one
with a sliver of anatomy, gets no decision. Focus is not gated for MRI (a
reconstruction has no focal plane; the thresholds below were set on real MR
slices, tests/test_tsc_system.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from armscope.core.errors import ArmscopeError
from armscope.core.protocol import REASON_NO_TISSUE, REASON_OUT_OF_FOCUS

MEASURE_SIZE = 256


@dataclass(frozen=True)
class TissueGate:
    min_tissue_fraction: float = 0.1
    min_focus: float = 150.0
    min_saturation: int = 20
    max_brightness: int = 235
    min_brightness: int = 0

    @classmethod
    def from_manifest(cls, manifest: dict, overrides: dict | None = None) -> "TissueGate":
        """The manifest's ``tissue_gate`` thresholds where it has them, else the defaults;
        ``overrides`` (field -> value; a negative value means unset) win over both:
        the daemon's configuration keys."""
        block = manifest.get("tissue_gate") or {}
        values = {f: block[f] for f in cls.__dataclass_fields__ if f in block}
        values.update({f: v for f, v in (overrides or {}).items() if v is not None and v >= 0})
        return cls(**values)

    def explain(self, reason: str, measures: dict) -> str:
        """A verdict in words, with the measure and the threshold it missed."""
        if reason == REASON_NO_TISSUE:
            return f"tissue fraction {measures['tissue_fraction']:.4f}, below {self.min_tissue_fraction}"
        if reason == REASON_OUT_OF_FOCUS:
            return f"focus {measures['focus']:.1f}, below {self.min_focus}"
        return reason

    def measure(self, crop_bgr: np.ndarray) -> dict:
        small = cv2.resize(crop_bgr, (MEASURE_SIZE, MEASURE_SIZE), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        background = (hsv[..., 1] < self.min_saturation) | (hsv[..., 2] > self.max_brightness)
        if self.min_brightness > 0:
            background |= hsv[..., 2] < self.min_brightness
        fraction = 1.0 - float(background.mean())
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        focus = float(cv2.Laplacian(grey, cv2.CV_64F).var())
        return {"tissue_fraction": round(fraction, 4), "focus": round(focus, 2)}

    def verdict(self, measures: dict) -> str | None:
        """None when the crop should be classified, else the reason it is not."""
        if measures["tissue_fraction"] < self.min_tissue_fraction:
            return REASON_NO_TISSUE
        if measures["focus"] < self.min_focus:
            return REASON_OUT_OF_FOCUS
        return None


# Thresholds for MRI slices (``armscope export --tissue-gate mri``): background is
# air, darker than 45 of 255 after windowing (a brain window maps air to about 30-40); at least 10% of the image must be
# anatomy; no saturation, brightness-cap or focus criterion.
MRI_GATE = {"min_tissue_fraction": 0.1, "min_focus": 0.0, "min_saturation": 0, "max_brightness": 255,
            "min_brightness": 45}
GATE_PRESETS = {"mri": MRI_GATE}


def parse_gate(text: str, option: str = "--tissue-gate") -> dict:
    """A preset name (``mri``) or ``KEY=VALUE,...`` (keys: ``TissueGate``'s fields) -> the
    manifest's ``tissue_gate`` block; what export writes and ``TissueGate.from_manifest`` reads."""
    if text in GATE_PRESETS:
        return dict(GATE_PRESETS[text])
    fields = TissueGate.__dataclass_fields__
    block = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ArmscopeError(f"{option} {text!r}: expected {' or '.join(GATE_PRESETS)} or KEY=VALUE pairs "
                                f"with KEY one of {', '.join(fields)}")
        try:
            number_value = float(value)
        except ValueError:
            raise ArmscopeError(f"{option} {item!r}: {value!r} is not a number") from None
        block[key] = int(number_value) if fields[key].type in (int, "int") else number_value
    return block
