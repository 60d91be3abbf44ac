"""The toy world: UniWorld-V1's whole method on 32x32 images of flat shapes, trained on a CPU in minutes.

Same code path as at full scale: a frozen (tiny) Qwen2.5-VL and a frozen (tiny) SigLIP feed model.py's two
connectors into the FLUX text stream (text ids zero), rectified flow on the target only, Euler sampling. The
reference image enters only through the two encoders, never as pixels or latents in the image stream.

A first faithful attempt learned nothing spatial (shared/reference/toy_findings.md). The levers used here, and why:
  - Word vocabulary: every word of the toy grammar is one Qwen token (tiny_vlm(words=...)), so instructions are a
    few distinct tokens instead of ~60 bytes whose random hidden states all look alike.
  - Unambiguous grammar: "make the circle blue" (shape kinds are unique in a scene), not "make the red circle blue":
    text ids are zero, so the denoiser sees the instruction as a *set* of tokens, and a random VLM mixes in too
    little word order to tell the source colour from the new one.
  - Structured SigLIP (still a frozen SiglipVisionModel): no transformer layers; an identity patch embedding keeps
    the 4x4 patch's 48 pixel values, and fixed 2-D sinusoidal position embeddings use exactly the row/column RoPE
    frequencies of the denoiser. A SigLIP token at (r, c) then carries cos/sin(r w_k), so a key projected from it
    meets the RoPE-rotated query of the image token at (r, c) in phase: the denoiser can learn "read the reference
    patch at my own position" with two linear maps, although text tokens get no position ids (q.k peaks at r = r').
  - Same grid: SigLIP patch 4 on 32x32 -> 8x8 tokens, one per packed image token.
  - Pixel space: the "autoencoder" is pixel_unshuffle(2) (3 -> 12 channels, 16x16), packed 2x2 by FLUX into
    64 tokens of 48 channels (a 4x4 pixel patch each).
  - RoPE theta 8 in the toy denoiser (and so in the SigLIP sinusoids): every frequency turns across an 8x8 grid.
  - Frozen encoders -> features cached once (encode_records).

  - Curriculum: first "copy" (target = reference), then the edits. Trained on edits alone the model learns only
    global statistics (~9k steps); on copies the SigLIP route is found after ~3-5k steps (loss 0.06 -> 0.03,
    86% copies right), and the edits trained on top of it keep the shapes in place.

Status: 12 CPU minutes (1 thread, batch 8, hidden 64) reach PSNR above "output = input" on recolor and removal and
segmentation IoU 0.43, but not yet the issue's 80% success; the loss is still falling.
"""

import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

import flux
from encoders import SiglipEncoder, VLMEncoder, tiny_vlm

SIZE = 32  # image side in pixels
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
          "cyan": (40, 200, 210), "magenta": (210, 50, 200), "orange": (245, 140, 30), "purple": (120, 50, 170)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL = (5.5, 15.5, 25.5)  # centres of the 3x3 placement cells; shapes never overlap (radius < 5)
TASKS = ("t2i", "recolor", "remove", "add", "segment", "edges")
WORDS = sorted({*COLORS, *BACKGROUNDS, *SHAPES, *ROWS, *COLS, "a", "at", "the", "on", "make", "remove", "add",
                "segment", "detect", "edges", "background", "user", "assistant"})

# ----------------------------------------------------------------------------------------------------------------
# Scenes and tasks, with exact ground truth


@dataclass
class Shape:
    kind: str
    color: str
    row: int  # cell
    col: int
    cy: float
    cx: float
    r: float


def shape_mask(s: Shape) -> np.ndarray:
    """(SIZE, SIZE) bool, sampled at pixel centres."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dy, dx = y - s.cy, x - s.cx
    if s.kind == "circle":
        return dy**2 + dx**2 <= s.r**2
    if s.kind == "square":
        return (np.abs(dy) <= 0.85 * s.r) & (np.abs(dx) <= 0.85 * s.r)
    return (dy <= 0.7 * s.r) & (dy >= -s.r) & (np.abs(dx) <= (dy + s.r) * 0.6)  # triangle, apex up


def draw(background: str, shapes: list[Shape]) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUNDS[background]
    for s in shapes:
        img[shape_mask(s)] = COLORS[s.color]
    return img


def edge_map(img: np.ndarray) -> np.ndarray:
    """White where a pixel differs from one of its 4 neighbours and is not background (inner boundary), else black."""
    p = np.pad(img.astype(int), ((1, 1), (1, 1), (0, 0)), mode="edge")
    diff = np.zeros(img.shape[:2], bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        diff |= (p[dy : dy + SIZE, dx : dx + SIZE] != img).any(-1)
    fg = (img != img[0, 0]).any(-1)  # the corner is always background
    return np.where((diff & fg)[..., None], 255, 0).astype(np.uint8).repeat(3, -1)


def _random_shape(rng: np.random.Generator, kind: str, color: str, cell: int) -> Shape:
    row, col = divmod(cell, 3)
    return Shape(kind, color, row, col, CELL[row] + rng.uniform(-1, 1), CELL[col] + rng.uniform(-1, 1),
                 rng.uniform(3.5, 4.75))


def _scene(rng: np.random.Generator, n: int) -> tuple[str, list[Shape]]:
    background = str(rng.choice(list(BACKGROUNDS)))
    kinds = rng.choice(SHAPES, n, replace=False)
    colors = rng.choice(list(COLORS), n, replace=False)
    cells = rng.choice(9, n, replace=False)
    shapes = [_random_shape(rng, str(k), str(c), int(i)) for k, c, i in zip(kinds, colors, cells, strict=True)]
    return background, shapes


def make_sample(rng: np.random.Generator, task: str) -> dict:
    """One pair: instruction, reference images (0 or 1), target, and the number of shapes in the reference."""
    if task == "t2i":
        bg, (s,) = _scene(rng, 1)
        text = f"a {s.color} {s.kind} at the {ROWS[s.row]} {COLS[s.col]} on {bg}"
        return {"task": task, "text": text, "refs": [], "target": draw(bg, [s]), "shapes": 0}
    n = 2 if task == "remove" else int(rng.integers(1, 3))  # removal always leaves one shape behind
    bg, shapes = _scene(rng, n)
    ref, k = draw(bg, shapes), int(rng.integers(n))
    s = shapes[k]
    if task == "recolor":
        new = str(rng.choice([c for c in COLORS if c != s.color]))
        text, target = f"make the {s.kind} {new}", draw(bg, shapes[:k] + [Shape(**{**vars(s), "color": new})]
                                                        + shapes[k + 1 :])
    elif task == "remove":
        text, target = f"remove the {s.kind}", draw(bg, shapes[:k] + shapes[k + 1 :])
    elif task == "add":
        shapes = shapes[:1]
        ref = draw(bg, shapes)
        kind = str(rng.choice([x for x in SHAPES if x != shapes[0].kind]))
        cell = int(rng.choice([c for c in range(9) if c != 3 * shapes[0].row + shapes[0].col]))
        new = _random_shape(rng, kind, str(rng.choice(list(COLORS))), cell)
        text = f"add a {new.color} {new.kind} at the {ROWS[new.row]} {COLS[new.col]}"
        target, n = draw(bg, shapes + [new]), 1
    elif task == "segment":
        text, target = f"segment the {s.kind}", np.where(shape_mask(s)[..., None], 255, 0).astype(np.uint8)
        target = target.repeat(3, -1)
    elif task == "edges":
        text, target = "detect the edges", edge_map(ref)
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return {"task": task, "text": text, "refs": [ref], "target": target, "shapes": n}


def make_dataset(root: str, n_train: int, n_test: int, seed: int = 0) -> None:
    """Write root/images/{train,test}/*.png, one JSON per split and task, and root/{train,test}.txt in the official
    data.txt format `image_root,json_path,need_weight` (edits weighted, §3.5). Test pairs never occur in training."""
    held_out = set()
    for split, n, rng in (("test", n_test, np.random.default_rng([seed, 1])),
                          ("train", n_train, np.random.default_rng([seed, 0]))):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        records, i = {t: [] for t in TASKS}, 0
        while i < n:
            task = TASKS[i % len(TASKS)]
            s = make_sample(rng, task)
            key = hashlib.sha1(s["text"].encode() + b"".join(r.tobytes() for r in s["refs"] + [s["target"]])).digest()
            if split == "train" and key in held_out:
                continue  # a held-out pair: draw again
            if split == "test":
                held_out.add(key)
            names = [f"{split}/{i:06d}_ref{j}.png" for j in range(len(s["refs"]))] + [f"{split}/{i:06d}.png"]
            for name, img in zip(names, s["refs"] + [s["target"]], strict=True):
                Image.fromarray(img).save(os.path.join(root, "images", name))
            human = s["text"] + "".join("\n<image>" for _ in s["refs"])
            records[task].append({"image": names, "task": task, "shapes": s["shapes"], "conversations": [
                {"from": "human", "value": human}, {"from": "gpt", "value": "<gen_image>"}]})
            i += 1
        lines = []
        for task, recs in records.items():
            path = os.path.abspath(os.path.join(root, f"{split}_{task}.json"))
            with open(path, "w") as f:
                json.dump(recs, f)
            lines.append(f"{os.path.abspath(os.path.join(root, 'images'))},{path},"
                         f"{int(task in ('recolor', 'remove', 'add'))}")
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def load_records(root: str, split: str) -> list[dict]:
    """A split's records, images loaded: task, text (the human turn, <image> markers kept), refs, target, shapes."""
    out = []
    for line in open(os.path.join(root, f"{split}.txt")).read().split():
        image_root, path, _ = line.split(",")
        for r in json.load(open(path)):
            imgs = [np.asarray(Image.open(os.path.join(image_root, p)).convert("RGB")) for p in r["image"]]
            out.append({"task": r["task"], "shapes": r["shapes"], "refs": imgs[:-1], "target": imgs[-1],
                        "text": r["conversations"][0]["value"]})
    return out


# ----------------------------------------------------------------------------------------------------------------
# The toy model pieces: frozen encoders with a structured deterministic init, the denoiser config, a pixel "VAE"


def toy_flux_config(hidden: int = 64, theta: int = 8) -> flux.FluxConfig:
    """2 double + 2 single blocks, heads of 64: 48-channel tokens = 4x4 pixel patches, no guidance embedder.

    RoPE theta 8 instead of 10,000: on an 8x8 token grid, 10 of the 14 row frequencies of theta 10,000 turn by
    less than 0.6 rad across the whole image and carry no position; with theta 8 all 14 do (w from 1 to 0.15)."""
    return flux.FluxConfig(in_channels=48, out_channels=48, vec_in_dim=16, context_in_dim=128, hidden_size=hidden,
                           num_heads=hidden // 64, depth=2, depth_single_blocks=2, axes_dim=(8, 28, 28), theta=theta,
                           guidance_embed=False)


def toy_vlm(seed: int = 0, hidden: int = 64, layers: int = 2) -> VLMEncoder:
    """A random frozen Qwen2.5-VL whose vocabulary has one token per toy word; references at 56x56 = 4 tokens."""
    return tiny_vlm(seed, hidden=hidden, layers=layers, words=WORDS, pixels=56 * 56)


def rope_sincos(n: int, axis_dim: int, theta: int) -> Tensor:
    """(n, axis_dim): [cos(p w_k), sin(p w_k)] interleaved for positions p < n, w_k = theta^(-2k/axis_dim) (RoPE's)."""
    w = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    a = torch.arange(n, dtype=torch.float64)[:, None] * w  # (n, axis_dim/2)
    return torch.stack([a.cos(), a.sin()], -1).flatten(1).float()


def toy_siglip(config: flux.FluxConfig | None = None, hidden: int = 128, patch: int = 4) -> SiglipEncoder:
    """A SiglipVisionModel with no layers: token = LayerNorm(patch pixels (48) | row, col sinusoids | zeros)."""
    c = config or toy_flux_config()
    side, content = SIZE // patch, 3 * patch * patch
    if content + c.axes_dim[1] + c.axes_dim[2] > hidden:
        raise ValueError(f"hidden {hidden} < {content} pixel + {c.axes_dim[1] + c.axes_dim[2]} position channels")
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=0,
                                                 num_attention_heads=2, image_size=SIZE, patch_size=patch))
    emb = model.embeddings
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.patch_embedding.weight.view(hidden, content)[:content] = torch.eye(content)  # identity: pixels kept
        pos = torch.zeros(side, side, hidden)
        r0, r1 = content, content + c.axes_dim[1]
        pos[..., r0:r1] = rope_sincos(side, c.axes_dim[1], c.theta)[:, None]  # row
        pos[..., r1 : r1 + c.axes_dim[2]] = rope_sincos(side, c.axes_dim[2], c.theta)[None]  # column
        emb.position_embedding.weight.copy_(pos.flatten(0, 1))
    return SiglipEncoder(model, SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}))


class PixelAE:
    """The autoencoder stand-in: pixels in [-1, 1] (B, 3, 32, 32) <-> latents (B, 12, 16, 16) by pixel_unshuffle.

    masks.loss_weights gives (1, H/8, W/8) = (1, 4, 4); resize it to the 16x16 latent grid with nearest, as the
    official trainer does for any latent size: F.interpolate(w[None], size=(16, 16), mode="nearest")[0]."""

    factor = 2

    def encode(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.factor)

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z, self.factor)


def to_tensor(imgs: list[np.ndarray]) -> Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x: Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def encode_records(vlm: VLMEncoder, siglip: SiglipEncoder | None, records: list[dict], batch: int = 64) -> list[dict]:
    """Frozen-encoder features of every record (model.Encoders.features), computed once; stored in fp16."""
    from model import Encoders

    enc, out = Encoders(vlm=vlm, siglip=siglip), []
    for i in range(0, len(records), batch):
        rs = records[i : i + batch]
        texts = [r["text"] for r in rs]
        feats = enc.features(texts, [[Image.fromarray(im) for im in r["refs"]] for r in rs])
        out += [{k: (v.half() if k != "vision_end" and v is not None else v) for k, v in f.items()} for f in feats]
    return out


@torch.no_grad()
def generate(model, features: list[dict], steps: int = 20, seed: int = 0) -> Tensor:
    """sample.py's sampler (Euler over FLUX's shifted schedule) on cached features -> images (B, 3, 32, 32)."""
    from sample import denoise, get_schedule

    x = torch.randn(len(features), 12, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))
    txt = model.text_stream([{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                              for k, v in f.items()} for f in features])
    y = torch.zeros(len(features), model.denoiser.config.vec_in_dim)  # no CLIP in the toy: a zero pooled vector
    x = denoise(model, x, get_schedule(steps, x.shape[-1] * x.shape[-2] // 4), txt, y, guidance=1.0, progress=False)
    return PixelAE().decode(x)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: exact ground truth, judged per pixel by the nearest colour of the toy palette

PALETTE = np.array(list(COLORS.values()) + list(BACKGROUNDS.values()), np.float32)  # (11, 3)


def classify(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette colour."""
    return ((img[..., None, :].astype(np.float32) - PALETTE) ** 2).sum(-1).argmin(-1)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def score(task: str, ref: np.ndarray | None, target: np.ndarray, out: np.ndarray) -> dict:
    """Per-pair metrics. Success: >= 75% of the pixels that should change are right, >= 75% of the other shapes'
    pixels are kept, >= 90% of all pixels right. Segment/edges: IoU of the white pixels (> 127 gray)."""
    m = {"psnr": psnr(out, target)}
    if task in ("segment", "edges"):
        a, b = out.mean(-1) > 127, target.mean(-1) > 127
        m["iou"] = (a & b).sum() / max((a | b).sum(), 1)
        m["success"] = float(m["iou"] >= 0.7)
        return m
    right = classify(out) == classify(target)
    if ref is None:  # text-to-image: the shape and the background
        fg = classify(target) != classify(target)[0, 0]
        m["success"] = float(right[fg].mean() >= 0.75 and right.mean() >= 0.9)
        return m
    changed = classify(ref) != classify(target)
    kept = ~changed
    others = kept & (classify(ref) != classify(ref)[0, 0])  # shapes that must stay as they were
    m["keep"] = right[kept].mean()
    m["success"] = float((right[changed].mean() if changed.any() else 1.0) >= 0.75 and right.mean() >= 0.9
                         and (right[others].mean() if others.any() else 1.0) >= 0.75)
    return m


def evaluate(records: list[dict], outputs: list[np.ndarray], show: bool = True) -> dict:
    """Per task: success rate, PSNR, kept fraction, IoU, each for the outputs and for "output = input".
    Removal is judged on two-shape scenes only (a one-shape removal is just "paint the background")."""
    rows = {}
    for task in TASKS:
        pairs = [(r, o) for r, o in zip(records, outputs, strict=True)
                 if r["task"] == task and (task != "remove" or r["shapes"] == 2)]
        if not pairs:
            continue
        mean = lambda ms, k: float(np.mean([m[k] for m in ms])) if ms and k in ms[0] else float("nan")
        ms = [score(task, r["refs"][0] if r["refs"] else None, r["target"], o) for r, o in pairs]
        bs = [score(task, r["refs"][0], r["target"], r["refs"][0]) for r, _ in pairs] if pairs[0][0]["refs"] else []
        rows[task] = {"n": len(pairs), **{k: mean(ms, k) for k in ("success", "psnr", "keep", "iou")},
                      **{f"base_{k}": mean(bs, k) for k in ("success", "psnr", "keep", "iou")}}
    if show:
        print(f"{'task':8} {'n':>4} {'success':>8} {'(input)':>8} {'PSNR':>6} {'(input)':>8} {'keep':>5} {'IoU':>5}")
        for t, r in rows.items():
            print(f"{t:8} {r['n']:4d} {r['success']:8.0%} {r['base_success']:8.0%} {r['psnr']:6.1f} "
                  f"{r['base_psnr']:8.1f} {r['keep']:5.2f} {r['iou']:5.2f}")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the toy world: python toy.py make DIR")
    p.add_argument("command", choices=["make"])
    p.add_argument("dir")
    p.add_argument("--train", type=int, default=12_000)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make_dataset(a.dir, a.train, a.test, a.seed)
    print(f"wrote {a.train} training and {a.test} held-out pairs to {a.dir} (data.txt format: {a.dir}/train.txt)")
