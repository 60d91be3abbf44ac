"""Images per second of many prompts: one `python sample.py` per prompt, against one `python sample.py --batch`.

    python bench/batch_generation.py [--rows 48] [--batch-size 16] [--threads 2]

Both sides make the same images (the toy's held-out pairs of assets/toy/examples/batch.jsonl, repeated with other
seeds up to --rows), on the bundled toy model, each process with --threads OpenMP threads. One process per prompt is
what sample.py offered before --batch: every image pays the start-up (imports, model loading). The --batch side is
timed twice: the whole command, and its generation alone (generate() in batches of --batch-size against one at a
time, in this process).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BATCH = os.path.join(ROOT, "assets", "toy", "examples", "batch.jsonl")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=6, help="one-process-per-prompt runs timed (then scaled)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    base = [json.loads(line) for line in open(BATCH)]
    rows = [{**r, "seed": 1000 + i, "name": f"{i:04d}",
             "images": [os.path.join(os.path.dirname(BATCH), p) for p in r["images"]]}
            for i, r in enumerate(base[i % len(base)] for i in range(args.rows))]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for r in rows[: args.processes]:
            mode = ["--edit", *(a for p in r["images"] for a in ("--image", p))] if r["images"] else ["--t2i"]
            subprocess.run([sys.executable, "sample.py", *mode, "--prompt", r["prompt"], "--seed", str(r["seed"]),
                            "--out", os.path.join(tmp, f"{r['name']}.png")], cwd=ROOT, env=env, check=True,
                           capture_output=True)
        alone = args.processes / (time.perf_counter() - t0)
        path = os.path.join(tmp, "rows.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "sample.py", "--batch", path, "--out", os.path.join(tmp, "batch"),
                        "--batch-size", str(args.batch_size)], cwd=ROOT, env=env, check=True, capture_output=True)
        batched = args.rows / (time.perf_counter() - t0)

    import torch
    from PIL import Image

    import sample

    torch.set_num_threads(args.threads)
    weights = sample.BUNDLED
    cli = argparse.Namespace(flux=None, siglip=None, ask=None, offload=False, vlm_pixels=None, joint_t5=None)
    model, encoders, _ = sample.load(cli, weights, sample.defaults_of(weights), torch.device("cpu"), torch.float32)
    prompts, refs = [r["prompt"] for r in rows], [[Image.open(p) for p in r["images"]] for r in rows]
    seeds, rates = [r["seed"] for r in rows], {}
    for size in (1, args.batch_size):
        t0 = time.perf_counter()
        for i in range(0, len(rows), size):
            sample.generate(model, encoders, prompts[i : i + size], refs[i : i + size], 32, 32, seeds[i : i + size],
                            steps=20, guidance=1.0, progress=False)
        rates[size] = len(rows) / (time.perf_counter() - t0)
    print(f"the bundled toy model, 32x32, 20 steps, {args.rows} images, {args.threads} threads per process")
    print("| how | images/s | vs one process per prompt |\n|---|---|---|")
    print(f"| one `python sample.py` per prompt ({args.processes} timed) | {alone:.2f} | 1.0x |")
    print(f"| `python sample.py --batch` (--batch-size {args.batch_size}), whole command | {batched:.2f} | "
          f"{batched / alone:.1f}x |")
    print(f"| generate() one at a time, in one process | {rates[1]:.2f} | {rates[1] / alone:.1f}x |")
    print(f"| generate() {args.batch_size} at a time, in one process | {rates[args.batch_size]:.2f} | "
          f"{rates[args.batch_size] / alone:.1f}x |")


if __name__ == "__main__":
    main()
