#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one run on a lent GPU machine (the
# `device` tool), whose image has Python, numpy, OpenCV, numba, ONNX Runtime
# and cuda-python but not this project's other dependencies, and no network.
#
# Here, first (wheels for the machine's Python 3.12; .whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl pyzmq pyserial jsonschema \
#     jsonschema-specifications referencing rpds-py isal
# and, to check the pycuda flavour too (PyPI has pycuda as source only; it is built
# there against the machine's CUDA, ~1.5 min):
#   python3 -m pip download --no-deps --no-binary=pycuda -d .whl pycuda
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl pytools platformdirs siphash24 mako
#   (and, should the image lack Python's headers, a 3.12's include/python3.12 into .whl/include/)
# then run this with carry [".whl"]. Results land in $OUT (env, tests, benchmarks).
# TensorRT itself cannot travel (its libraries are over 1 GB; the tool carries
# 64 MiB), so the `gpu` tests skip unless the machine has it; the `cuda` tests
# and benchmarks (the TensorRT backend's CUDA calls) run either way, once per
# CUDA flavour present.
set -uo pipefail
OUT=${OUT:-out/gpu_check}
REPO=$PWD
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if ls .whl/pycuda-*.tar.gz >/dev/null 2>&1; then
  if ( set -e; rm -rf /tmp/pycuda; mkdir /tmp/pycuda
       tar xzf .whl/pycuda-*.tar.gz -C /tmp/pycuda --strip-components=1; cd /tmp/pycuda
       export CFLAGS="-g0"  # no debug info: a faster (serial) compile
       inc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
       # an image without Python's headers: carry a 3.12's include/python3.12 in .whl/include
       [ -f "$inc/Python.h" ] || export CFLAGS="$CFLAGS -I$REPO/.whl/include/python3.12"
       command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
       python3 configure.py --cuda-root="$(dirname "$(dirname "$(command -v nvcc)")")"
       python3 setup.py build_ext --inplace ) > "$OUT/pycuda_build.log" 2>&1; then
    export PYTHONPATH=$PYTHONPATH:/tmp/pycuda
  else
    echo "pycuda build failed:"; tail -15 "$OUT/pycuda_build.log"
  fi
fi
{
  date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
  lscpu | grep -E 'Model name|^CPU\(s\)'
  python3 -c "import sys, cv2, numba, numpy, onnxruntime; print(sys.version.split()[0], 'cv2', cv2.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, 'ort', onnxruntime.__version__, onnxruntime.get_available_providers())"
  python3 -c "import cuda.bindings; print('cuda-bindings', cuda.bindings.__version__)"
  python3 -c "import pycuda.driver as d; d.init(); print('pycuda', d.get_version(), 'driver', d.get_driver_version())" 2>&1 | tail -1
  python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_runtime.py tests/test_calibration_tensorrt.py tests/test_cpus.py \
    2>&1 | tee "$OUT/gpu_tests.txt"
python3 -m pytest -q -p no:cacheprovider benchmarks/bench_cuda.py --benchmark-only \
    --benchmark-json="$OUT/bench_cuda.json" 2>&1 | tail -15
[ -n "${SKIP_BRIDGE:-}" ] && exit 0  # SKIP_BRIDGE=1: the GPU part only (the bridge runs on the host CPU)
taskset -c 0,1 python3 -m pytest -q -p no:cacheprovider benchmarks/bench_bridge.py -k bridge_path \
    --benchmark-only --benchmark-json="$OUT/bench_bridge_2cpu.json" 2>&1 | tail -15
python3 -m pytest -q -p no:cacheprovider tests/test_bridge_link.py tests/test_bridge_bench.py \
    2>&1 | tail -15 | tee "$OUT/bridge_tests.txt"
python3 -c "import sys; from firmware_bridge.cli import main; sys.exit(main(sys.argv[1:]))" \
    bench --frames 200 --json "$OUT/bridge_bench.json" 2>&1 | tee "$OUT/bridge_bench.txt"
# The CLI on a GPU machine without TensorRT: auto falls back to ONNX Runtime and says why;
# asking for tensorrt is refused with a clear message (exit status 2, no traceback).
A="python3 -c 'import sys; from armscope.cli import main; sys.exit(main(sys.argv[1:]))'"
eval "$A classify --bundle samples/demo_bundle samples/frames/cmu1_frame_1.jpg --backend auto" 2>&1 | tail -6
eval "$A classify --bundle samples/demo_bundle samples/frames/cmu1_frame_1.jpg --backend tensorrt" 2>&1 | tail -4
echo "tensorrt refusal: exit ${PIPESTATUS[0]}"
