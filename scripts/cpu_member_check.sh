#!/usr/bin/env bash
# One full-size member on another machine's CPU (e.g. a Xeon with AVX512-VNNI/BF16, AMX):
# ONNX Runtime FP32/INT8 and OpenVINO FP32/BF16/INT8 (benchmarks/bench_member_cpu.py),
# plus the OpenVINO backend's BF16 test. How BENCHMARKS.md section 4's member table was made.
#
#   bash scripts/cpu_member_check.sh pack   # where the bundle is: ~66 MB to copy, a few minutes of xz
#   copy the checkout with .whl/, .ovpack/ and .member_xz/ to the target, then there:
#   bash scripts/cpu_member_check.sh run
#
# Why packed: the copy to the target is meant to stay under 64 MiB (checkout included). The OpenVINO wheel is
# 59 MB; stripped to its CPU plugin and ONNX frontend and xz-compressed it is 20 MB. The INT8
# member keeps heads and CAM in FP32 (--keep-fp32 heads,cam) so onnxruntime < 1.32 runs it.
# Both members xz to 32 MB. .whl/ holds the project's other wheels (see scripts/gpu_check.sh);
# add /.ovpack/ and /.member_xz/ to .git/info/exclude.
set -euo pipefail
case "${1:-}" in
pack)
  PY=${PY:-.venv/bin/python}
  SRC=${SRC:-benchmarks/.cache/densenet121_x5_bundle}   # made by benchmarks/conftest.py
  CALIB=${CALIB:-benchmarks/.cache/bench_calib.npz}
  work=$(mktemp -d)
  "$PY" - "$SRC" "$CALIB" "$work" <<'PYEOF'
import sys
from pathlib import Path
import onnx
from armscope.core.bundle import load_bundle
from armscope.calibration.calibration_set import load_calibration_set
from armscope.calibration.graph import sensitive_nodes
from armscope.calibration.quantize import DEFAULT_OP_TYPES, _quantize_ort, preprocess_member
src, calib, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
bundle = load_bundle(src)
images = load_calibration_set(calib, spec=bundle.preprocessing).images
pre = work / "pre.onnx"
preprocess_member(bundle.member_paths[0], pre)
groups = sensitive_nodes(onnx.load(str(pre), load_external_data=False))
_quantize_ort(pre, work / "int8.onnx", images, "minmax", groups["heads"] + groups["cam"], list(DEFAULT_OP_TYPES), True)
(work / "fp32.onnx").write_bytes(bundle.member_paths[0].read_bytes())
PYEOF
  mkdir -p .member_xz .ovpack
  for n in fp32 int8; do xz -9 -T2 -c "$work/$n.onnx" > ".member_xz/$n.onnx.xz"; done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$work/w" openvino==2026.4.1 openvino-telemetry==2025.2.0
  mkdir "$work/ov" && for w in "$work"/w/*.whl; do (cd "$work/ov" && python3 -m zipfile -e "$w" .); done
  (cd "$work/ov/openvino" && rm -rf include cmake tools torch frontend/{paddle,tensorflow,pytorch,jax} \
     libs/{cache.json,tbb.pc,libopenvino_c.so.*,libopenvino_intel_{gpu,npu}_plugin.so,libopenvino_{auto_batch,hetero}_plugin.so} \
     libs/libopenvino_{gguf,jax,paddle,pytorch,tensorflow,tensorflow_lite}_frontend.so.* && find . -name '*.pyi' -delete)
  tar -cf - -C "$work/ov" openvino openvino_telemetry | xz -9 -T2 > .ovpack/ov.tar.xz
  rm -rf "$work"; du -ch .member_xz/* .ovpack/* .whl/* | tail -1 ;;
run)
  OUT=${OUT:-out/cpu_member_check}; mkdir -p "$OUT" /tmp/m
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -c "import tarfile,lzma,shutil; tarfile.open('.ovpack/ov.tar.xz').extractall('/tmp/site'); [shutil.copyfileobj(lzma.open(f'.member_xz/{n}.onnx.xz'), open(f'/tmp/m/{n}.onnx', 'wb')) for n in ('fp32', 'int8')]"
  export PYTHONPATH=/tmp/site:$PWD ARMSCOPE_BENCH_MEMBERS=/tmp/m PYTHONUNBUFFERED=1
  { date -u; lscpu | grep -E 'Model name|^CPU\(s\)'; grep -o -w -E 'amx_[a-z0-9]+|avx512_bf16|avx512_vnni|avx_vnni' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    python3 -c "import onnxruntime as o, openvino as v; print('ort', o.__version__, 'ov', v.__version__, v.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))"; } 2>&1 | tee "$OUT/env.txt"
  python3 -m pytest -q -p no:cacheprovider tests/test_backend_openvino.py -k bf16 2>&1 | tail -3 | tee "$OUT/ov_bf16_test.txt"
  B="python3 -m pytest -q -p no:cacheprovider benchmarks/bench_member_cpu.py --benchmark-only --benchmark-columns=median,min,max,rounds"
  $B --benchmark-json "$OUT/all.json" 2>&1 | tail -14 | tee "$OUT/all.txt"
  taskset -c 0,1 $B --benchmark-json "$OUT/two.json" 2>&1 | tail -14 | tee "$OUT/two.txt" ;;
*) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
