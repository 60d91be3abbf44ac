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
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import toy  # noqa: E402
import toy_data  # noqa: E402

COPY = "copy the image\n<image>"


def copy_ability(model, encoders, refs: list[np.ndarray]) -> str:
    """Copy pairs sampled as sample.py does: mean pixel accuracy, share copied (>= 95% right) and PSNR."""
    outs = toy.outputs(model, encoders, [{"text": COPY, "refs": [r], "target": r} for r in refs], progress=False)
    acc = np.array([(toy_data.classify(o) == toy_data.classify(r)).mean() for r, o in zip(refs, outs, strict=True)])
    db = np.mean([toy_data.psnr(o, r) for r, o in zip(refs, outs, strict=True)])
    return f"copy: pixels right {acc.mean():.3f}, copied (>= 95%) {np.mean(acc >= 0.95):.0%}, PSNR {db:.1f} dB"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--data", default="data/toy")
    p.add_argument("--n", type=int, default=16, help="references in the attention probe")
    p.add_argument("--copies", type=int, default=100, help="references copied (0: skip)")
    p.add_argument("--sigma", type=float, default=0.5)
    args = p.parse_args()
    torch.set_num_threads(1)
    refs = [r["refs"][0] for r in toy_data.load_records(args.data, "test") if r["refs"]]
    for folder in args.folders:
        model, encoders = toy.load_toy(folder)
        print(folder)
        if args.copies:
            print("  " + copy_ability(model, encoders, refs[: args.copies]))
        print("  attention of image tokens, per head: own-position SigLIP token / all SigLIP / VLM")
        for name, row in toy.attention_probe(model, encoders, refs[: args.n], args.sigma):
            heads = (f"h{h}: {own:.2f}/{sig:.2f}/{vlm:.2f}" for h, (own, sig, vlm) in enumerate(row.tolist()))
            print(f"  {name}: " + "  ".join(heads))
