#!/usr/bin/env bash
# Rebuild the demo bundle in samples/demo_bundle from the bundled real H&E samples,
# with the project's own commands (needs the [tf] extra). About 15 minutes on 2 cores.
#   1. camera frames (samples/frames) and a training set of tile mosaics
#   2. a 5-fold ensemble of tiled mini DenseNets (the paper's 5-fold CV layout)
#   3. export to an ONNX bundle with in-graph tiling and Grad-CAM
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python scripts/make_demo_data.py --train "$work/train"
armscope train "$work/train" --out "$work/members" --backbone densenet-mini --folds 5 --epochs 6 --seed 1
armscope export "$work"/members/member_*.keras --out samples/demo_bundle --force \
  --name demo-tumour-vs-other --classes other,tumour --task binary --positive-class tumour --threshold 0.3 \
  --description "DEMO ONLY, not a diagnostic model: tiled mini DenseNet x5 trained on mosaics of 9 NCT-CRC-HE-100K tiles (CC BY 4.0)"
armscope inspect samples/demo_bundle
