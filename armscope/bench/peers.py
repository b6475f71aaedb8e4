"""The peers: the same ensemble run the way a user would run it without
armscope, on the same frames, in the same interleaved rounds.

* ONNX Runtime, untuned: ``InferenceSession(ensemble.onnx)`` with default
  options on the merged graph.
* OpenVINO's own API: ``compile_model(ensemble.onnx, "CPU")`` with its
  defaults (which pick BF16 by themselves on a BF16 CPU), and with the LATENCY
  hint at FP32, as its documentation suggests for one stream of frames, and
  at BF16 where the CPU has it (OpenVINO at its best precision).
* Keras ``predict`` of the members one after another, only with TensorFlow
  installed and the Keras members given (``--keras``); otherwise skipped, said so.

Each peer returns ``probs`` only: the comparison is of the work a user would
ask for, and the suite checks each peer's probabilities against armscope's
FP32 result.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np

from armscope.core.bundle import Bundle

log = logging.getLogger(__name__)


class Runner:
    """One timed path: ``run(batch) -> probs``; ``info`` says what runs."""

    def __init__(self, name: str, group: str, run, info: dict, close=None, **fields):
        self.name, self.group, self.run, self.info = name, group, run, info
        self.close = close or (lambda: None)
        self.fields = fields   # backend, precision, layout, members, bundle


def onnxruntime_untuned(bundle: Bundle) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.ensemble_path), providers=["CPUExecutionProvider"])
    return Runner("peer: ONNX Runtime InferenceSession, default options, merged graph", "peer",
                  lambda x: session.run(["probs"], {"image": x})[0], {"onnxruntime": ort.__version__},
                  backend="onnxruntime", precision=bundle.manifest.get("precision", "fp32"), layout="merged",
                  members=len(bundle.member_paths))


def openvino_api(bundle: Bundle, config: dict | None, label: str) -> Runner:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(bundle.ensemble_path)), "CPU", config or {})
    request = compiled.create_infer_request()
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    settled = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    probs = compiled.output("probs")
    return Runner(f"peer: OpenVINO API, {label} (runs {settled})", "peer",
                  lambda x: request.infer({"image": x})[probs],
                  {"openvino": ov.__version__, "config": config or "defaults", "settled_precision": settled},
                  backend="openvino", precision=settled, layout="merged", members=len(bundle.member_paths))


def keras_predict(paths: list[str], members: int) -> Runner:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    models = [keras.models.load_model(p, compile=False, safe_mode=True) for p in paths]

    def run(x):
        outs = [m.predict(x, verbose=0) for m in models]
        outs = [o[0] if isinstance(o, (list, tuple)) else (o["probs"] if isinstance(o, dict) else o) for o in outs]
        return np.mean(outs, axis=0)

    return Runner(f"peer: Keras predict, {len(models)} models one after another", "peer", run,
                  {"keras": keras.__version__}, backend="keras", precision="fp32", layout="members",
                  members=members)


def peers(bundle: Bundle, keras_members: list[str] | None = None, quick: bool = False,
          bf16: bool = False) -> tuple[list[Runner], list[dict]]:
    """(runners, skipped) for ``bundle`` (the FP32 one, its whole ensemble); ``quick``: OpenVINO's defaults only;
    ``bf16``: this CPU runs BF16 (OpenVINO's LATENCY hint at BF16 too)."""
    runners, skipped = [onnxruntime_untuned(bundle)], []
    if importlib.util.find_spec("openvino"):
        runners.append(openvino_api(bundle, None, "defaults"))
        if not quick:
            runners.append(openvino_api(bundle, {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"},
                                        "LATENCY hint, f32"))
            if bf16:
                runners.append(openvino_api(bundle, {"PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": "bf16"}, "LATENCY hint, bf16"))
    else:
        skipped.append({"name": "peer: OpenVINO API", "why": "openvino is not installed (pip install 'armscope[openvino]')"})
    if not keras_members:
        skipped.append({"name": "peer: Keras predict", "why": "no Keras members given (--keras MEMBER...)"})
    elif importlib.util.find_spec("tensorflow") is None:
        skipped.append({"name": "peer: Keras predict", "why": "TensorFlow is not installed (the [tf] extra)"})
    elif len(keras_members) != len(bundle.member_paths):
        skipped.append({"name": "peer: Keras predict",
                        "why": f"{len(keras_members)} Keras members given for a {len(bundle.member_paths)}-member bundle"})
    else:
        runners.append(keras_predict(keras_members, len(bundle.member_paths)))
    return runners, skipped
