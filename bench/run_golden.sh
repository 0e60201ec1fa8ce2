#!/usr/bin/env bash
# Benchmark golden models against ONNX Runtime's own INT8 quantizer; tables on stdout, JSON under bench/results/.
#   bash bench/run_golden.sh                    # the default set below
#   bash bench/run_golden.sh resnet18 --quick   # one model, quick mode
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then models=("$1"); shift; else
  models=(resnet18 mobilenet_v2 resnet20-digits resnet20-hard-digits mobilenetv2-hard-digits vit-tiny-hard-digits); fi
for model in "${models[@]}"; do
  echo "== $model"
  fxcompress bench "$model" --json "bench/results/$model.json" "$@"
done
