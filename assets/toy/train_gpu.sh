#!/usr/bin/env bash
# The toy recipe on one lent GPU, in one call of the device tool (kept with its log, as the toy-world issue asks):
# the dataset and the frozen encoders' caches are built on the CPU cores while bench/gpu.py times full-size FLUX on
# the GPU; then `toy.py train` fits the recipe into the seconds left, 64 pairs a step.
#   bash assets/toy/train_gpu.sh OUT_DIR [SECONDS]    (SECONDS: the whole run, default 540; OUT_DIR gets the logs
#                                                      and toy-run.tgz: stage 0's and stage 2's EMA exports, every stage's metrics)
set -euo pipefail
out=${1:?usage: bash assets/toy/train_gpu.sh OUT_DIR [SECONDS]}
budget=${2:-540}
scale=${SCALE:-0.25}  # copies 1,000 steps, stage 1 125, stage 2 250 (stage 0: the time left)
flags=${FLAGS:---batch_size 64 --workers 8}
start=$(date +%s) work=/tmp/toy-gpu
export PYTHONUNBUFFERED=1
mkdir -p "$out" $work && out=$(cd "$out" && pwd)
python3 toy.py make $work/data > "$out/make.log"
common=$(python3 -c "import toy; print(toy.COMMON)")
cache() {  # $1 data.txt, $2 the cache folder: train.py --steps 0 on 8 CPU ranks writes the cache, then stops
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 python3 -m torch.distributed.run --standalone --nproc_per_node 8 train.py \
    $common --stage 0 --data "$1" --cache "$2" --steps 0 --out $work/cache-run
}
(cache $work/data/copy.txt $work/run/cache/copy && cache $work/data/train.txt $work/run/cache/train) \
  > "$out/cache.log" 2>&1 &
timeout 300 python3 bench/gpu.py --runs 6 2>&1 | tee "$out/gpu.log" || echo "bench/gpu.py: failed or out of time"
wait
minutes=$(python3 -c "import time; print(($start + $budget - time.time() - 30) / 60)")
python3 -c "import toy; toy.train('$work/data', '$work/run', $scale, flags='$flags', minutes=$minutes)" 2>&1 \
  | tee "$out/toy.log"
(cd $work/run && tar czf "$out/toy-run.tgz" s0/ema s2/ema */metrics.jsonl */train_config.json)
echo "done in $(($(date +%s) - start)) s"
