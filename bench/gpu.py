"""The GPU figures, in one prepared run (<= 8 minutes on an H100/H200): full-size FLUX.1-dev, random weights, bf16.

    python bench/gpu.py             # on a GPU: 1024² (4096 image tokens) with a UniWorld-sized context of 1400 tokens
    python bench/gpu.py --dry-run   # anywhere: tiny sizes, the same code path (what CI can check)

1. forward time per denoising step, ours vs diffusers' FluxTransformer2DModel in the same process and with the same
   weights (through our converter), and MFU = FLOPs counted from the shapes / time / the GPU's dense bf16 peak;
2. the same with torch.compile of every block;
3. one stage-2 training step with FSDP2 on this GPU (train.shard: per-block units, activation checkpointing,
   bf16 compute over fp32 master weights), AdamW over the stage-2 parameters, with its peak memory;
4. the sharded EMA update at full size (ema.ShardedEMA over the 4.1B stage-2 parameters).
Stage 2 holds fp32 weights (48 GB), fp32 gradients and Adam moments of 4.1B parameters (49 GB): use the 141 GB
nvidia-h200 kind; on an 80 GB card step 3 reports the out-of-memory instead of a time.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flux  # noqa: E402
import model as M  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)


def flops_per_forward(c: flux.FluxConfig, n_img: int, n_txt: int) -> float:
    """Matmul FLOPs of one MMDiT forward: every block does 24·h² per token in linears and 4·L²·h in attention."""
    h, L = c.hidden_size, n_img + n_txt
    linears = 2 * L * (3 * h * h + h * h + 2 * h * int(h * c.mlp_ratio))  # qkv, proj, mlp in + out (same per block)
    attention = 4 * L * L * h  # Q·Kᵀ and P·V
    return (c.depth + c.depth_single_blocks) * (linears + attention) + 2 * n_img * h * (c.in_channels + c.out_channels)


def timed(fn, runs: int, device) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_flux(config: flux.FluxConfig, device, dtype) -> flux.Flux:
    """A Flux with random weights made directly on the device (no 24 GB init on the host)."""
    with torch.device("meta"):
        model = flux.Flux(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


def forward_section(args, config, device, dtype, peak) -> None:
    from diffusers import FluxTransformer2DModel

    ours = random_flux(config, device, dtype)
    head = config.hidden_size // config.num_heads
    with torch.device("meta"):
        ref = FluxTransformer2DModel(in_channels=config.in_channels, num_layers=config.depth,
                                     num_single_layers=config.depth_single_blocks, attention_head_dim=head,
                                     num_attention_heads=config.num_heads, joint_attention_dim=config.context_in_dim,
                                     pooled_projection_dim=config.vec_in_dim, guidance_embeds=True,
                                     axes_dims_rope=config.axes_dim)
    ref.load_state_dict(flux.flux_state_dict(ours, "diffusers"), assign=True)  # the same tensors, shared
    ref.eval()
    side = int(args.img**0.5)
    g = torch.Generator(device).manual_seed(0)
    x = dict(img=torch.randn(1, side * side, config.in_channels, device=device, dtype=dtype, generator=g),
             img_ids=flux.image_ids(2 * side, 2 * side, device=device),
             txt=torch.randn(1, args.txt, config.context_in_dim, device=device, dtype=dtype, generator=g),
             txt_ids=flux.text_ids(args.txt, device=device), timesteps=torch.tensor([0.7], device=device, dtype=dtype),
             y=torch.randn(1, config.vec_in_dim, device=device, dtype=dtype, generator=g),
             guidance=torch.tensor([3.5], device=device, dtype=dtype))
    def diffusers(x):  # our argument names -> diffusers'
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                   return_dict=False)[0]

    runs = {"ours": lambda: ours(**x), "diffusers": lambda: diffusers(x)}
    fl = flops_per_forward(config, side * side, args.txt)
    print(f"\n1-2. forward, {side * side} image + {args.txt} text tokens, batch 1, {dtype}; {fl / 1e12:.1f} TFLOP each")
    print("| model | compiled | ms / step | MFU | 28 steps s |\n|---|---|---|---|---|")
    with torch.no_grad():
        out = {name: fn().float() for name, fn in runs.items()}  # eager, before any compile
        for compiled in (False, True):
            if compiled:
                for blocks in (ours.double_blocks, ours.single_blocks, ref.transformer_blocks,
                               ref.single_transformer_blocks):
                    for block in blocks:
                        block.compile()
            for name, fn in runs.items():
                t = timed(fn, args.runs, device)
                mfu = f"{fl / t / peak:.0%}" if peak else "n/a"
                print(f"| {name} | {'yes' if compiled else 'no'} | {t * 1e3:.0f} | {mfu} | {28 * t:.2f} |")
        # the yardstick for the bf16 difference: diffusers in fp32 on the same weights (run eagerly)
        with torch.compiler.set_stance("force_eager"):
            ref.float()
            exact = diffusers({k: v.float() if v.is_floating_point() else v for k, v in x.items()})
    pairs = {"ours vs diffusers": (out["ours"], out["diffusers"]), "ours vs fp32": (out["ours"], exact),
             "diffusers vs fp32": (out["diffusers"], exact)}
    print("relative difference |a - b| / |b| (same weights, eager): "
          + ", ".join(f"{k} {((a - b).norm() / b.norm()).item():.1e}" for k, (a, b) in pairs.items()))


def train_section(args, config, device) -> None:
    import torch.distributed as dist

    import train
    from ema import ShardedEMA

    if not dist.is_initialized():
        with tempfile.NamedTemporaryFile() as f:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{f.name}x",
                                    rank=0, world_size=1)
    vlm_dim, siglip_dim = (3584, 1152) if not args.dry_run else (64, 32)
    torch.manual_seed(0)
    with torch.device("meta"):
        uw = M.UniWorld(flux.Flux(config), vlm_dim, siglip_dim)
    uw.to_empty(device=device)
    with torch.no_grad():
        for p in uw.parameters():
            p.normal_(0, 0.02)
    trainable = M.set_stage(uw, 2)
    train.shard(uw, SimpleNamespace(grad_ckpt=True, precision="auto"), device)  # as train.py: blocks, then the root
    params = [p for p in uw.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.99), weight_decay=0.0, fused=True)  # as train.py
    side = int(args.img**0.5)  # packed grid side; latents are twice that
    n_vlm = args.txt - (1024 if not args.dry_run else 16)
    feats = [{"vlm": torch.randn(n_vlm, vlm_dim, device=device), "vision_end": torch.tensor([n_vlm - 40]),
              "siglip": torch.randn(1, 1024 if not args.dry_run else 16, siglip_dim, device=device)}]
    batch = {"latents": torch.randn(1, 16, 2 * side, 2 * side, device=device), "features": feats,
             "pooled": torch.zeros(1, config.vec_in_dim, device=device)}

    def step():
        loss = uw.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    n = sum(p.numel() for p in params)
    print(f"\n3. stage-2 training step, FSDP2 on 1 device, activation checkpointing, {n / 1e9:.3f}B trainable "
          f"({len(trainable)} tensors), {args.txt}-token context")
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = timed(step, max(1, args.runs // 2), device)
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (CPU)"
        print(f"| s / step | peak memory |\n|---|---|\n| {t:.2f} | {peak} |")
    except torch.OutOfMemoryError as e:
        print(f"out of memory ({str(e).splitlines()[0]}): run on the nvidia-h200 kind")
    opt.zero_grad(set_to_none=True)
    opt.state.clear()  # the Adam moments: room for the EMA
    ema = ShardedEMA(uw)
    t = timed(lambda: ema.update(uw), args.runs, device)
    ema_bytes = sum(s.numel() * 4 for s in ema.shards.values())
    print(f"\n4. sharded EMA update over {n / 1e9:.3f}B parameters: {t * 1e3:.1f} ms, "
          f"{ema_bytes / 2**30:.2f} GiB of fp32 shards on this rank")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on whatever device: checks the code path")
    ap.add_argument("--img", type=int, default=4096, help="image tokens (1024² -> 64 x 64 packed)")
    ap.add_argument("--txt", type=int, default=1400, help="text tokens (VLM ~376 + SigLIP 1024)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: forward,train")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = flux.FLUX_CONFIGS["flux-dev"]
    if args.dry_run:
        config, args.img, args.txt, args.runs = flux.FLUX_CONFIGS["tiny"], 64, 40, 2
    elif device.type != "cuda":
        sys.exit("no GPU here: run with --dry-run, or on a GPU machine")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"{name}; torch {torch.__version__}; FLUX {config.depth}+{config.depth_single_blocks} blocks, "
          f"hidden {config.hidden_size}" + (" (dry run)" if args.dry_run else ""))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if "forward" not in args.skip:
        forward_section(args, config, device, dtype, peak)
        torch._dynamo.reset()  # the compiled blocks hold the forward's 24 GB of weights otherwise
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "train" not in args.skip:
        train_section(args, config, device)


if __name__ == "__main__":
    main()
