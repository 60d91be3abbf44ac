"""Peak resident memory while loading a mid-size FLUX checkpoint, relative to the checkpoint's size.

    python bench/load.py [--hidden 1536 --depth 4 --single 8]

Builds a random FLUX-architecture model, saves it in the BFL and diffusers layouts, then loads each in a fresh
process with flux.load_flux and reports peak RSS (VmHWM) minus the RSS before loading, divided by the file size.
A ratio near 1.0 means the weights were held once: built on the meta device, filled tensor by tensor.
"""

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import sys, torch, flux
def kb(field):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) * 1024
base = kb('VmRSS:')
model = flux.load_flux(sys.argv[1], dtype=torch.float32 if sys.argv[2] == 'fp32' else torch.bfloat16)
print(kb('VmHWM:') - base, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    args = ap.parse_args()
    import torch

    import flux

    c = flux.FluxConfig(hidden_size=args.hidden, num_heads=args.hidden // 128, depth=args.depth,
                        depth_single_blocks=args.single)
    with tempfile.TemporaryDirectory() as tmp:
        model = flux.Flux(c)
        paths = {"bfl": os.path.join(tmp, "flux.safetensors"), "diffusers": os.path.join(tmp, "transformer")}
        flux.save_flux(model, paths["bfl"], "bfl")
        flux.save_flux(model, paths["diffusers"], "diffusers")
        n = sum(p.numel() for p in model.parameters())
        del model
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        print(f"FLUX-architecture checkpoint, hidden {args.hidden}, {args.depth}+{args.single} blocks, "
              f"{n / 1e6:.0f}M params, fp32 on disk; torch {torch.__version__}")
        print(f"| {'layout':<10} | {'load as':<7} | {'file MB':>8} | {'peak RSS - base MB':>18} | {'ratio':>5} |")
        print(f"|{'-' * 12}|{'-' * 9}|{'-' * 10}|{'-' * 20}|{'-' * 7}|")
        for fmt, path in paths.items():
            size = os.path.getsize(path) if os.path.isfile(path) else sum(
                os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
            for dtype in ("fp32", "bf16"):
                out = subprocess.run([sys.executable, "-c", CHILD, path, dtype], capture_output=True, text=True,
                                     cwd=root, check=True).stdout.split()
                peak, held = int(out[0]), int(out[1])
                print(f"| {fmt:<10} | {dtype:<7} | {size / 2**20:8.0f} | {peak / 2**20:18.0f} | {peak / size:5.2f} |"
                      f"  (weights held: {held / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
