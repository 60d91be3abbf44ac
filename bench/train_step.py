"""Training throughput of train.py with and without the encoder cache, stages 1 and 2 (tiny models, CPU or GPUs).

    python bench/train_step.py [--nproc 2] [--steps 20] [--resolution 64]

Writes the small synthetic dataset of tests/test_data.py to a temporary folder, runs train.py under torchrun for
each setting, and reports the median steps/s and samples/s of metrics.jsonl after the first 3 steps (warm-up).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.test_data import make_dataset  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_txt = make_dataset(os.path.join(tmp, "data"))
        print(f"train.py --model tiny, {args.nproc} ranks, batch 1 per rank, {args.resolution}², {args.steps} steps")
        print("| stage | encoders | steps/s | samples/s |\n|---|---|---|---|")
        for stage in (1, 2):
            for cached in (False, True):
                out = os.path.join(tmp, f"s{stage}{'c' if cached else ''}")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                       "train.py", "--model", "tiny", "--stage", str(stage), "--data", data_txt, "--out", out,
                       "--resolution", str(args.resolution), "--steps", str(args.steps), "--log_every", "1",
                       "--val_every", str(10 * args.steps), "--val_steps", "1", "--val_samples", "1",
                       "--ckpt_every", str(10 * args.steps), "--max_bad", "0.9", "--workers", "0"]
                if cached:
                    cmd += ["--cache", os.path.join(tmp, f"cache{stage}")]
                run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"train.py failed ({' '.join(cmd)}):\n{run.stderr[-5000:]}")
                with open(os.path.join(out, "metrics.jsonl")) as f:
                    log = [json.loads(line) for line in f][3:-1]  # warm-up; the last step also validates
                steps = statistics.median(m["steps_per_s"] for m in log)
                samples = statistics.median(m["samples_per_s"] for m in log)
                print(f"| {stage} | {'cached' if cached else 'run each step'} | {steps:.1f} | {samples:.1f} |")


if __name__ == "__main__":
    main()
