"""Our Flux against diffusers' FluxTransformer2DModel: same weights (through our converter), same inputs, on CPU.

    python bench/flux_forward.py [--hidden 512 --double 4 --single 8 --img 1024 --txt 300 --runs 7] [--profile]

Both models run the same forward under torch.no_grad, alternating, after a warm-up; the table gives the median of
--runs per dtype and the ratio ours / diffusers (goal <= 0.9). The outputs are compared too, so a speed-up that
changed the numerics would show. --profile splits both models' fp32 time into GEMMs, attention and the rest
(torch.profiler), and prints the best ratio reachable if all of our other work were free.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flux  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--double", type=int, default=4)
    ap.add_argument("--single", type=int, default=8)
    ap.add_argument("--img", type=int, default=1024, help="image tokens (a square grid)")
    ap.add_argument("--txt", type=int, default=300, help="text tokens")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    from diffusers import FluxTransformer2DModel

    heads = args.hidden // 64
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(in_channels=64, num_layers=args.double, num_single_layers=args.single,
                                 attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=1024,
                                 pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(8, 28, 28)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = flux.load_flux(tmp)
    side = int(args.img**0.5)
    x = dict(img=torch.randn(1, side * side, 64), img_ids=flux.image_ids(2 * side, 2 * side),
             txt=torch.randn(1, args.txt, 1024), txt_ids=flux.text_ids(args.txt), timesteps=torch.tensor([0.7]),
             y=torch.randn(1, 256), guidance=torch.tensor([3.5]))
    runs = {
        "ours": lambda: ours(**x),
        "diffusers": lambda: ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                                 timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                                 guidance=x["guidance"], return_dict=False)[0],
    }
    print(f"hidden {args.hidden}, {args.double} double + {args.single} single blocks, {args.img} image + {args.txt} "
          f"text tokens, batch 1; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | ours ms | diffusers ms | ours / diffusers | max abs diff |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        ours.to(dtype), ref.to(dtype)
        x = {k: v.to(dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v for k, v in x.items()}
        times = {name: [] for name in runs}
        with torch.no_grad():
            outs = {name: f() for name, f in runs.items()}  # warm-up
            for _ in range(args.runs):
                for name, f in runs.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        diff = (outs["ours"].float() - outs["diffusers"].float()).abs().max().item()
        print(f"| {str(dtype).split('.')[1]} | {med['ours']:.0f} | {med['diffusers']:.0f} | "
              f"{med['ours'] / med['diffusers']:.2f} | {diff:.1e} |")
    if args.profile:
        ours.float()
        ref.float()
        x = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
        print("\nfp32 self time by kind of operator (torch.profiler, one forward after the runs above):")
        print("| model | linear (GEMM) ms | attention (SDPA) ms | everything else ms | total ms |")
        print("|---|---|---|---|---|")
        split = {name: profile(f) for name, f in runs.items()}
        for name, (gemm, attn, rest) in split.items():
            print(f"| {name} | {gemm:.0f} | {attn:.0f} | {rest:.0f} | {gemm + attn + rest:.0f} |")
        (g, a, _), d = split["ours"], sum(split["diffusers"])
        print(f"ceiling: with everything but its GEMMs and SDPA free, ours / diffusers would be {(g + a) / d:.2f}")


GEMM = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")


def profile(forward) -> tuple[float, float, float]:
    """ms of self CPU time in GEMMs, in attention kernels, and in every other operator, for one forward."""
    with torch.no_grad(), torch.profiler.profile() as prof:
        forward()
    gemm = attn = rest = 0.0
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1000
        if e.key in GEMM:
            gemm += ms
        elif "attention" in e.key:
            attn += ms
        else:
            rest += ms
    return gemm, attn, rest


if __name__ == "__main__":
    main()
