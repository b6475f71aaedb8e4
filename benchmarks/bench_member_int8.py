"""One full-size tiled DenseNet-121 member, FP32 against its INT8 Q/DQ form,
through armscope's own ONNX Runtime session (``open_session``, all usable
CPUs): what INT8 buys on this CPU, and whether its INT8 kernels are exact
here (``edge.backends.cpu_features``; the daemon refuses INT8 where not).

Why one member and not the ensemble (``bench_precision.py``): it is what can
be carried to another machine to measure there (the host CPUs of the GPU
machines lent to sessions have AVX512-VNNI and AMX; the five-member bundles
are 137-286 MB). The members are the full-size bundles' member 0
(``benchmarks/conftest.py`` FP32, ``bench_precision.py`` INT8), or
``ARMSCOPE_BENCH_MEMBERS=DIR`` holding ``fp32.onnx`` and ``int8.onnx``.

    python -m pytest benchmarks/bench_member_int8.py --benchmark-only
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from armscope.cpus import usable_cpus
from edge.backends.cpu_features import int8_exact
from edge.backends.onnxruntime_backend import open_session

CACHE = Path(__file__).resolve().parent / ".cache"
GROUP = "member-int8-cpu"


@pytest.fixture(scope="module")
def members() -> dict[str, Path]:
    given = os.environ.get("ARMSCOPE_BENCH_MEMBERS")
    if given:
        paths = {p: Path(given) / f"{p}.onnx" for p in ("fp32", "int8")}
    else:
        paths = {"fp32": CACHE / "densenet121_x5_bundle" / "members" / "member_0.onnx",
                 "int8": CACHE / "densenet121_x5_bundle-int8" / "members" / "member_0.onnx"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f"no full-size members ({', '.join(missing)}): run bench_precision.py first")
    return paths


def _infer(session, frame: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip((o.name for o in session.get_outputs()), session.run(None, {"image": frame})))


@pytest.fixture(scope="module")
def frame(real_inputs) -> np.ndarray:
    return np.ascontiguousarray(real_inputs[:1])


@pytest.fixture(scope="module")
def reference(members, frame) -> dict[str, np.ndarray]:
    return _infer(open_session(members["fp32"], usable_cpus()), frame)


@pytest.mark.benchmark(group=GROUP, min_rounds=10, warmup=True, warmup_iterations=2)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_member(benchmark, members, frame, reference, precision):
    session = open_session(members[precision], usable_cpus())
    out = benchmark(_infer, session, frame)
    delta = float(np.abs(out["probs"] - reference["probs"]).max())
    benchmark.extra_info.update({"precision": precision, "threads": usable_cpus(),
                                 "int8_exact_on_this_cpu": int8_exact()[0], "max_abs_delta_p_vs_fp32": delta})
    assert out["probs"].shape == reference["probs"].shape and np.isfinite(out["cam"]).all()
    if precision == "fp32":
        assert delta == 0.0  # the same session options on the same graph
