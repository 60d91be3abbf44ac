"""The paper's ablations at toy scale, each over several seeds: the toy recipe focused on one task, as UniWorld and
with one piece changed (paper §4: SigLIP features, reference latents, the adaptive edit-region weighting).

    python bench/toy_ablations.py --data data/toy --out runs/ablations [--seeds 3] [--scale 0.25] [--tasks recolor]
        [--settings uniworld no-siglip] [--flags=--no-compile]

  uniworld      the method: VLM + SigLIP tokens in the text stream, log edit-region weighting
  no-siglip     without SigLIP tokens (train.py --siglip none): the reference reaches FLUX through Qwen alone
  ref-latents   + the reference's latents in the image stream (the official joint_ref_feature, off in the release;
                FLUX Kontext's way), the ReferenceLatents model below
  uniform       uniform instead of log edit-region weighting (train.py --weighting none)

Each setting runs toy.train (its steps times --scale, on --tasks and the copy pairs) for seeds 0..n-1 and scores the
held-out pairs of those tasks; the table has the mean and the range over the seeds.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flux  # noqa: E402
import toy  # noqa: E402
import toy_data  # noqa: E402
from model import Encoders, UniWorld  # noqa: E402

FLAGS = {"uniworld": "", "no-siglip": "--siglip none", "ref-latents": "--model toy-ref", "uniform": "--weighting none"}


class ReferenceLatents(UniWorld):
    """The official `joint_ref_feature` (not UniWorld's method): the reference's latents join the image stream as
    clean tokens with index 1 (as in FLUX Kontext); the output on them is dropped. They ride in each sample's features
    ("ref", from ReferenceEncoders); text_stream hands them to velocity."""

    @classmethod
    def of(cls, model: UniWorld) -> "ReferenceLatents":
        out = cls(model.denoiser, model.denoise_projector[0].in_features, model.siglip_projector[0].in_features)
        out.load_state_dict(model.state_dict())
        return out

    def text_stream(self, features: list[dict], t5: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        self.ref = torch.stack([f["ref"] for f in features])  # (B, C, h, w)
        return super().text_stream(features, t5)

    def velocity(self, x: Tensor, sigma: Tensor, txt: Tensor, y: Tensor, guidance: float,
                 txt_mask: Tensor | None = None) -> Tensor:
        B, _, h, w = x.shape
        img = torch.cat([flux.pack(x), flux.pack(self.ref.to(x))], 1)  # (B, 2 L, 4C)
        ids = torch.cat([flux.image_ids(h, w, 0, x.device), flux.image_ids(h, w, 1, x.device)])
        g = torch.full((B,), guidance, device=x.device, dtype=x.dtype)
        v = self.denoiser(img, ids, txt, flux.text_ids(txt.shape[1], device=x.device), sigma.to(x.dtype), y, g,
                          txt_mask)
        return flux.unpack(v[:, : h * w // 4], h, w)


class ReferenceEncoders(Encoders):
    """Encoders + each sample's first reference through the autoencoder as features["ref"] (zeros for t2i)."""

    def features(self, instructions: list[str], images: list[list], train: bool = True) -> list[dict]:
        out = super().features(instructions, images, train)
        for f, ims in zip(out, images, strict=True):
            size = (toy_data.SIZE, toy_data.SIZE)
            ref = np.asarray(ims[0].convert("RGB").resize(size)) if ims else np.zeros((*size, 3))
            f["ref"] = self.ae.encode(toy.to_tensor([ref]))[0] * bool(ims)  # (12, 16, 16)
        return out


def toy_ref(cfg, device):
    """train.py's `--model toy-ref`: the toy preset with the reference latents."""
    model, enc = toy.toy_models(cfg, device)
    return ReferenceLatents.of(model), ReferenceEncoders(enc.vlm, enc.siglip, enc.ae, enc.clip, enc.t5)


def load(folder: str) -> tuple[UniWorld, Encoders]:
    """A toy weights folder; ref-latents runs (config.json: joint_ref_feature) get their model and encoders back."""
    model, enc = toy.load_toy(folder)
    with open(os.path.join(folder, "config.json")) as f:
        if json.load(f).get("joint_ref_feature"):
            return ReferenceLatents.of(model).eval(), ReferenceEncoders(enc.vlm, enc.siglip, enc.ae)
    return model, enc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.25, help="of the toy recipe's steps")
    ap.add_argument("--tasks", nargs="+", default=["recolor"], choices=toy_data.TASKS)
    ap.add_argument("--settings", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flags", default="", help="train.py flags for every run (--flags=--no-compile: short runs)")
    args = ap.parse_args()
    entry = [sys.executable, os.path.abspath(__file__), "stage"]
    records = [r for r in toy_data.load_records(args.data, "test") if r["task"] in args.tasks]
    table = {}
    for setting in args.settings:
        for seed in range(args.seeds):
            out = os.path.abspath(os.path.join(args.out, setting, f"seed{seed}"))
            flags = f"{FLAGS[setting]} {args.flags} --seed {seed}"
            toy.train(os.path.abspath(args.data), out, flags, args.tasks, args.scale, args.threads, entry,
                      read=0 if setting == "no-siglip" else toy.READ)  # no SigLIP: no read to wait for
            folder = os.path.join(out, "s2", "ema")
            if setting == "ref-latents":  # so that sample.py refuses it and load() knows it
                with open(os.path.join(folder, "config.json")) as f:
                    config = {**json.load(f), "joint_ref_feature": True}
                with open(os.path.join(folder, "config.json"), "w") as f:
                    json.dump(config, f, indent=1)
            torch.set_num_threads(args.threads)
            rows = toy_data.evaluate(records, toy.outputs(*load(folder), records, progress=False), show=False)
            for task, row in rows.items():
                table.setdefault((setting, task), []).append(row)
    print(f"held-out pairs of {args.tasks}, {args.seeds} seeds, the toy recipe at {args.scale} of its steps")
    print("| setting | task | success: mean (min-max) | PSNR dB | other shape kept |\n|---|---|---|---|---|")
    for (setting, task), rows in table.items():
        ok = [r["success"] for r in rows]
        print(f"| {setting} | {task} | {np.mean(ok):.0%} ({min(ok):.0%}-{max(ok):.0%}) | "
              f"{np.mean([r['psnr'] for r in rows]):.1f} (input: {rows[0]['base_psnr']:.1f}) | "
              f"{np.nanmean([r['other'] for r in rows]):.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["stage"]:  # a recipe stage: train.py with the toy presets and this one
        import train

        train.main(sys.argv[2:], {**toy.PRESETS, "toy-ref": toy_ref})
    else:
        main()
