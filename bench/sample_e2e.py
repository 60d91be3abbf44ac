"""End-to-end sampling time, split into encoders / denoiser / decode (sample.generate, on the CPU or a GPU).

    python bench/sample_e2e.py [--steps 28 --size 256 --runs 3] [--weights DIR --flux DIR --siglip DIR]

Without weight flags it times the bundled toy model (assets/toy/); --weights tiny times tiny random models with the
real interfaces (tiny Qwen2.5-VL and SigLIP, the tiny FLUX and autoencoder presets). The split comes from timers
around Encoders.features + pooled (encoders), UniWorld.text_stream + velocity (denoiser) and the decode.
On a busy CPU, set OMP_NUM_THREADS=1: tiny models spend most of their time in thread hand-offs otherwise.
"""

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sample  # noqa: E402


def tiny_pipeline():
    import flux
    from encoders import tiny_siglip, tiny_vlm
    from model import Encoders, UniWorld

    torch.manual_seed(0)
    encoders = Encoders(vlm=tiny_vlm(0), siglip=tiny_siglip(0), ae=flux.AutoEncoder(flux.AE_CONFIGS["tiny"]))
    return UniWorld(flux.Flux(flux.FLUX_CONFIGS["tiny"]), vlm_dim=64, siglip_dim=32).eval(), encoders


def timer(totals: dict, key: str, obj, name: str) -> None:
    """Wrap obj.name so that its wall time adds to totals[key]."""
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[key] += time.perf_counter() - t0
        return out

    setattr(obj, name, timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=None, help="output side (default: 1024 real, 32 toy, 64 tiny)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--weights", help="a weights folder or hub id; 'tiny' for random tiny models (default: the toy)")
    ap.add_argument("--flux")
    ap.add_argument("--siglip")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.weights != "tiny":
        weights = sample.locate(args.weights or sample.BUNDLED, "--weights")
        cli = SimpleNamespace(flux=args.flux, siglip=args.siglip, ask=None, offload=False, vlm_pixels=None,
                              joint_t5=None)
        model, encoders, _ = sample.load(cli, weights, sample.defaults_of(weights), device, dtype)
        what = args.weights or "the bundled toy model"
    else:
        model, encoders = tiny_pipeline()
        what = "tiny random models"
    size = args.size or (1024 if args.weights not in (None, "tiny") else 32 if args.weights is None else 64)
    totals = defaultdict(float)
    timer(totals, "encoders", encoders, "features")
    timer(totals, "encoders", encoders, "pooled")
    timer(totals, "denoiser", model, "text_stream")
    timer(totals, "denoiser", model, "velocity")
    timer(totals, "decode", encoders.ae, "decode")
    reference = Image.new("RGB", (size, size), "gray")
    runs = []
    for i in range(args.runs + 1):  # the first is a warm-up
        totals.clear()
        t0 = time.perf_counter()
        sample.generate(model, encoders, ["make the red square blue"], [[reference]], size, size, seeds=[i],
                        steps=args.steps, progress=False)
        runs.append({**totals, "total": time.perf_counter() - t0})
    med = {k: statistics.median(r[k] for r in runs[1:]) for k in ("encoders", "denoiser", "decode", "total")}
    print(f"{what}; {device}, {dtype}, {size}x{size}, {args.steps} steps, 1 image, median of {args.runs}")
    print("| encoders s | denoiser s | decode s | total s | denoiser ms / step |\n|---|---|---|---|---|")
    print(f"| {med['encoders']:.3f} | {med['denoiser']:.3f} | {med['decode']:.3f} | {med['total']:.3f} | "
          f"{1000 * med['denoiser'] / args.steps:.1f} |")


if __name__ == "__main__":
    main()
