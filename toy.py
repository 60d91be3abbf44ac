"""The toy world: UniWorld-V1's whole method on 32x32 images of flat shapes, trained on a CPU (python toy.py --help).

Same code path as at full scale: train.py (--model toy) with the frozen (tiny) Qwen2.5-VL and SigLIP feeding model.py's
two connectors into the FLUX text stream (text ids zero), the §3.5 edit-mask weighting, sample.py's sampler. The
reference enters only through the two encoders, never as pixels or latents in the image stream (except in ablation 2).

A first faithful attempt learned nothing spatial (shared/reference/toy_findings.md). The levers used here, and why:
  - Word vocabulary: every word of the toy grammar is one Qwen token (tiny_vlm(words=...)).
  - Instructions name the edited shape by colour, kind and cell ("make the red circle at the top left blue",
    "segment the red circle at the top left"). Qwen2.5-VL grounds "the red circle" in the reference; the random toy
    VLM cannot, so the denoiser must find the shape itself. With the colour alone it never did: it applied each edit
    to every shape. With the cell named, where to act is read from the words as in text-to-image and add.
  - The six cell words get structured embeddings in the toy VLM: the RoPE phase of their cell's centre (toy_vlm),
    as the SigLIP tokens carry that of their patch.
  - Structured SigLIP (still a frozen SiglipVisionModel): no transformer layers; an identity patch embedding keeps
    the 4x4 patch's 48 pixel values, and fixed position embeddings: 2-D sinusoids at exactly the row/column RoPE
    frequencies of the denoiser, and a one-hot code of the position. A key projected from the token at (r, c) can
    then meet the RoPE-rotated query of the image token at (r, c): "read the reference patch at my own position",
    although text tokens get no position ids. With the sinusoids alone that key needs rotation-equivariant maps
    learned through four layers, and the read formed only in the last block, where no MLP follows to edit what it
    read; the one-hot code makes each position's key free, and the read forms a block earlier (README).
  - Same grid: SigLIP patch 4 on 32x32 -> 8x8 tokens, one per packed image token; RoPE theta 8 (toy_flux_config).
  - Pixel space: the "autoencoder" is pixel_unshuffle(2) (3 -> 12 channels, 16x16), packed 2x2 by FLUX into
    64 tokens of 48 channels (a 4x4 pixel patch each).
  - Two attention heads of 32, not one of 64 (toy_flux_config): in the first block one reads the instruction, the
    other the reference; with one head removal failed in the right column and every edit came thousands of steps later.
  - Sharper attention, sooner: the q/k RMSNorm scales learn 10x faster (train.py --qk_norm_lr 10). With RMS-normed
    q and k of a 32-dim head the logits stay under 6 until the scales grow, too flat to pick one of 64 SigLIP tokens;
    at Adam's ~lr per step that growth alone delayed copying by thousands of steps (starting them at 4 did less).
  - Stage 0 starts from DiT's initialisation (adaLN-Zero: every block the identity, the output zero; dit_init).
  - Curriculum (stage 0 = the toy's FLUX pretraining): first "copy" pairs (target = reference), then the task mix
    with copies kept in it, its lr decayed linearly to zero over the last 5,400 steps (train.py --decay). On edits
    alone the model learns only global statistics; on copies it finds the SigLIP route, after 1,000 to 3,000 steps
    depending on the run (4,000 copy steps).
  - Each train.py process runs on two threads (1.4x one); a world of one in fp32 trains the plain module (no FSDP2).
  - The frozen encoders' outputs are cached once per stage (train.py --cache).
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

import flux
from encoders import SiglipEncoder, VLMEncoder, load_siglip, tiny_vlm
from model import Encoders, UniWorld, load_uniworld

SIZE = 32  # image side in pixels
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
          "cyan": (40, 200, 210), "magenta": (210, 50, 200), "orange": (245, 140, 30), "purple": (120, 50, 170)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL = (5.5, 15.5, 25.5)  # centres of the 3x3 placement cells; shapes never overlap (radius < 5)
TASKS = ("t2i", "recolor", "remove", "add", "segment", "edges")
COPY, COPY_EVERY = "copy", 5  # curriculum only (train.txt keeps one copy pair per 5 references; copy.txt has all)
WORDS = sorted({*COLORS, *BACKGROUNDS, *SHAPES, *ROWS, *COLS, "a", "at", "the", "on", "make", "remove", "add",
                "segment", "detect", "edges", "background", "copy", "image", "user", "assistant"})

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
    named = f"the {s.color} {s.kind} at the {ROWS[s.row]} {COLS[s.col]}"  # colour, kind and cell: see the docstring
    if task == "recolor":
        new = str(rng.choice([c for c in COLORS if c != s.color]))
        text, target = f"make {named} {new}", draw(bg, shapes[:k] + [Shape(**{**vars(s), "color": new})]
                                                   + shapes[k + 1 :])
    elif task == "remove":
        text, target = f"remove {named}", draw(bg, shapes[:k] + shapes[k + 1 :])
    elif task == "add":
        shapes = shapes[:1]
        ref = draw(bg, shapes)
        kind = str(rng.choice([x for x in SHAPES if x != shapes[0].kind]))
        cell = int(rng.choice([c for c in range(9) if c != 3 * shapes[0].row + shapes[0].col]))
        new = _random_shape(rng, kind, str(rng.choice(list(COLORS))), cell)
        text = f"add a {new.color} {new.kind} at the {ROWS[new.row]} {COLS[new.col]}"
        target, n = draw(bg, shapes + [new]), 1
    elif task == "segment":
        text, target = f"segment {named}", np.where(shape_mask(s)[..., None], 255, 0).astype(np.uint8)
        target = target.repeat(3, -1)
    elif task == "edges":
        text, target = "detect the edges", edge_map(ref)
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    return {"task": task, "text": text, "refs": [ref], "target": target, "shapes": n}


def make_dataset(root: str, n_train: int, n_test: int, seed: int = 0) -> None:
    """Write root/images/{train,test}/*.png, one JSON per split and task, and root/{train,test}.txt in the official
    data.txt format `image_root,json_path,need_weight` (edits weighted, §3.5). Test pairs never occur in training.

    The curriculum's copy pairs (target = reference, "copy the image") reuse the references' files: root/copy.txt
    lists all of them (the first phase), train.txt one in COPY_EVERY (kept in the mix)."""
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
        if split == "train":  # the curriculum's copies: target = reference, the pairs' own files (nothing written)
            copies = [{"image": [r["image"][0]] * 2, "task": COPY, "shapes": r["shapes"], "conversations": [
                {"from": "human", "value": "copy the image\n<image>"}, {"from": "gpt", "value": "<gen_image>"}]}
                for recs in records.values() for r in recs if len(r["image"]) == 2]
            records[COPY] = copies[::COPY_EVERY]
            path = os.path.abspath(os.path.join(root, "train_copy_all.json"))
            with open(path, "w") as f:
                json.dump(copies, f)
            with open(os.path.join(root, "copy.txt"), "w") as f:
                f.write(f"{os.path.abspath(os.path.join(root, 'images'))},{path},false\n")
        lines = []
        for task, recs in records.items():
            path = os.path.abspath(os.path.join(root, f"{split}_{task}.json"))
            with open(path, "w") as f:
                json.dump(recs, f)
            lines.append(f"{os.path.abspath(os.path.join(root, 'images'))},{path},"
                         f"{str(task in ('recolor', 'remove', 'add')).lower()}")
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


def toy_flux_config(hidden: int = 64, theta: int = 8, heads: int = 2) -> flux.FluxConfig:
    """2 double + 2 single blocks: 48-channel tokens = 4x4 pixel patches; a guidance embedder like FLUX.1-dev's (fed
    1.0 in training and sampling), so that sample.py shifts the schedule as in training. RoPE splits each head as
    FLUX.1 does (16, 56, 56 of 128): 1/8 for the index axis, 7/16 for rows and for columns.

    Two heads of 32, not one of 64: why in the module docstring and the README.
    RoPE theta 8 instead of 10,000: on an 8x8 token grid, 5 of the 7 row frequencies of theta 10,000 turn by
    less than 0.6 rad across the whole image and carry no position; with theta 8 all 7 do (w from 1 to 0.17)."""
    head = hidden // heads
    if head * heads != hidden or head % 32:
        raise ValueError(f"hidden {hidden} / heads {heads} must give a head size that is a multiple of 32")
    return flux.FluxConfig(in_channels=48, out_channels=48, vec_in_dim=16, context_in_dim=128, hidden_size=hidden,
                           num_heads=heads, depth=2, depth_single_blocks=2,
                           axes_dim=(head // 8, 7 * head // 16, 7 * head // 16), theta=theta, guidance_embed=True)


def toy_vlm(seed: int = 0, hidden: int = 64, layers: int = 2, config: flux.FluxConfig | None = None) -> VLMEncoder:
    """A random frozen Qwen2.5-VL whose vocabulary has one token per toy word; references at 56x56 = 4 tokens.

    The six cell words get structured embeddings: "top" holds [cos, sin](p w_k) of its cell's centre row p (in image
    tokens) at the denoiser's RoPE row frequencies, "left" the same for columns (zeros elsewhere), as the toy SigLIP
    tokens do: a key projected from "top" then meets the rotated queries of the top rows' image tokens in phase."""
    vlm = tiny_vlm(seed, hidden=hidden, layers=layers, words=WORDS, pixels=56 * 56)
    c = config or toy_flux_config()
    emb = vlm.model.get_input_embeddings().weight
    rows, cols, norm = c.axes_dim[1], c.axes_dim[2], emb.norm(dim=1).mean().item()  # a random token's norm
    with torch.no_grad():
        for i, (row_word, col_word) in enumerate(zip(ROWS, COLS, strict=True)):
            p = (CELL[i] - 2) / (SIZE // 8)  # the cell centre on the 8x8 token grid (token r spans pixels 4r..4r+3)
            for word, start, dim in ((row_word, 0, rows), (col_word, rows, cols)):
                v = torch.zeros(hidden, dtype=torch.float64)
                v[start : start + dim] = rope_sincos(torch.tensor([p], dtype=torch.float64), dim, c.theta)[0]
                emb[vlm.tokenizer.convert_tokens_to_ids(word)] = (v * norm / v.norm()).to(emb)
    return vlm


def rope_sincos(positions: Tensor, axis_dim: int, theta: int) -> Tensor:
    """(n,) positions p -> (n, axis_dim) float64: [cos(p w_k), sin(p w_k)] interleaved, w_k = theta^(-2k/axis_dim)."""
    w = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    a = positions.double()[:, None] * w  # (n, axis_dim/2)
    return torch.stack([a.cos(), a.sin()], -1).flatten(1)


def toy_siglip(config: flux.FluxConfig | None = None, patch: int = 4) -> SiglipEncoder:
    """A SiglipVisionModel with no layers: token = LayerNorm(patch pixels (48) | row, col sinusoids | position one-hot).

    The one-hot code (64 channels, with the norm of one axis's sinusoids) gives each position a free key: through the
    siglip_projector any vector, so the denoiser can learn a key that meets the RoPE-rotated query of its own image
    token, where the sinusoids alone need rotation-equivariant maps learned through four layers (README)."""
    c = config or toy_flux_config()
    side, content = SIZE // patch, 3 * patch * patch
    hidden = content + c.axes_dim[1] + c.axes_dim[2] + side * side  # 48 + 28 + 64 = 140
    with torch.random.fork_rng():  # the (unused) pooling head's init too: the same file every time
        torch.manual_seed(0)
        model = SiglipVisionModel(SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                     num_hidden_layers=0, num_attention_heads=2, image_size=SIZE,
                                                     patch_size=patch))
    emb = model.embeddings
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.patch_embedding.weight.view(hidden, content)[:content] = torch.eye(content)  # identity: pixels kept
        pos = torch.zeros(side * side, hidden)
        r0, r1, r2 = content, content + c.axes_dim[1], content + c.axes_dim[1] + c.axes_dim[2]
        grid = torch.arange(side)
        pos[:, r0:r1] = rope_sincos(grid, c.axes_dim[1], c.theta).repeat_interleave(side, 0)  # row of token i
        pos[:, r1:r2] = rope_sincos(grid, c.axes_dim[2], c.theta).repeat(side, 1)  # its column
        pos[:, r2:] = torch.eye(side * side) * (c.axes_dim[1] / 2) ** 0.5  # the row sinusoids' norm
        emb.position_embedding.weight.copy_(pos)
    return SiglipEncoder(model, SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}))


class PixelAE(torch.nn.Module):
    """The autoencoder stand-in: pixels in [-1, 1] (B, 3, 32, 32) <-> latents (B, 12, 16, 16) by pixel_unshuffle.

    Its factor 2 is the latent grid of the edit-mask weights too (masks.loss_weights(..., factor=2))."""

    factor = 2

    def encode(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.factor)

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z, self.factor)


# ----------------------------------------------------------------------------------------------------------------
# The toy as a train.py preset (--model toy) and as sample.py's built-in model (assets/toy/)

EXAMPLES = {  # sample.py's defaults with the toy: `python sample.py --edit` edits examples/edit.png
    "edit": {"prompt": "make the red circle at the top left blue", "images": ["examples/edit.png"],
             "scenes": [("black", [("circle", "red", 0, 0, 6.0, 5.0, 4.5),
                                   ("square", "yellow", 2, 2, 25.0, 26.0, 4.5)])]},
    "t2i": {"prompt": "a green triangle at the middle center on white", "images": [], "scenes": []},
}
VLM_SEED = 0  # the frozen toy VLM (and the parameter-free SigLIP) are the same in every stage and at sampling


def toy_models(cfg, device, ref_latents: bool = False) -> tuple[UniWorld, Encoders]:
    """train.py's `--model toy`: stage 0 builds the toy denoiser from cfg.seed; later stages load the stage-0 export
    given as --flux (the toy's "FLUX.1-dev": denoiser and both connectors). Stage 1 has no SigLIP (official), nor
    has any stage with `--siglip none` (the ablation). `--model toy-ref`: ablation 2, ReferenceLatents."""
    if cfg.flux:
        model = load_uniworld(cfg.flux, with_vlm=False, config=toy_flux_config())[0].train()
    else:
        torch.manual_seed(cfg.seed)
        model = UniWorld(flux.Flux(toy_flux_config()), vlm_dim=64, siglip_dim=toy_siglip().model.config.hidden_size)
        dit_init(model.denoiser)
    siglip = toy_siglip() if cfg.stage != 1 and cfg.siglip != "none" else None  # --siglip none: the ablation
    encoders = (ReferenceEncoders if ref_latents else Encoders)(vlm=toy_vlm(VLM_SEED), siglip=siglip, ae=PixelAE())
    return (ReferenceLatents.of(model) if ref_latents else model), encoders


def dit_init(denoiser: flux.Flux) -> None:
    """DiT's initialisation for a denoiser trained from scratch (FLUX.1's own is unpublished): xavier-uniform linear
    weights, zero biases, N(0, 0.02) timestep/guidance/vector embedders, and adaLN-Zero: every modulation and the
    output layer start at zero, so each block starts as the identity and the model predicts 0."""
    for m in denoiser.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    for embedder in (e for e in (denoiser.time_in, denoiser.guidance_in, denoiser.vector_in) if e is not None):
        for layer in (embedder.in_layer, embedder.out_layer):
            torch.nn.init.normal_(layer.weight, std=0.02)
    zero = [b.img_mod.lin for b in denoiser.double_blocks] + [b.txt_mod.lin for b in denoiser.double_blocks]
    zero += [b.modulation.lin for b in denoiser.single_blocks]
    zero += [denoiser.final_layer.adaLN_modulation[1], denoiser.final_layer.linear]
    for layer in zero:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


class ReferenceLatents(UniWorld):
    """Ablation 2, the official `joint_ref_feature` (off in the release, and not UniWorld's method): the reference's
    latents join the image stream as clean tokens with index 1 (as in FLUX Kontext); the output on them is dropped.
    They ride in each sample's features ("ref", from ReferenceEncoders); text_stream hands them to velocity."""

    @classmethod
    def of(cls, model: UniWorld) -> "ReferenceLatents":
        out = cls(model.denoiser, model.denoise_projector[0].in_features, model.siglip_projector[0].in_features)
        out.load_state_dict(model.state_dict())
        return out

    def text_stream(self, features: list[dict], t5: Tensor | None = None) -> Tensor:
        self.ref = torch.stack([f["ref"] for f in features])  # (B, C, h, w)
        return super().text_stream(features, t5)

    def velocity(self, x: Tensor, sigma: Tensor, txt: Tensor, y: Tensor, guidance: float) -> Tensor:
        B, _, h, w = x.shape
        img = torch.cat([flux.pack(x), flux.pack(self.ref.to(x))], 1)  # (B, 2 L, 4C)
        ids = torch.cat([flux.image_ids(h, w, 0, x.device), flux.image_ids(h, w, 1, x.device)])
        g = torch.full((B,), guidance, device=x.device, dtype=x.dtype)
        v = self.denoiser(img, ids, txt, flux.text_ids(txt.shape[1], device=x.device), sigma.to(x.dtype), y, g)
        return flux.unpack(v[:, : h * w // 4], h, w)


class ReferenceEncoders(Encoders):
    """Encoders + each sample's first reference through the pixel AE as features["ref"] (zeros for text-to-image)."""

    def features(self, instructions: list[str], images: list[list], train: bool = True) -> list[dict]:
        out = super().features(instructions, images, train)
        for f, ims in zip(out, images, strict=True):
            ref = [np.asarray(ims[0].convert("RGB").resize((SIZE, SIZE)))] if ims else [np.zeros((SIZE, SIZE, 3))]
            f["ref"] = self.ae.encode(to_tensor(ref))[0] * bool(ims)  # (12, 16, 16)
        return out


def save_toy(folder: str, ref_latents: bool = False) -> None:
    """Make a train.py export (the release layout: denoise_tower + the toy VLM) sample.py's toy: + siglip/, toy.json."""
    toy_siglip().model.save_pretrained(os.path.join(folder, "siglip"))
    SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(os.path.join(folder, "siglip"))
    for example in EXAMPLES.values():
        for path, (background, shapes) in zip(example["images"], example["scenes"], strict=True):
            os.makedirs(os.path.dirname(os.path.join(folder, path)), exist_ok=True)
            Image.fromarray(draw(background, [Shape(*s) for s in shapes])).save(os.path.join(folder, path))
    c = toy_flux_config()
    with open(os.path.join(folder, "toy.json"), "w") as f:
        json.dump({"flux": {"hidden": c.hidden_size, "theta": c.theta, "heads": c.num_heads}, "size": SIZE,
                   "steps": 20, "guidance": 1.0, "ref_latents": ref_latents, "examples": EXAMPLES}, f, indent=1)


def load_toy(folder: str, device=None, dtype=None) -> tuple[UniWorld, Encoders, dict]:
    """sample.py's loader for a folder with toy.json: UniWorld + VLM from the release files, SigLIP, the pixel AE."""
    with open(os.path.join(folder, "toy.json")) as f:
        meta = json.load(f)
    model, vlm = load_uniworld(folder, dtype, device, config=toy_flux_config(**meta["flux"]), vlm_pixels=56 * 56)
    siglip = load_siglip(os.path.join(folder, "siglip"), dtype).to(device)
    if meta["ref_latents"]:  # ablation 2
        return ReferenceLatents.of(model).eval(), ReferenceEncoders(vlm.to(device), siglip, PixelAE()), meta
    return model, Encoders(vlm.to(device), siglip, PixelAE()), meta  # no CLIP: the pooled vector is zeros, as trained


def to_tensor(imgs: list[np.ndarray]) -> Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


def outputs(model: UniWorld, encoders: Encoders, records: list[dict], steps: int = 20, batch: int = 50,
            progress: bool = True) -> list[np.ndarray]:
    """sample.generate on every record, as `python sample.py` runs it (inference prompt, seed 42 + i) -> uint8."""
    from sample import generate

    out = []
    for i in tqdm(range(0, len(records), batch), desc="sampling", disable=not progress):
        rs = records[i : i + batch]
        images = generate(model, encoders, [r["text"].replace("\n<image>", "") for r in rs],
                          [[Image.fromarray(im) for im in r["refs"]] for r in rs], SIZE, SIZE,
                          seeds=list(range(42 + i, 42 + i + len(rs))), steps=steps, guidance=1.0, progress=False)
        out += [np.asarray(im) for im in images]
    return out


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
    pixels are kept, >= 90% of all pixels right. Segment/edges: IoU of the white pixels (every channel > 127: a
    yellow or cyan shape left as it was is not white). "other", where the reference has a shape the instruction does
    not name: the fraction of its pixels kept (edits) or left black (segment), i.e. whether the model acts on the
    named shape only."""
    m = {"psnr": psnr(out, target)}
    if task in ("segment", "edges"):
        a, b = (out > 127).all(-1), (target > 127).all(-1)
        m["iou"] = (a & b).sum() / max((a | b).sum(), 1)
        m["success"] = float(m["iou"] >= 0.7)
        if task == "segment" and (other := (classify(ref) != classify(ref)[0, 0]) & ~b).any():  # shapes not named
            m["other"] = 1 - a[other].mean()
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
    if others.any():
        m["other"] = right[others].mean()
    m["success"] = float((right[changed].mean() if changed.any() else 1.0) >= 0.75 and right.mean() >= 0.9
                         and m.get("other", 1.0) >= 0.75)
    return m


def evaluate(records: list[dict], outputs: list[np.ndarray], show: bool = True) -> dict:
    """Per task: success rate, PSNR, kept fractions (all, other shapes), IoU, for the outputs and for "output = input".
    Removal is judged on two-shape scenes only (a one-shape removal is just "paint the background")."""
    rows = {}
    for task in TASKS:
        pairs = [(r, o) for r, o in zip(records, outputs, strict=True)
                 if r["task"] == task and (task != "remove" or r["shapes"] == 2)]
        if not pairs:
            continue
        mean = lambda ms, k: float(np.mean([m[k] for m in ms if k in m])) if any(k in m for m in ms) else math.nan
        ms = [score(task, r["refs"][0] if r["refs"] else None, r["target"], o) for r, o in pairs]
        bs = [score(task, r["refs"][0], r["target"], r["refs"][0]) for r, _ in pairs] if pairs[0][0]["refs"] else []
        rows[task] = {"n": len(pairs), **{k: mean(ms, k) for k in ("success", "psnr", "keep", "other", "iou")},
                      **{f"base_{k}": mean(bs, k) for k in ("success", "psnr", "keep", "other", "iou")}}
    if show:
        print(f"{'task':8} {'n':>4} {'success':>8} {'(input)':>8} {'PSNR':>6} {'(input)':>8} {'keep':>5} {'other':>5} "
              f"{'IoU':>5}")
        for t, r in rows.items():
            print(f"{t:8} {r['n']:4d} {r['success']:8.0%} {r['base_success']:8.0%} {r['psnr']:6.1f} "
                  f"{r['base_psnr']:8.1f} {r['keep']:5.2f} {r['other']:5.2f} {r['iou']:5.2f}")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The recipe: four train.py runs (stage 0 on copies, then on the mix with its cool-down; stage 1, stage 2), then the
# evaluation

COMMON = ("--model toy --resolution 32 --batch_size 8 --workers 0 --lr 2e-3 --qk_norm_lr 10 --ema_decay 0.995 "
          "--precision fp32 --log_every 50 --val_every 1000000000 --ckpt_every 1000000000 --val_steps 20 "
          "--val_guidance 1")
RECIPE = (  # run name, train.py flags ({out}: the recipe's folder, {data}: the dataset's, {train}: its train.txt)
    ("s0-copy", "--stage 0 --data {data}/copy.txt --steps 4000 --cache {out}/cache/copy"),
    ("s0", "--stage 0 --data {train} --init {out}/s0-copy --steps 36000 --decay 5400 --cache {out}/cache/train"),
    ("s1", "--stage 1 --data {train} --flux {out}/s0/ema --steps 500 --lr 1e-3"),  # no cache: too short
    ("s2", "--stage 2 --data {train} --flux {out}/s0/ema --init {out}/s1 --steps 1000 --lr 1e-4 "
           "--warmup 0 --no-grad_ckpt --cache {out}/cache/train"),  # s0's cache
)
ABLATIONS = {"none": "", "no-siglip": "--siglip none", "ref-latents": "--model toy-ref",
             "uniform": "--weighting none"}  # the three of the issue: one flag each, added to every stage


def steps_of(flags: str) -> int:
    """The --steps of a RECIPE entry."""
    return int(flags.split("--steps ")[1].split()[0])


def train(data: str, out: str, scale: float = 1.0, ablation: str = "none", threads: int = 2,
          tasks: list[str] | None = None, flags: str = "", minutes: float | None = None) -> None:
    """Run the recipe: each stage a `python train.py` process, its EMA export made loadable by sample.py. `scale`
    multiplies every stage's steps (and stage 0's cool-down); `tasks` keeps only those tasks (and the copies) of
    train.txt: a focused run. `flags` go to every train.py call (a GPU's "--batch_size 64 --workers 8"); `minutes`
    sizes the long stage-0 run from the speed of the copy stage so that the whole recipe ends in that time."""
    start, rate = time.perf_counter(), None  # rate: steps per second of wall time, measured on the copy stage
    train_txt = os.path.join(data, "train.txt")
    if tasks:
        keep = [f"train_{t}.json" for t in (*tasks, COPY)]
        lines = [line for line in open(train_txt).read().split() if line.split(",")[1].endswith(tuple(keep))]
        os.makedirs(out, exist_ok=True)
        train_txt = os.path.join(out, "train.txt")
        with open(train_txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    for i, (name, stage_flags) in enumerate(RECIPE):
        if os.path.isdir(os.path.join(out, name, "ema")):
            print(f"{name}: done before, kept")
            continue
        argv = f"{COMMON} {stage_flags} {ABLATIONS[ablation]} {flags} --out {out}/{name}"
        argv = argv.format(out=out, data=data, train=train_txt).split()
        factor = scale
        if name == "s0" and minutes and rate:  # the time left, less the short stages after it at the same speed
            after = sum(steps_of(f) * scale for _, f in RECIPE[i + 1 :])
            factor = max(1, (minutes * 60 - (time.perf_counter() - start)) * rate - after) / steps_of(stage_flags)
        for flag in ("--steps", "--decay"):  # the cool-down keeps its share of the stage
            if flag in argv:
                argv[argv.index(flag) + 1] = str(max(1, round(int(argv[argv.index(flag) + 1]) * factor)))
        print(f"{name}: python train.py {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), *argv],
                       check=True, env=env)
        save_toy(os.path.join(out, name, "ema"), ref_latents=ablation == "ref-latents")
        t = time.perf_counter() - t
        rate = rate or int(argv[argv.index("--steps") + 1]) / t
        print(f"{name}: {t:.0f} s", flush=True)


def evaluate_folder(folder: str, data: str, n: int | None = None, show: bool = True,
                    tasks: list[str] | None = None) -> dict:
    """The held-out table of a toy export (a folder with toy.json) on `data`'s test split (`tasks` only)."""
    model, encoders, _ = load_toy(folder)
    records = [r for r in load_records(data, "test") if not tasks or r["task"] in tasks][:n]
    return evaluate(records, outputs(model, encoders, records), show)


def showcase(folder: str, data: str, out: str, per_task: int = 2, zoom: int = 4) -> list[str]:
    """A PNG of held-out pairs, one row each: input | output | target (black input for t2i); -> the instructions."""
    model, encoders, _ = load_toy(folder)
    records = [r for t in TASKS for r in [r for r in load_records(data, "test") if r["task"] == t][:per_task]]
    rows = [np.concatenate([r["refs"][0] if r["refs"] else np.zeros_like(r["target"]), o, r["target"]], 1)
            for r, o in zip(records, outputs(model, encoders, records, progress=False), strict=True)]
    grid = np.concatenate([np.pad(row, ((1, 1), (0, 0), (0, 0)), constant_values=255) for row in rows])
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(out)
    return [f"{r['task']}: {r['text'].replace(chr(10) + '<image>', '')}" for r in records]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="the toy world: make a dataset, train the recipe, evaluate a model")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the procedural dataset: python toy.py make DIR")
    m.add_argument("dir")
    m.add_argument("--train", type=int, default=12_000)
    m.add_argument("--test", type=int, default=300)
    m.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="the recipe through train.py: python toy.py train --data DIR --out RUN")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.01: a smoke run)")
    t.add_argument("--ablation", choices=sorted(ABLATIONS), default="none")
    t.add_argument("--threads", type=int, default=2, help="OpenMP threads of each train.py process (2: 1.4x 1)")
    t.add_argument("--tasks", nargs="+", choices=TASKS, help="train (and evaluate) only these tasks")
    t.add_argument("--flags", default="", help='more train.py flags for every stage, e.g. "--batch_size 64"')
    t.add_argument("--minutes", type=float, help="fit the recipe in this time: stage 0's steps from the copies' speed")
    e = sub.add_parser("eval", help="the held-out table: python toy.py eval FOLDER --data DIR")
    e.add_argument("folder", help="assets/toy, or a recipe stage's export such as RUN/s2/ema")
    e.add_argument("--data", required=True)
    e.add_argument("--n", type=int, help="the first n held-out pairs only")
    v = sub.add_parser("showcase", help="held-out input | output | target rows: python toy.py showcase FOLDER ...")
    v.add_argument("folder")
    v.add_argument("--data", required=True)
    v.add_argument("--out", default="showcase.png")
    a = p.parse_args()
    if a.command == "make":
        make_dataset(a.dir, a.train, a.test, a.seed)
        print(f"wrote {a.train} training and {a.test} held-out pairs to {a.dir} (data.txt format: {a.dir}/train.txt)")
    elif a.command == "train":
        train(os.path.abspath(a.data), os.path.abspath(a.out), a.scale, a.ablation, a.threads, a.tasks, a.flags,
              a.minutes)
        torch.set_num_threads(1)
        evaluate_folder(os.path.join(a.out, "s2", "ema"), a.data, tasks=a.tasks)
    elif a.command == "eval":
        torch.set_num_threads(1)
        evaluate_folder(a.folder, a.data, a.n)
    else:
        print("\n".join(showcase(a.folder, a.data, a.out)) + f"\nwrote {a.out}")
