"""Training throughput of train.py, with and without the encoder cache, on 1 process and under torchrun (CPU or GPUs).

    python bench/train_step.py [--model tiny|toy|mid] [--nproc 1 2] [--steps 20] [--batch 8] [--workers 0] [--compile]

tiny: the random tiny models at 64², stages 1 and 2, batch 1 per rank, on a small toy data set.
toy: the toy world's stage 0 (toy.py: the whole denoiser from scratch, what most of its recipe runs) through
`toy.py stage` (train.main with the toy preset), 32², --batch pairs per rank (8), on a toy data set of 30 batches.
mid: the tiny encoders with a mid-size FLUX (bench/flux_forward.py's: hidden 512, 4 double + 8 single blocks, 71M
parameters), 256² (256 image tokens), stages 1 and 2, batch 1 per rank; this script is then torchrun's entry point
too, adding the preset to train.MODELS. Each setting is one train.py run; the table has the median
steps/s and samples/s of its metrics.jsonl after the first 3 logs (warm-up). On a busy CPU, set OMP_NUM_THREADS=1.
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
import flux  # noqa: E402
import model as M  # noqa: E402
import toy_data  # noqa: E402
import train  # noqa: E402

MID = flux.FluxConfig(vec_in_dim=16, context_in_dim=512, hidden_size=512, num_heads=8, depth=4, depth_single_blocks=8,
                      axes_dim=(8, 28, 28))


def mid_models(cfg, device):
    """train.py's tiny preset with the mid-size FLUX in place of the tiny one."""
    _, encoders = train.tiny_models(cfg, device)
    return M.UniWorld(flux.Flux(MID), vlm_dim=64, siglip_dim=32), encoders


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "toy", "mid"], default="tiny")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="toy: pairs per rank and step")
    ap.add_argument("--workers", type=int, default=0, help="data loader processes per rank")
    ap.add_argument("--compile", action="store_true", help="train.py --compile")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        toy_data.make_dataset(os.path.join(tmp, "data"), n_train=30 * args.batch, n_test=6)
        data_txt = os.path.join(tmp, "data", "train.txt")
        if args.model == "toy":
            stages = (0,)
            flags = ["--resolution", "32", "--batch_size", str(args.batch), "--lr", "2e-3", "--qk_norm_lr", "10"]
        else:
            stages = (1, 2)
            flags = ["--resolution", "256" if args.model == "mid" else "64", "--batch_size", "1"]
        flags += ["--compile"] if args.compile else []
        entry = {"mid": ["bench/train_step.py", "--worker"], "toy": ["toy.py", "stage"]}.get(args.model, ["train.py"])
        print(f"train.py --model {args.model} {' '.join(flags)}, {args.steps} steps")
        print("| stage | ranks | encoders | steps/s | samples/s |\n|---|---|---|---|---|")
        for stage in stages:
            for nproc in args.nproc:
                for cached in (False, True):
                    out = os.path.join(tmp, f"s{stage}-{nproc}{'c' if cached else ''}")
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *entry, "--model", args.model, "--stage", str(stage), "--data", data_txt, "--out", out,
                           *flags, "--steps", str(args.steps), "--log_every", "1", "--val_every",
                           str(10 * args.steps), "--val_steps", "1", "--val_samples", "1", "--ckpt_every",
                           str(10 * args.steps), "--max_bad", "0.9", "--workers", str(args.workers)]
                    if cached:
                        cmd += ["--cache", os.path.join(tmp, f"cache{stage}")]
                    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                    if run.returncode:
                        sys.exit(f"train.py failed ({' '.join(cmd)}):\n{run.stderr[-5000:]}")
                    with open(os.path.join(out, "metrics.jsonl")) as f:
                        log = [json.loads(line) for line in f][3:-1]  # warm-up; the last step also validates
                    steps = statistics.median(m["steps_per_s"] for m in log)
                    samples = statistics.median(m["samples_per_s"] for m in log)
                    print(f"| {stage} | {nproc} | {'cached' if cached else 'run each step'} | {steps:.1f} | "
                          f"{samples:.1f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # a torchrun rank of the mid preset: train.py with MODELS["mid"]
        train.MODELS["mid"] = mid_models
        train.main(sys.argv[2:])
    else:
        main()
