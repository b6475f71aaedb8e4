#!/usr/bin/env bash
# Rebuild the demo bundles in samples/ from the bundled real H&E samples, with the
# project's own commands (needs the [tf] extra). About 40 minutes on 2 cores.
#   1. camera frames (samples/frames) and training sets of tile mosaics
#   2. a 5-fold ensemble of tiled mini DenseNets (the paper's 5-fold CV layout), tumour vs other
#   3. export to an ONNX bundle with in-graph tiling and Grad-CAM
#   4. the cascade's second step (which of 8 non-tumour tissues; 3 folds), the shape of
#      the paper's IIM -> subtypes step: armscope cascade samples/demo_bundle
#      --then other=samples/demo_tissue_bundle --out DIR joins the two
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python scripts/make_demo_data.py --train "$work/train" --train-tissue "$work/tissue"
armscope train "$work/train" --out "$work/members" --backbone densenet-mini --folds 5 --epochs 6 --seed 1
armscope export "$work"/members/member_*.keras --out samples/demo_bundle --force \
  --name demo-tumour-vs-other --classes other,tumour --task binary --positive-class tumour --threshold 0.3 \
  --description "DEMO ONLY, not a diagnostic model: tiled mini DenseNet x5 trained on mosaics of 9 NCT-CRC-HE-100K tiles (CC BY 4.0)"
armscope inspect samples/demo_bundle
armscope train "$work/tissue" --out "$work/tissue_members" --backbone densenet-mini --folds 3 --epochs 16 --seed 1
armscope export "$work"/tissue_members/member_*.keras --out samples/demo_tissue_bundle --force \
  --name demo-tissue-type \
  --description "DEMO ONLY, not a diagnostic model: the demo cascade's second step (tissue type of a non-tumour field); tiled mini DenseNet x3 trained on mosaics of 8 NCT-CRC-HE-100K tiles (CC BY 4.0)"
armscope inspect samples/demo_tissue_bundle
