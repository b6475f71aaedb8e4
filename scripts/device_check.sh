#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as run through the session's device tool on
# a lent machine with no package registry: the pure-Python/abi3 wheels the image
# lacks travel in .whl/ (see BENCHMARKS.md, "GPU"); numpy, OpenCV, ONNX Runtime,
# pytest and cuda-python (cuda-bindings) are the image's own. TensorRT's full
# builder is only on pypi.nvidia.com, which such a machine cannot reach, so the
# `gpu` tests skip there; the `cuda` tests and benchmarks run, once per CUDA
# flavour: cuda-python from the image, and pycuda when its source tarball is in
# .whl/ (PyPI has no pycuda wheels; it is built here against this CUDA).
# Usage: OUT=DIR scripts/device_check.sh
set -o pipefail
OUT=${OUT:-out/device}
REPO=$PWD
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
if ls .whl/pycuda-*.tar.gz >/dev/null 2>&1; then
  if ( set -e; rm -rf /tmp/pycuda; mkdir /tmp/pycuda
       tar xzf .whl/pycuda-*.tar.gz -C /tmp/pycuda --strip-components=1; cd /tmp/pycuda
       inc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
       export CFLAGS="-g0"  # no debug info: halves the ~2 min serial compile
       [ -f "$inc/Python.h" ] || export CFLAGS="$CFLAGS -I$REPO/.whl/include/python3.12"
       command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
       python3 configure.py --cuda-root="$(dirname "$(dirname "$(command -v nvcc)")")"
       python3 setup.py build_ext --inplace -j "$(nproc)" ) > "$OUT/pycuda_build.txt" 2>&1; then
    export PYTHONPATH=$PYTHONPATH:/tmp/pycuda
  else
    echo "pycuda build failed:"; tail -15 "$OUT/pycuda_build.txt"
  fi
fi
{ nvidia-smi -L; grep -m1 'model name' /proc/cpuinfo; nproc
  python3 -c "import numpy, cv2, onnxruntime; print('numpy', numpy.__version__, 'opencv', cv2.__version__, 'onnxruntime', onnxruntime.__version__)"
  python3 -c "import cuda.bindings; print('cuda-bindings', cuda.bindings.__version__)"
  python3 -c "import pycuda.driver as d; d.init(); print('pycuda', d.get_version(), d.get_driver_version())"
  python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)"; } 2>&1 | tee "$OUT/env.txt"
P="python3 -m pytest -p no:cacheprovider -q"
$P -m "cuda or gpu" tests/test_cuda_runtime.py tests/test_calibration_tensorrt.py -rs 2>&1 | tee "$OUT/gpu_tests.txt"
$P -m cuda benchmarks/bench_cuda.py --benchmark-only --benchmark-json="$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench_cuda.txt"
# the bridge's hot path on this machine's CPU: two cores (as the issue's target machine) and all of them
taskset -c 0,1 $P benchmarks/bench_bridge.py -k bridge_path --benchmark-only --benchmark-json="$OUT/bench_bridge_2cpu.json" 2>&1 | tee "$OUT/bench_bridge_2cpu.txt"
$P benchmarks/bench_bridge.py -k bridge_path --benchmark-only --benchmark-json="$OUT/bench_bridge_all.json" 2>&1 | tee "$OUT/bench_bridge_all.txt"
