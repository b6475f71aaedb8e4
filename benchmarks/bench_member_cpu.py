"""One full-size tiled DenseNet-121 member on the CPU: FP32 against its INT8
Q/DQ form, through ONNX Runtime and OpenVINO as armscope runs them
(``open_session`` / ``compile_graph``, all usable CPUs), and OpenVINO BF16
where the CPU has it (AVX512-BF16 or AMX): what each precision buys on this
CPU, and how far each is from ONNX Runtime FP32 (``max_abs_delta_p_vs_fp32``).
Whether the INT8 kernels are exact here is recorded too
(``armscope.edge.backends.cpu_features``; the daemon refuses INT8 where not).

Why one member and not the ensemble (``bench_precision.py``): it is what can
be carried to another machine to measure there (the host CPUs of the GPU
machines lent to sessions have AVX512-VNNI and AMX; the five-member bundles
are 137-286 MB). The members are the full-size bundles' member 0
(``benchmarks/conftest.py`` FP32, ``bench_precision.py`` INT8), or
``ARMSCOPE_BENCH_MEMBERS=DIR`` holding ``fp32.onnx`` and ``int8.onnx``.
The OpenVINO cases skip without the ``[openvino]`` extra.

    python -m pytest benchmarks/bench_member_cpu.py --benchmark-only
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from armscope.core.cpus import usable_cpus
from armscope.edge.backends.base import OUTPUTS
from armscope.edge.backends.cpu_features import int8_exact
from armscope.edge.backends.onnxruntime_backend import open_session

CACHE = Path(__file__).resolve().parent / ".cache"
GROUP = "member-cpu"


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


# (runtime, precision it is asked for, graph): OpenVINO runs a Q/DQ graph as INT8 whatever the hint
CASES = [("onnxruntime", "fp32", "fp32"), ("onnxruntime", "int8", "int8"),
         ("openvino", "f32", "fp32"), ("openvino", "bf16", "fp32"), ("openvino", "int8", "int8")]


def _runner(runtime: str, precision: str, path: Path):
    """A one-argument callable running the graph as armscope's backend would, and its description."""
    threads = usable_cpus()
    if runtime == "onnxruntime":
        session = open_session(path, threads)
        return (lambda frame: _infer(session, frame)), {}
    ov = pytest.importorskip("openvino")
    from armscope.edge.backends.openvino_backend import compile_graph, cpu_capabilities

    core = ov.Core()
    capabilities = cpu_capabilities(core)
    if precision == "bf16" and "BF16" not in capabilities:
        pytest.skip(f"no BF16 on this CPU (OpenVINO: {', '.join(capabilities)})")
    compiled = compile_graph(core, path, threads, "f32" if precision == "int8" else precision)
    request = compiled.create_infer_request()

    def run(frame):
        request.infer({"image": frame}, share_inputs=True)
        return {n: np.array(request.get_tensor(n).data, copy=True) for n in OUTPUTS}

    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return run, {"openvino": ov.__version__, "cpu_capabilities": capabilities,
                 "openvino_precision": hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)}


@pytest.mark.benchmark(group=GROUP, min_rounds=10, warmup=True, warmup_iterations=2)
@pytest.mark.parametrize("runtime,precision,graph", CASES, ids=[f"{r}-{p}" for r, p, _ in CASES])
def test_member(benchmark, members, frame, reference, runtime, precision, graph):
    run, info = _runner(runtime, precision, members[graph])
    out = benchmark(run, frame)
    delta = float(np.abs(out["probs"] - reference["probs"]).max())
    benchmark.extra_info.update({"runtime": runtime, "precision": precision, "graph": graph, "threads": usable_cpus(),
                                 "int8_exact_on_this_cpu": int8_exact()[0], "max_abs_delta_p_vs_fp32": delta, **info})
    assert out["probs"].shape == reference["probs"].shape and np.isfinite(out["cam"]).all()
    if (runtime, precision) == ("onnxruntime", "fp32"):
        assert delta == 0.0  # the same session options on the same graph
