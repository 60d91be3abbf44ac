"""Where a toy model reads the reference: copy ability and, per block and head, the image tokens' attention on the
SigLIP token at their own position (the "read my own patch" route of toy.toy_siglip).

    python bench/toy_probe.py FOLDER [FOLDER ...] [--data data/toy] [--n 16] [--copies 100] [--sigma 0.5]

Copy: `copy the image` on the first --copies held-out references, sampled as sample.py does (toy.outputs); a pair is
copied when >= 95% of its pixels get the right palette colour. Attention: one velocity call at noise level --sigma on
the first --n references noised with seed 0; for each FLUX block (d0, d1: double; s0, s1: single) and head, the mean
over image tokens of the attention weight on the own-position SigLIP token / on all 64 SigLIP tokens / on the VLM
tokens. FOLDER: a toy export (toy.py train's <run>/<stage>/ema, or assets/toy).
"""

import argparse
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flux  # noqa: E402
import toy  # noqa: E402

COPY = "copy the image\n<image>"


def copy_ability(model, encoders, refs: list[np.ndarray]) -> str:
    """Copy pairs sampled as sample.py does: mean pixel accuracy, share copied (>= 95% right) and PSNR."""
    outs = toy.outputs(model, encoders, [{"text": COPY, "refs": [r], "target": r} for r in refs], progress=False)
    acc = np.array([(toy.classify(o) == toy.classify(r)).mean() for r, o in zip(refs, outs, strict=True)])
    db = np.mean([toy.psnr(o, r) for r, o in zip(refs, outs, strict=True)])
    return f"copy: pixels right {acc.mean():.3f}, copied (>= 95%) {np.mean(acc >= 0.95):.0%}, PSNR {db:.1f} dB"


@torch.no_grad()
def attention_probe(model, encoders, refs: list[np.ndarray], sigma: float) -> list[tuple[str, torch.Tensor]]:
    """Per block: (H, 3) attention of the image tokens on [own-position SigLIP token, all SigLIP tokens, VLM tokens]."""
    feats = encoders.features([COPY] * len(refs), [[Image.fromarray(r)] for r in refs])
    txt = model.text_stream(feats)  # (B, L, D), SigLIP tokens before each <|vision_end|>, left-padded
    L, T = txt.shape[1], feats[0]["siglip"].shape[1]
    start = torch.tensor([L - len(f["vlm"]) - T + int(f["vision_end"][0]) for f in feats])  # (B,) first SigLIP
    rows = []

    def probe(q, k, v, pe):  # flux.attention with its weights recorded
        logits = flux.apply_rope(q, pe) @ flux.apply_rope(k, pe).transpose(-1, -2) / math.sqrt(q.shape[-1])
        a = logits.softmax(-1)  # (B, H, L + 64, L + 64)
        img = a[:, :, L:]  # (B, H, 64, L + 64): the image tokens' queries
        sig = torch.stack([img[b, :, :, s : s + T] for b, s in enumerate(start.tolist())])  # (B, H, 64, T)
        own = sig.diagonal(dim1=2, dim2=3).mean((0, 2))  # (H,)
        on_sig = sig.sum(-1).mean((0, 2))
        on_vlm = img[..., :L].sum(-1).mean((0, 2)) - on_sig
        rows.append(torch.stack([own, on_sig, on_vlm], -1))
        return attention(q, k, v, pe)

    attention, flux.attention = flux.attention, probe
    try:
        x0 = toy.PixelAE().encode(toy.to_tensor(refs))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        pooled = torch.zeros(len(refs), model.denoiser.config.vec_in_dim)  # no CLIP in the toy, as trained
        model.velocity((1 - sigma) * x0 + sigma * noise, torch.full((len(refs),), sigma), txt, pooled, 1.0)
    finally:
        flux.attention = attention
    names = [f"d{i}" for i in range(len(model.denoiser.double_blocks))]
    names += [f"s{i}" for i in range(len(model.denoiser.single_blocks))]
    return list(zip(names, rows, strict=True))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--data", default="data/toy")
    p.add_argument("--n", type=int, default=16, help="references in the attention probe")
    p.add_argument("--copies", type=int, default=100, help="references copied (0: skip)")
    p.add_argument("--sigma", type=float, default=0.5)
    args = p.parse_args()
    torch.set_num_threads(1)
    refs = [r["refs"][0] for r in toy.load_records(args.data, "test") if r["refs"]]
    for folder in args.folders:
        model, encoders, _ = toy.load_toy(folder)
        print(folder)
        if args.copies:
            print("  " + copy_ability(model, encoders, refs[: args.copies]))
        print("  attention of image tokens, per head: own-position SigLIP token / all SigLIP / VLM")
        for name, row in attention_probe(model, encoders, refs[: args.n], args.sigma):
            heads = (f"h{h}: {own:.2f}/{sig:.2f}/{vlm:.2f}" for h, (own, sig, vlm) in enumerate(row.tolist()))
            print(f"  {name}: " + "  ".join(heads))
