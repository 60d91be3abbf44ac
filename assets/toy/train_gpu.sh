#!/usr/bin/env bash
# The toy recipe on one GPU, in one call (a lent H100/H200, through the device tool):
#   bash assets/toy/train_gpu.sh OUT_DIR            SCALE=0.01 for a dry run of the same path on a CPU
# 1. bench/train_step.py --model toy: samples/s of a compiled stage-0 step at 64 pairs, uncached and cached;
# 2. the data set (toy.py make); 3. the recipe at 64 pairs a step (toy.py train --batch 64: an eighth of the steps,
#    sqrt(8) times the learning rates), then its held-out table. OUT_DIR gets the logs and the final weights folder.
set -euo pipefail
out=${1:?usage: bash assets/toy/train_gpu.sh OUT_DIR}
scale=${SCALE:-1}
mkdir -p "$out" && out=$(cd "$out" && pwd)
work=$(mktemp -d) start=$(date +%s)
export PYTHONUNBUFFERED=1
python3 bench/train_step.py --model toy --nproc 1 --batch 64 --steps 40 --compile 2>&1 | tee "$out/train_step.log"
python3 toy.py make "$work/data" > "$out/make.log"
python3 toy.py train --data "$work/data" --out "$work/run" --batch 64 --threads 8 --scale "$scale" 2>&1 \
    | tee "$out/toy.log"
cp -r "$work/run/s2/ema" "$out/weights"
echo "done in $(($(date +%s) - start)) s" | tee -a "$out/toy.log"
