"""The toy world: UniWorld-V1's whole method on 32x32 images of flat shapes, trained on a CPU (python toy.py --help).

The same code as at full scale, used as a client: train.py trains the toy preset (train.main(argv, PRESETS)) with a
frozen tiny Qwen2.5-VL and SigLIP feeding model.py's two connectors into the FLUX text stream (text ids zero), the
paper §3.5 edit-mask weighting and the sharded EMA; sample.py samples the exported weights folder like any release.
The reference enters only through the two encoders. Stage 0 (the toy's stand-in for FLUX.1's pretraining) trains the
whole denoiser from scratch. Why each design choice, and what was measured on the way: docs/toy.md.

    python toy.py make data/toy                          # the data set, in the official format
    python toy.py train --data data/toy --out runs/toy   # the recipe (four train.py runs), then the held-out table
    python toy.py eval assets/toy --data data/toy        # the held-out table of a weights folder
    python toy.py seeds --data data/toy --out runs/seeds --n 3   # the recipe over three seeds: mean and range
"""

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

import flux
from encoders import SiglipEncoder, VLMEncoder, load_siglip, tiny_vlm
from model import Encoders, UniWorld, load_uniworld
from sample import generate

SIZE = 32  # image side in pixels
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
          "cyan": (40, 200, 210), "magenta": (210, 50, 200), "orange": (245, 140, 30), "purple": (120, 50, 170)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
CELL = (5.5, 15.5, 25.5)  # centres of the 3x3 placement cells; shapes never overlap (radius < 5)
TASKS = ("t2i", "recolor", "remove", "add", "segment", "edges")
VLM_SEED, VLM_PIXELS = 0, 56 * 56  # the frozen toy VLM is the same in every stage; references reach it as 56x56
COPY, COPY_EVERY = "copy", 5  # curriculum only (train.txt keeps one copy pair per 5 references; copy.txt has all)
MIX = {"add": 2, "edges": 2}  # mix.txt: each task's pairs this many times (1 if not named)
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
    data.txt format `image_root,json_path,need_weight` (edits weighted, paper §3.5). Test pairs never occur in training.

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
        if split == "train":  # the recipe's mix: add and edges, the slowest to learn, twice as often
            with open(os.path.join(root, "mix.txt"), "w") as f:
                task = lambda line: os.path.basename(line.split(",")[1])[len("train_") : -len(".json")]
                f.write("\n".join(line for line in lines for _ in range(MIX.get(task(line), 1))) + "\n")


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
# The toy model pieces: frozen encoders with a structured deterministic init, the denoiser config


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
    vlm = tiny_vlm(seed, hidden=hidden, layers=layers, words=WORDS, pixels=VLM_PIXELS)
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


def read_init(model: UniWorld, head: int = 1, sharpness: float = 2.0) -> None:
    """A head that reads the reference from the start: in the first double block, head `head`'s image queries are
    one vector q0 (their RoPE rotation R(r, c) q0 is all that differs), and the SigLIP token at (r, c) gets the key
    R(r, c) q0, through the siglip_projector (from its one-hot position code), txt_in and the text stream's k.

    Each image token then attends to the SigLIP token at its own position (0.65 of its attention at init, the probe).
    Whether stage 0 finds that read by itself, and when, varies from run to run (docs/toy.md, 2026-12-05); every
    task that copies pixels depends on it; a pretrained denoiser would bring it. Everything stays trainable, and the
    read's value and output path is learned. q0 has unit entries on the highest and third-highest RoPE frequencies of
    rows and columns (1 and 0.55 rad per token at theta 8): an own-position peak that no other position aliases."""
    c, side = model.denoiser.config, SIZE // 4
    d, hd, rows = c.hidden_size, c.hidden_size // c.num_heads, c.axes_dim[1]
    q0 = torch.zeros(hd)
    for axis in (c.axes_dim[0], c.axes_dim[0] + rows):  # the first dim of the row pairs, of the column pairs
        q0[[axis, axis + 4]] = 1.0  # pairs 0 and 2 of the axis: (1, 0)
    pe = flux.rope(flux.image_ids(2 * side, 2 * side)[None], c.axes_dim, c.theta)
    keys = flux.apply_rope(q0.expand(1, 1, side * side, hd), pe)[0, 0]  # (64, hd): R(r, c) q0 at every position
    onehot = 3 * 4 * 4 + c.axes_dim[1] + c.axes_dim[2]  # where toy_siglip's position code starts
    up, down, txt_in = model.siglip_projector[0], model.siglip_projector[2], model.denoiser.txt_in
    block = model.denoiser.double_blocks[0]
    k, q = slice(d + head * hd, d + (head + 1) * hd), slice(head * hd, (head + 1) * hd)  # head's key, query rows
    with torch.no_grad():
        up.weight[: side * side] = 0  # hidden unit j: SiLU(4 code_j - 4), ~18 at position j, ~0 elsewhere
        up.weight[: side * side, onehot:] = 4 * torch.eye(side * side)
        up.bias[: side * side] = -4
        down.weight[:hd] = 0  # connector outputs 0..hd: the key of the token's position
        down.weight[:hd, : side * side] = keys.T / 16
        down.bias[:hd] = 0
        txt_in.weight[:hd] = torch.eye(hd, txt_in.in_features)  # ... passed to the text stream's first hd dims
        txt_in.weight[hd:, :hd] = 0
        block.txt_attn.qkv.weight[k] = torch.eye(hd, d) - torch.ones(hd, d) * (torch.arange(d) < hd) / hd  # centred
        block.txt_attn.qkv.bias[k] = 0
        block.img_attn.qkv.weight[q] = 0  # the query: q0 whatever the image token holds
        block.img_attn.qkv.bias[q] = q0
        for norm in (block.img_attn.norm.query_norm, block.txt_attn.norm.key_norm):
            norm.scale[q0 != 0] = sharpness


# ----------------------------------------------------------------------------------------------------------------
# The toy as a train.py preset, and as a weights folder that sample.py loads like the release

EXAMPLES = {  # what `python sample.py --edit` / `--t2i` run with no --prompt (sample.json)
    "edit": {"prompt": "make the red circle at the top left blue", "images": ["examples/edit.png"], "scenes": [
        ("black", [("circle", "red", 0, 0, 6.0, 5.0, 4.5), ("square", "yellow", 2, 2, 25.0, 26.0, 4.5)])]},
    "t2i": {"prompt": "a green triangle at the middle center on white", "images": [], "scenes": []},
}
ASK = ("the toy's Qwen2.5-VL is random and cannot answer questions; for answers run the real model: python sample.py "
       "--weights LanguageBind/UniWorld-V1 --ask QUESTION")


def toy_models(cfg, device) -> tuple[UniWorld, Encoders]:
    """train.py's `--model toy`: stage 0 builds the toy denoiser from cfg.seed; later stages load the stage-0 export
    given as --flux (the toy's "FLUX.1-dev": denoiser and both connectors). Stage 1 has no SigLIP (official), nor
    has any stage with `--siglip none` (an ablation)."""
    if cfg.flux:
        model = load_uniworld(cfg.flux, with_vlm=False)[0].train()
    else:
        torch.manual_seed(cfg.seed)
        model = UniWorld(flux.Flux(toy_flux_config()), vlm_dim=64, siglip_dim=toy_siglip().model.config.hidden_size)
        dit_init(model.denoiser)
        read_init(model)
    siglip = toy_siglip() if cfg.stage != 1 and cfg.siglip != "none" else None
    return model, Encoders(vlm=toy_vlm(VLM_SEED), siglip=siglip, ae=flux.PixelUnshuffle(2))


PRESETS = {"toy": toy_models}


def save_toy(folder: str) -> None:
    """Complete a train.py export (the release layout: denoise_tower + the toy VLM) into a weights folder: siglip/,
    vae/ (the PixelUnshuffle autoencoder), sample.json (32x32, 20 steps, guidance 1, examples/)."""
    toy_siglip().save_pretrained(os.path.join(folder, "siglip"))
    flux.save_autoencoder(flux.PixelUnshuffle(2), os.path.join(folder, "vae"))
    for example in EXAMPLES.values():
        for path, (background, shapes) in zip(example["images"], example["scenes"], strict=True):
            os.makedirs(os.path.dirname(os.path.join(folder, path)), exist_ok=True)
            Image.fromarray(draw(background, [Shape(*s) for s in shapes])).save(os.path.join(folder, path))
    with open(os.path.join(folder, "sample.json"), "w") as f:
        json.dump({"area": SIZE * SIZE, "steps": 20, "guidance": 1.0, "vlm_pixels": VLM_PIXELS, "notes": {"ask": ASK},
                   "examples": {k: {"prompt": v["prompt"], "images": v["images"]} for k, v in EXAMPLES.items()}},
                  f, indent=1)


def load_toy(folder: str, device=None) -> tuple[UniWorld, Encoders]:
    """A toy weights folder, as sample.py loads it (no CLIP: the pooled vector is zeros, as trained)."""
    model, vlm = load_uniworld(folder, device=device, vlm_pixels=VLM_PIXELS)
    siglip, ae = load_siglip(os.path.join(folder, "siglip")).to(device), flux.load_autoencoder(folder)
    return model, Encoders(vlm.to(device), siglip, ae)


def outputs(model: UniWorld, encoders: Encoders, records: list[dict], steps: int = 20, batch: int = 50,
            progress: bool = True) -> list[np.ndarray]:
    """sample.generate on every record, as `python sample.py` runs it (inference prompt, seed 42 + i) -> uint8."""
    out = []
    for i in tqdm(range(0, len(records), batch), desc="sampling", disable=not progress):
        rs = records[i : i + batch]
        images = generate(model, encoders, [r["text"].replace("\n<image>", "") for r in rs],
                          [[Image.fromarray(im) for im in r["refs"]] for r in rs], SIZE, SIZE,
                          seeds=list(range(42 + i, 42 + i + len(rs))), steps=steps, guidance=1.0, progress=False)
        out += [np.asarray(im) for im in images]
    return out


def to_tensor(imgs: list[np.ndarray]) -> Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


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
# The recipe: stage 0 on copies until the reference read forms, then on the task mix with its cool-down; stage 1;
# stage 2. Each stage a train.py run; the encoder caches are built once per data set.

COMMON = ("--model toy --resolution 32 --batch_size 8 --workers 0 --lr 2e-3 --qk_norm_lr 10 --ema_decay 0.995 "
          "--precision fp32 --compile --log_every 50 --val_every 1000000000 --ckpt_every 2500 --val_steps 20 "
          "--val_guidance 1")
RECIPE = (  # run name, train.py flags ({out}: the recipe's folder, {data}: the data set's, {cache}: its caches)
    ("s0-copy", "--stage 0 --data {data}/copy.txt --steps 1500 --cache {cache}/copy --shift 1.5"),  # high noise
    ("s0", "--stage 0 --data {data}/mix.txt --init {out}/s0-copy --steps 22000 --decay 5500 --cache {cache}/mix"),
    ("s1", "--stage 1 --data {data}/mix.txt --flux {out}/s0/ema --steps 500 --lr 1e-3"),  # no cache: too short
    ("s2", "--stage 2 --data {data}/mix.txt --flux {out}/s0/ema --init {out}/s1 --steps 1000 --lr 1e-4 "
           "--warmup 0 --no-grad_ckpt --cache {cache}/mix"),
)
READ, MAX_COPY_STEPS = 0.5, 8000  # the copy stage ends once a head reads its own position with this attention
ENTRY = [sys.executable, os.path.abspath(__file__), "stage"]  # a stage: train.main(argv, PRESETS) in a fresh process


def steps_of(flags: str) -> int:
    """The --steps of a RECIPE entry."""
    return int(flags.split("--steps ")[1].split()[0])


def reads_its_reference(folder: str, data: str, n: int = 16) -> float:
    """The strongest own-position read of the copy stage's export: over every block and head, the mean attention
    of the image tokens on the SigLIP token at their own position (attention_probe, σ = 0.5, n held-out refs)."""
    model, encoders = load_toy(folder)
    refs = [r["refs"][0] for r in load_records(data, "test") if r["refs"]][:n]
    return max(row[:, 0].max().item() for _, row in attention_probe(model, encoders, refs, sigma=0.5))


def train(data: str, out: str, flags: str = "", tasks: list[str] | None = None, scale: float = 1.0,
          threads: int = 2, entry: list[str] = ENTRY, read: float = READ, batch: int = 8) -> None:
    """Run the recipe, each stage a fresh process (its EMA export completed into a weights folder by save_toy).
    `flags` go to every stage (e.g. "--seed 1", "--siglip none"); `tasks` keeps only those tasks (and the copies)
    of the mix (caches under `out`); `scale` multiplies every stage's steps; `batch` pairs a step (a GPU's 64)
    divides the steps by batch / 8 and multiplies the learning rates by its square root; stages already exported
    are kept and a stage cut short goes on (a rerun resumes).
    The copy stage goes on, 1,000 steps at a time, until a head of the denoiser reads the SigLIP token at its own
    position (reads_its_reference >= `read`), up to MAX_COPY_STEPS: when that read forms varies from run to run
    (docs/toy.md), and every later stage depends on it. `read` 0 turns this gate off."""
    mix, key = os.path.join(data, "mix.txt"), re.sub(r"--seed \d+", "", " ".join(flags.split()))
    cache = os.path.join(data, "cache", hashlib.sha1(key.encode()).hexdigest()[:8])  # shared by the seeds of a setting
    if tasks:
        keep = tuple(f"train_{t}.json" for t in (*tasks, COPY))
        os.makedirs(out, exist_ok=True)
        with open(mix) as f, open(os.path.join(out, "mix.txt"), "w") as g:
            g.writelines(line for line in f if line.split(",")[1].endswith(keep))
        mix, cache = os.path.join(out, "mix.txt"), os.path.join(out, "cache")
    for name, stage_flags in RECIPE:
        if os.path.isdir(os.path.join(out, name, "ema")):
            print(f"{name}: done before, kept")
            continue
        argv = f"{COMMON} {stage_flags} {flags} --out {out}/{name}".format(out=out, data=data, cache=cache)
        argv = argv.replace(f"{data}/mix.txt", mix).split()
        k = batch / 8
        for flag, factor in (("--steps", scale / k), ("--decay", scale / k), ("--lr", k**0.5), ("--batch_size", k)):
            for i in [i + 1 for i, a in enumerate(argv) if a == flag]:  # the cool-down keeps its share of the stage
                value = float(argv[i]) * factor
                argv[i] = f"{value:.3g}" if flag == "--lr" else str(max(1, round(value)))
        print(f"{name}: train.py {' '.join(argv)}", flush=True)
        t, env = time.perf_counter(), {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([*entry, *argv, "--resume"], check=True, env=env)  # --resume: a rerun goes on where it stopped
        save_toy(os.path.join(out, name, "ema"))
        steps = int(argv[argv.index("--steps") + 1])
        while name == "s0-copy" and read and steps < MAX_COPY_STEPS * scale / k:
            torch.set_num_threads(threads)
            strongest = reads_its_reference(os.path.join(out, name, "ema"), data)
            print(f"{name}: {steps} steps, the reference read {strongest:.2f}", flush=True)
            if strongest >= read:
                break
            steps += max(1, round(1000 * scale / k))
            argv[argv.index("--steps") + 1] = str(steps)
            subprocess.run([*entry, *argv, "--resume"], check=True, env=env)
            save_toy(os.path.join(out, name, "ema"))
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)


@torch.no_grad()
def attention_probe(model, encoders, refs: list[np.ndarray], sigma: float) -> list[tuple[str, torch.Tensor]]:
    """Per block: (H, 3) attention of the image tokens on [own-position SigLIP token, all SigLIP tokens, VLM tokens]."""
    feats = encoders.features(["copy the image"] * len(refs), [[Image.fromarray(r)] for r in refs], train=False)
    txt, mask = model.text_stream(feats)  # (B, L, D), SigLIP tokens before each <|vision_end|>; all the same length
    L, T = txt.shape[1], feats[0]["siglip"].shape[1]
    start = torch.tensor([L - len(f["vlm"]) - T + int(f["vision_end"][0]) for f in feats])  # (B,) first SigLIP
    rows = []

    def probe(q, k, v, pe, mask=None):  # flux.attention with its weights recorded (copies: nothing padded)
        logits = flux.apply_rope(q, pe) @ flux.apply_rope(k, pe).transpose(-1, -2) / math.sqrt(q.shape[-1])
        a = logits.softmax(-1)  # (B, H, L + 64, L + 64)
        img = a[:, :, L:]  # (B, H, 64, L + 64): the image tokens' queries
        sig = torch.stack([img[b, :, :, s : s + T] for b, s in enumerate(start.tolist())])  # (B, H, 64, T)
        own = sig.diagonal(dim1=2, dim2=3).mean((0, 2))  # (H,)
        on_sig = sig.sum(-1).mean((0, 2))
        on_vlm = img[..., :L].sum(-1).mean((0, 2)) - on_sig
        rows.append(torch.stack([own, on_sig, on_vlm], -1))
        return attention(q, k, v, pe, mask)

    attention, flux.attention = flux.attention, probe
    try:
        x0 = flux.PixelUnshuffle(2).encode(to_tensor(refs))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        pooled = torch.zeros(len(refs), model.denoiser.config.vec_in_dim)  # no CLIP in the toy, as trained
        model.velocity((1 - sigma) * x0 + sigma * noise, torch.full((len(refs),), sigma), txt, pooled, 1.0, mask)
    finally:
        flux.attention = attention
    names = [f"d{i}" for i in range(len(model.denoiser.double_blocks))]
    names += [f"s{i}" for i in range(len(model.denoiser.single_blocks))]
    return list(zip(names, rows, strict=True))


def seeds(data: str, out: str, n: int, flags: str = "", tasks: list[str] | None = None, scale: float = 1.0,
          threads: int = 2, batch: int = 8) -> dict:
    """The recipe with seeds 0..n-1 (denoiser init, data order and noise; the frozen encoders stay the same), each
    evaluated on the held-out split: per task the mean and the range over the seeds."""
    rows = []
    for seed in range(n):
        train(data, os.path.join(out, f"seed{seed}"), f"{flags} --seed {seed}", tasks, scale, threads, batch=batch)
        rows.append(evaluate_folder(os.path.join(out, f"seed{seed}", "s2", "ema"), data, tasks=tasks, show=False))
    table = {}
    print(f"{'task':8} {'success: mean (min-max)':>24} {'IoU':>18}   per seed")
    for task in rows[0]:
        ok, iou = [r[task]["success"] for r in rows], [r[task]["iou"] for r in rows]
        table[task] = {"success": ok, "iou": iou}
        show = f"{np.mean(iou):.2f} ({min(iou):.2f}-{max(iou):.2f})" if not math.isnan(iou[0]) else ""
        print(f"{task:8} {np.mean(ok):10.0%} ({min(ok):.0%}-{max(ok):.0%}) {show:>18}   "
              + " ".join(f"{v:.0%}" for v in ok))
    return table


def evaluate_folder(folder: str, data: str, n: int | None = None, show: bool = True,
                    tasks: list[str] | None = None) -> dict:
    """The held-out table of a toy weights folder on `data`'s test split (`tasks` only)."""
    model, encoders = load_toy(folder)
    records = [r for r in load_records(data, "test") if not tasks or r["task"] in tasks][:n]
    return evaluate(records, outputs(model, encoders, records), show)


def write_batch(data: str, path: str, n: int) -> None:
    """The first n held-out pairs of each task as a sample.py --batch file: one row per pair with its reference and
    target copied into images/ beside the file, the task for scoring (evaluate_batch), seeds 42 + row."""
    folder, rows = os.path.dirname(os.path.abspath(path)), []
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = [r for t in TASKS for r in [r for r in load_records(data, "test") if r["task"] == t][:n]]
    for i, r in enumerate(records):
        names = [f"images/{i:04d}_ref.png"] * len(r["refs"]) + [f"images/{i:04d}_target.png"]
        for name, img in zip(names, r["refs"] + [r["target"]], strict=True):
            Image.fromarray(img).save(os.path.join(folder, name))
        rows.append({"prompt": r["text"].replace("\n<image>", ""), "images": names[:-1], "seed": 42 + i,
                     "name": f"{r['task']}/{i:04d}", "task": r["task"], "target": names[-1], "shapes": r["shapes"]})
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def evaluate_batch(path: str, outputs_folder: str, show: bool = True, grid: str = "") -> dict:
    """The held-out table of `sample.py --batch FILE --out FOLDER`'s images for a write_batch file; `grid`: also
    save them as one picture, a row per pair: reference (blank for text to image) | output | target, 4× nearest."""
    folder, records, images = os.path.dirname(os.path.abspath(path)), [], []
    with open(path) as f:
        for row in map(json.loads, f):
            load = lambda name: np.asarray(Image.open(os.path.join(folder, name)).convert("RGB"))
            records.append({"task": row["task"], "shapes": row["shapes"], "refs": [load(p) for p in row["images"]],
                            "target": load(row["target"])})
            images.append(np.asarray(Image.open(os.path.join(outputs_folder, row["name"] + ".png")).convert("RGB")))
    if grid:
        blank = np.full((SIZE, SIZE, 3), 255, np.uint8)
        rows = [np.concatenate([(r["refs"] or [blank])[0], o, r["target"]], 1)
                for r, o in zip(records, images, strict=True)]
        pairs = [np.concatenate(rows[i : i + 2], 1) for i in range(0, len(rows), 2)]  # two pairs side by side
        picture = Image.fromarray(np.concatenate(pairs, 0))
        picture.resize((picture.width * 4, picture.height * 4), Image.NEAREST).save(grid)
    return evaluate(records, images, show)


if __name__ == "__main__":
    if sys.argv[1:2] == ["stage"]:  # one train.py run with the toy preset (what the recipe launches)
        import train as T

        T.main(sys.argv[2:], PRESETS)
        sys.exit()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the procedural dataset: python toy.py make DIR")
    m.add_argument("dir")
    m.add_argument("--train", type=int, default=12_000)
    m.add_argument("--test", type=int, default=600)
    m.add_argument("--seed", type=int, default=0)
    for name, text in (("train", "the recipe through train.py, then the held-out table"),
                       ("seeds", "the recipe over --n seeds: mean and range per task")):
        t = sub.add_parser(name, help=text)
        t.add_argument("--data", required=True)
        t.add_argument("--out", required=True)
        t.add_argument("--flags", default="", help='train.py flags for every stage, e.g. "--seed 1" or "--siglip none"')
        t.add_argument("--tasks", nargs="+", choices=TASKS, help="train (and evaluate) only these tasks")
        t.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.01: a smoke run)")
        t.add_argument("--threads", type=int, default=2, help="OpenMP threads of each train.py process")
        t.add_argument("--batch", type=int, default=8, help="pairs a step (a GPU: 64): fewer steps, higher lr")
        t.add_argument("--n", type=int, default=3, help="seeds (toy.py seeds)")
    e = sub.add_parser("eval", help="the held-out table: python toy.py eval FOLDER --data DIR")
    e.add_argument("folder", help="assets/toy, a recipe stage's export such as RUN/s2/ema, or --batch's outputs")
    e.add_argument("--data", help="the data set whose held-out split to sample and score")
    e.add_argument("--batch", help="instead: score FOLDER, the images of sample.py --batch FILE")
    e.add_argument("--n", type=int, help="the first n held-out pairs only")
    e.add_argument("--grid", default="", help="with --batch: also save the pictures as one PNG (the showcase)")
    b = sub.add_parser("batch", help="held-out pairs as a sample.py --batch file: python toy.py batch DIR --out F")
    b.add_argument("data")
    b.add_argument("--out", required=True, help="the .jsonl file (images/ are written beside it)")
    b.add_argument("--n", type=int, default=2, help="pairs per task")
    a = p.parse_args()
    if a.command == "make":
        make_dataset(a.dir, a.train, a.test, a.seed)
        print(f"wrote {a.train} training and {a.test} held-out pairs to {a.dir} (data.txt format: {a.dir}/train.txt)")
    elif a.command == "train":
        start = time.perf_counter()
        train(os.path.abspath(a.data), os.path.abspath(a.out), a.flags, a.tasks, a.scale, a.threads, batch=a.batch)
        torch.set_num_threads(a.threads)
        evaluate_folder(os.path.join(a.out, "s2", "ema"), a.data, tasks=a.tasks)
        print(f"recipe and held-out table: {(time.perf_counter() - start) / 60:.1f} min")
    elif a.command == "seeds":
        seeds(os.path.abspath(a.data), os.path.abspath(a.out), a.n, a.flags, a.tasks, a.scale, a.threads, a.batch)
    elif a.command == "batch":
        write_batch(a.data, a.out, a.n)
        print(f"wrote {a.out}: python sample.py --batch {a.out} --out OUT, then python toy.py eval OUT --batch {a.out}")
    elif a.batch:
        evaluate_batch(a.batch, a.folder, grid=a.grid)
    else:
        torch.set_num_threads(2)
        evaluate_folder(a.folder, a.data, a.n)
