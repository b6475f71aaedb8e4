#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command for a GPU machine, within
# ~9.5 minutes (BUDGET_S), with a report in $OUT/report.md (OUT defaults to out/gpu_check):
#   1. the CUDA runtime tests and benchmark (both CUDA flavours present; no TensorRT needed)
#   2. with TensorRT importable: the `gpu` tests (one-member engines FP32/FP16/INT8, parity
#      with ONNX Runtime, activation on another thread with each flavour, CUDA graphs on/off),
#      then samples/demo_bundle built FP16, FP32, FP16 with the uint8 front (--feed uint8, the
#      camera crop uploaded), INT8 (in that order, as time allows), each checked against ONNX
#      Runtime on the real frames and run through the daemon (bench, N frames on the GPU): the
#      precision table in the report.
# Without a GPU (or without TensorRT) those parts are skipped and the report says so.
#
# Offline wheels: for a GPU machine without network access, put the wheels this project
# needs that its image lacks in .whl/ (see git history of this script for the pip download
# lines; pycuda as an sdist is built there) and copy .whl/ with the checkout.
set -uo pipefail
OUT=${OUT:-out/gpu_check}
PY=${PYTHON:-python3}
FRAMES_N=${FRAMES_N:-30}
DEADLINE=$((SECONDS + ${BUDGET_S:-570}))
mkdir -p "$OUT"
REPORT="$OUT/report.md"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "# gpu_check $(date -u +%FT%TZ)" > "$REPORT"
note() { echo "$*" | tee -a "$REPORT"; }
left() { echo $((DEADLINE - SECONDS)); }
# step NAME MAX_S CMD...: run with a timeout that fits the budget; PASS/FAIL/SKIP in the report
step() {
  local name=$1 max=$2; shift 2
  local t=$(( $(left) < max ? $(left) : max ))
  if (( t < 20 )); then note "- SKIP $name: out of time"; return 1; fi
  local start=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=PASS; (( rc == 124 )) && verdict="FAIL (timeout ${t}s)"; (( rc != 0 && rc != 124 )) && verdict="FAIL (rc $rc)"
  note "- $verdict $name ($((SECONDS - start)) s): $(tail -1 "$OUT/$name.log")"
  return $rc
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
ARMSCOPE="$PY -m armscope.cli"

{
  echo '## environment'; echo '```'
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv 2>&1 | head -3
  grep -m1 'model name' /proc/cpuinfo
  $PY -c "import sys, numpy, onnxruntime; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'onnxruntime', onnxruntime.__version__)"
  $PY -c "from armscope.gpu.cuda_runtime import cuda_flavours; print('CUDA Python APIs:', cuda_flavours() or 'none')"
  $PY -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1
  echo '```'
} >> "$REPORT" 2>&1
GPU=$($PY -c "from armscope.gpu.trt_env import gpu_info; g = gpu_info(); print(g['name'] if g else '')" 2>/dev/null)
TRT=$($PY -c "from armscope.gpu.trt_env import tensorrt_available; print(int(tensorrt_available()))" 2>/dev/null)

note "## results"
if [ -z "$GPU" ]; then
  note "- SKIP everything that needs a GPU: no NVIDIA GPU found (cuda-python, pycuda, nvidia-smi). Not run:"
  note "  CUDA runtime tests, TensorRT engine builds (FP32/FP16/INT8, FP16 with the uint8 front), parity vs ONNX Runtime, daemon on the GPU,"
  note "  precision benchmark. What the GPU tests would run, collected and skipped here:"
  step gpu-tests-collected 120 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda_runtime.py \
    tests/test_calibration_tensorrt.py -m "gpu or cuda"
  cat "$REPORT"; exit 0
fi
note "- GPU: $GPU"
step cuda-runtime-tests 120 $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda_runtime.py
step cuda-benchmark 60 $PY -m pytest -q -p no:cacheprovider benchmarks/bench_cuda.py --benchmark-only \
  --benchmark-json="$OUT/bench_cuda.json"
if [ "$TRT" != 1 ]; then
  note "- SKIP TensorRT parts: TensorRT is not importable here (engine builds, parity, daemon on the GPU, precision"
  note "  benchmark not run). auto on this machine must warn and run on the CPU:"
  step auto-without-tensorrt 120 $ARMSCOPE classify --bundle samples/demo_bundle samples/frames/cmu1_frame_1.jpg
  grep -q "WARNING" "$OUT/auto-without-tensorrt.log" && note "  (the WARNING was printed)" || note "  (NO WARNING: a defect)"
  cat "$REPORT"; exit 0
fi
step gpu-tests 240 $PY -m pytest -q -p no:cacheprovider -rs tests/test_calibration_tensorrt.py -m gpu

# the demo bundle, built per precision into a copy; auto runs the newest build
cp -r samples/demo_bundle "$WORK/demo"
note ""; note "| precision | build | max abs dp vs ONNX Runtime | daemon fps | inference p50 ms |"
note "|---|---|---|---|---|"
parity() {  # max |p_auto - p_reference| over the real frames; reference: the compiled bundle on ONNX Runtime
  $ARMSCOPE classify --bundle "$WORK/demo" --backend auto --json "$WORK/auto.json" samples/frames/*.jpg >/dev/null 2>&1 &&
  $ARMSCOPE classify --bundle "$1" --backend onnxruntime --json "$WORK/ref.json" samples/frames/*.jpg >/dev/null 2>&1 &&
  $PY -c "
import json; a, r = (json.load(open(f))['images'] for f in ('$WORK/auto.json', '$WORK/ref.json'))
assert json.load(open('$WORK/auto.json'))['backend']['backend'] == 'tensorrt', 'auto did not run TensorRT'
print(max(abs(x['probs'][c] - y['probs'][c]) for x, y in zip(a, r) if x['probs'] for c in x['probs']))"
}
daemon_bench() {  # NAME FEED: the daemon on the demo copy with --backend auto for N frames; prints "fps p50"
  printf 'bundle = "%s"\nsource = "dir://%s/samples/frames/?fps=30&loop=1"\nbackend = "auto"\nfeed = "%s"\n' \
    "$WORK/demo" "$PWD" "$2" > "$WORK/run_$1.toml"
  # step's line goes to the report and stderr: stdout carries only "fps p50" for the caller's read
  if step bench-$1 120 $ARMSCOPE bench --config "$WORK/run_$1.toml" --frames "$FRAMES_N" --json "$OUT/bench_$1.json" >&2; then
    $PY -c "import json; r = json.load(open('$OUT/bench_$1.json')); b = r['backend']
assert b['backend'] == 'tensorrt' and b['feed'] == '$2', b; print(r['fps'], r['latency_ms']['inference']['p50'])" 2>&1 | tail -1
  else
    echo "- -"
  fi
}
precision_row() {  # build one precision into the demo copy, check parity, run the daemon: one table row
  local precision=$1
  extra=""; compiled="$WORK/demo"
  if [ $precision != fp32 ]; then extra="--out $WORK/demo-$precision --holdout samples/frames"; compiled="$WORK/demo-$precision"; fi
  if [ $precision = int8 ]; then
    step calib 60 $ARMSCOPE calibration-set samples/he/cmu-small-region --out "$WORK/calib.npz" --size 8 \
      --frame-size 1600x1200 --bundle "$WORK/demo" || return
    extra="$extra --calib $WORK/calib.npz"
  fi
  if step build-$precision 240 $ARMSCOPE build "$WORK/demo" --precision $precision $extra; then
    dp=$(parity "$compiled" 2>&1 | tail -1)
    read -r fps p50 < <(daemon_bench "$precision" float32)
    note "| $precision | ok | $dp | $fps | $p50 |"
  else
    note "| $precision | failed (see $precision build log) | - | - | - |"
  fi
}
# FP16 and FP32 first, then the uint8 front (its reason to exist: the upload), then INT8 (calibration
# and a Q/DQ build, the longest): what is left out when time runs short is the least asked for
precision_row fp16
precision_row fp32
# the uint8 front on the GPU: FP16 engines with the front inside (the camera crop uploaded as uint8,
# resized on the device), compared with ONNX Runtime on the CPU-preprocessed float32 frames, and the
# daemon fed the crop
if step front 120 $ARMSCOPE front --bundle "$WORK/demo" --images samples/frames \
   && step build-fp16-uint8 240 $ARMSCOPE build "$WORK/demo" --precision fp16 --feed uint8 --out "$WORK/demo-fp16" \
        --holdout samples/frames; then
  dp=$($ARMSCOPE classify --bundle "$WORK/demo" --backend auto --feed uint8 --json "$WORK/u8.json" samples/frames/*.jpg \
         >/dev/null 2>&1 && $ARMSCOPE classify --bundle "$WORK/demo" --backend onnxruntime --json "$WORK/ref.json" \
         samples/frames/*.jpg >/dev/null 2>&1 && $PY -c "
import json; a, r = (json.load(open(f)) for f in ('$WORK/u8.json', '$WORK/ref.json'))
assert a['backend']['backend'] == 'tensorrt' and a['backend']['feed'] == 'uint8', a['backend']
print(max(abs(x['probs'][c] - y['probs'][c]) for x, y in zip(a['images'], r['images']) if x['probs'] for c in x['probs']))" 2>&1 | tail -1)
  read -r fps p50 < <(daemon_bench fp16-uint8 uint8)
  note "| fp16, feed uint8 (vs FP32 float32 on ONNX Runtime) | ok | $dp | $fps | $p50 |"
else
  note "| fp16, feed uint8 | failed (see the front / build-fp16-uint8 logs) | - | - | - |"
fi
precision_row int8
cp -r "$WORK/demo/engines" "$OUT/engines_index" 2>/dev/null && find "$OUT/engines_index" -name '*.engine' -delete
note ""; note "finished in $SECONDS s"
cat "$REPORT"
