"""The toy world: UniWorld-V1's whole method on 32x32 images of flat shapes, trained on a CPU (python toy.py --help).

The same code as at full scale, used as a client: train.py trains the toy preset (train.main(argv, PRESETS)) with a
frozen tiny Qwen2.5-VL and SigLIP feeding model.py's two connectors into the FLUX text stream (text ids zero), the
paper §3.5 edit-mask weighting and the sharded EMA; sample.py samples the exported weights folder like any release.
The reference enters only through the two encoders. Stage 0 (the toy's stand-in for FLUX.1's pretraining) trains the
whole denoiser from scratch. The scenes, tasks and metric: toy_data.py; why each choice, and what was measured on
the way: docs/toy.md.

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
from toy_data import CELL, COLS, COPY, ROWS, SIZE, TASKS, WORDS, Shape, draw, evaluate, load_records, make_dataset

VLM_SEED, VLM_PIXELS = 0, 56 * 56  # the frozen toy VLM is the same in every stage; references reach it as 56x56


# ----------------------------------------------------------------------------------------------------------------
# The toy model pieces: frozen encoders with a structured deterministic init, the denoiser config


def toy_flux_config(hidden: int = 96, heads: int = 3) -> flux.FluxConfig:
    """2 double + 2 single blocks on 4x4 pixel patches, three heads of 32 (docs/toy.md), a guidance embedder fed 1.0
    as in FLUX.1-dev (so sample.py shifts the schedule as in training); RoPE splits a head as FLUX.1 does (16, 56, 56).
    RoPE theta 8: on an 8x8 token grid, 5 of theta 10,000's 7 row frequencies turn by less than 0.6 rad in all."""
    head = hidden // heads
    if head * heads != hidden or head % 32:
        raise ValueError(f"hidden {hidden} / heads {heads} must give a head size that is a multiple of 32")
    return flux.FluxConfig(in_channels=48, out_channels=48, vec_in_dim=16, context_in_dim=128, hidden_size=hidden,
                           num_heads=heads, depth=2, depth_single_blocks=2,
                           axes_dim=(head // 8, 7 * head // 16, 7 * head // 16), theta=8, guidance_embed=True)


def toy_vlm(seed: int = VLM_SEED) -> VLMEncoder:
    """A random frozen Qwen2.5-VL, one token per toy word. "top" holds [cos, sin](p w_k) of its cell's centre row p at
    the RoPE row frequencies, "left" the same for columns: a key projected from "top" meets the top rows' queries."""
    vlm = tiny_vlm(seed, hidden=64, layers=2, words=WORDS, pixels=VLM_PIXELS)
    c = toy_flux_config()
    emb = vlm.model.get_input_embeddings().weight
    rows, cols, norm = c.axes_dim[1], c.axes_dim[2], emb.norm(dim=1).mean().item()  # a random token's norm
    with torch.no_grad():
        for i, (row_word, col_word) in enumerate(zip(ROWS, COLS, strict=True)):
            p = (CELL[i] - 2) / (SIZE // 8)  # the cell centre on the 8x8 token grid (token r spans pixels 4r..4r+3)
            for word, start, dim in ((row_word, 0, rows), (col_word, rows, cols)):
                v = torch.zeros(emb.shape[1], dtype=torch.float64)
                v[start : start + dim] = rope_sincos(torch.tensor([p], dtype=torch.float64), dim, c.theta)[0]
                emb[vlm.tokenizer.convert_tokens_to_ids(word)] = (v * norm / v.norm()).to(emb)
    return vlm


def rope_sincos(positions: Tensor, axis_dim: int, theta: int) -> Tensor:
    """(n,) positions p -> (n, axis_dim) float64: [cos(p w_k), sin(p w_k)] interleaved, w_k = theta^(-2k/axis_dim)."""
    w = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
    a = positions.double()[:, None] * w  # (n, axis_dim/2)
    return torch.stack([a.cos(), a.sin()], -1).flatten(1)


def toy_siglip() -> SiglipEncoder:
    """A SiglipVisionModel with no layers: token = LayerNorm(4x4 pixels (48) | row, col sinusoids | position one-hot).
    The one-hot code gives each position a free key through the siglip_projector, one that can meet the RoPE-rotated
    query of its own image token; the sinusoids alone need rotation-equivariant maps learned (docs/toy.md)."""
    c, patch = toy_flux_config(), 4
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
    one vector q0, and the SigLIP token at (r, c) gets the key R(r, c) q0 (through the siglip_projector from its
    one-hot code, txt_in and the text stream's k), so each image token attends to the SigLIP token at its position.
    When stage 0 finds that read by itself varies from run to run (docs/toy.md); a pretrained denoiser would bring it.
    q0: ones on the highest and third-highest RoPE frequencies of rows and columns: a peak no other position aliases."""
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
    """train.py's `--model toy`: stage 0 builds the denoiser from cfg.seed, later stages load the stage-0 export (the
    toy's "FLUX.1-dev") given as --flux. No SigLIP in stage 1 (official) nor with `--siglip none` (an ablation)."""
    if cfg.flux:
        model = load_uniworld(cfg.flux, with_vlm=False)[0].train()
    else:
        torch.manual_seed(cfg.seed)
        model = UniWorld(flux.Flux(toy_flux_config()), vlm_dim=64, siglip_dim=toy_siglip().model.config.hidden_size)
        dit_init(model.denoiser)
        read_init(model)
    siglip = toy_siglip() if cfg.stage != 1 and cfg.siglip != "none" else None
    return model, Encoders(vlm=toy_vlm(), siglip=siglip, ae=flux.PixelUnshuffle(2))


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


def load_toy(folder: str) -> tuple[UniWorld, Encoders]:
    """A toy weights folder, as sample.py loads it (no CLIP: the pooled vector is zeros, as trained)."""
    model, vlm = load_uniworld(folder, vlm_pixels=VLM_PIXELS)
    return model, Encoders(vlm, load_siglip(os.path.join(folder, "siglip")), flux.load_autoencoder(folder))


def outputs(model: UniWorld, encoders: Encoders, records: list[dict], batch: int = 50,
            progress: bool = True) -> list[np.ndarray]:
    """sample.generate on every record, as `python sample.py` runs it (inference prompt, seed 42 + i) -> uint8."""
    out = []
    for i in tqdm(range(0, len(records), batch), desc="sampling", disable=not progress):
        rs = records[i : i + batch]
        images = generate(model, encoders, [r["text"].replace("\n<image>", "") for r in rs],
                          [[Image.fromarray(im) for im in r["refs"]] for r in rs], SIZE, SIZE,
                          seeds=list(range(42 + i, 42 + i + len(rs))), steps=20, guidance=1.0, progress=False)
        out += [np.asarray(im) for im in images]
    return out


def to_tensor(imgs: list[np.ndarray]) -> Tensor:
    """uint8 (H, W, 3) images -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------------------------
# The recipe: stage 0 on copies until the reference read forms, then on the task mix with its cool-down; stage 1;
# stage 2. Each stage a train.py run; the encoder caches are built once per data set.

COMMON = ("--model toy --resolution 32 --batch_size 8 --workers 0 --lr 2e-3 --qk_norm_lr 10 --ema_decay 0.995 "
          "--precision fp32 --compile --log_every 50 --val_every 1000000000 --ckpt_every 2500 --val_steps 20 "
          "--val_guidance 1")
RECIPE = (  # run name, train.py flags ({out}: the recipe's folder, {data}: the data set's, {cache}: its caches)
    ("s0-copy", "--stage 0 --data {data}/copy.txt --steps 1500 --cache {cache}/copy --shift 1.5"),  # high noise
    ("s0", "--stage 0 --data {data}/mix.txt --init {out}/s0-copy --steps 40000 --decay 6000 --cache {cache}/mix"),
    ("s1", "--stage 1 --data {data}/mix.txt --flux {out}/s0/ema --steps 500 --lr 1e-3 --no-compile"),  # uncached
    ("s2", "--stage 2 --data {data}/mix.txt --flux {out}/s0/ema --init {out}/s1 --steps 1000 --lr 1e-4 "
           "--warmup 0 --no-grad_ckpt --cache {cache}/mix --no-compile"),  # short: compiling costs more than it saves
)
READ, MAX_COPY_STEPS = 0.5, 8000  # the copy stage ends once a head reads its own position with this attention
ENTRY = [sys.executable, os.path.abspath(__file__), "stage"]  # a stage: train.main(argv, PRESETS) in a fresh process


def reads_its_reference(folder: str, data: str, n: int = 16) -> float:
    """The strongest own-position read of the copy stage's export: over every block and head, the mean attention
    of the image tokens on the SigLIP token at their own position (attention_probe, σ = 0.5, n held-out refs)."""
    model, encoders = load_toy(folder)
    refs = [r["refs"][0] for r in load_records(data, "test") if r["refs"]][:n]
    return max(row[:, 0].max().item() for _, row in attention_probe(model, encoders, refs, sigma=0.5))


def train(data: str, out: str, flags: str = "", tasks: list[str] | None = None, scale: float = 1.0,
          threads: int = 2, entry: list[str] = ENTRY, read: float = READ, batch: int = 8, log=None) -> None:
    """Run the recipe, each stage a fresh train.py process whose EMA export save_toy completes into a weights folder;
    a rerun keeps the exported stages and resumes a cut one. `flags` go to every stage; `tasks` keeps only those tasks
    (and the copies) in the mix; `scale` multiplies the steps; `batch` pairs a step (a GPU's 64) divides them by
    batch / 8 and multiplies the lr by its square root. The copy stage goes on, 1,000 steps at a time up to
    MAX_COPY_STEPS, until reads_its_reference >= `read` (0: no gate): every later stage depends on that read. `log`:
    an open file for all of its output and its train.py runs', instead of the terminal (runs side by side)."""
    os.makedirs(out, exist_ok=True)
    streams = {"stdout": log, "stderr": subprocess.STDOUT} if log else {}  # the train.py runs' output
    say = lambda text: print(text, file=log or sys.stdout, flush=True)
    mix, key = os.path.join(data, "mix.txt"), re.sub(r"--seed \d+", "", " ".join(flags.split()))
    cache = os.path.join(data, "cache", hashlib.sha1(key.encode()).hexdigest()[:8])  # shared by the seeds of a setting
    if tasks:
        keep = tuple(f"train_{t}.json" for t in (*tasks, COPY))
        with open(mix) as f, open(os.path.join(out, "mix.txt"), "w") as g:
            g.writelines(line for line in f if line.split(",")[1].endswith(keep))
        mix, cache = os.path.join(out, "mix.txt"), os.path.join(out, "cache")
    for name, stage_flags in RECIPE:
        if os.path.isdir(os.path.join(out, name, "ema")):
            say(f"{name}: done before, kept")
            continue
        argv = f"{COMMON} {stage_flags} {flags} --out {out}/{name}".format(out=out, data=data, cache=cache)
        argv = argv.replace(f"{data}/mix.txt", mix).split()
        k = batch / 8
        for flag, factor in (("--steps", scale / k), ("--decay", scale / k), ("--lr", k**0.5), ("--batch_size", k)):
            for i in [i + 1 for i, a in enumerate(argv) if a == flag]:  # the cool-down keeps its share of the stage
                value = float(argv[i]) * factor
                argv[i] = f"{value:.3g}" if flag == "--lr" else str(max(1, round(value)))
        say(f"{name}: train.py {' '.join(argv)}")
        t, env = time.perf_counter(), {**os.environ, "OMP_NUM_THREADS": str(threads)}
        while True:
            subprocess.run([*entry, *argv, "--resume"], check=True, env=env, **streams)  # a rerun goes on from there
            save_toy(os.path.join(out, name, "ema"))
            steps = int(argv[argv.index("--steps") + 1])
            if name != "s0-copy" or not read or steps >= MAX_COPY_STEPS * scale / k:
                break
            torch.set_num_threads(threads)
            strongest = reads_its_reference(os.path.join(out, name, "ema"), data)
            say(f"{name}: {steps} steps, the reference read {strongest:.2f}")
            if strongest >= read:
                break
            argv[argv.index("--steps") + 1] = str(steps + max(1, round(1000 * scale / k)))
        say(f"{name}: {time.perf_counter() - t:.0f} s")


PROBING = threading.Lock()  # attention_probe swaps flux.attention for a recording copy while it runs


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

    with PROBING:  # one probe at a time (toy.py seeds runs several recipes' gates in threads)
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
          threads: int = 1, batch: int = 8, jobs: int | None = None) -> dict:
    """The recipe with seeds 0..n-1 (denoiser init, data order and noise; the frozen encoders stay the same), `jobs`
    of them at a time (default: all), each logging to OUT/seedN.log, then each evaluated on the held-out split: per
    task the mean and the range over the seeds. Runs of 1 thread side by side use a CPU's cores better than one run's
    threads do (docs/toy.md, 2026-12-08)."""
    os.makedirs(out, exist_ok=True)
    folders = [os.path.join(out, f"seed{seed}") for seed in range(n)]
    print(f"{n} runs, {jobs or n} at a time: their output in {out}/seed0.log ...", flush=True)

    def run(seed: int) -> None:
        with open(f"{folders[seed]}.log", "a") as log:
            try:
                train(data, folders[seed], f"{flags} --seed {seed}", tasks, scale, threads, batch=batch, log=log)
            except Exception:
                print(f"seed {seed} failed: the end of {log.name} says why", flush=True)
                raise

    with ThreadPoolExecutor(jobs or n) as pool:  # each run is train.py processes: the threads only wait for them
        list(pool.map(run, range(n)))
    torch.set_num_threads(2)  # the evaluations, one after another
    rows = [evaluate_folder(os.path.join(f, "s2", "ema"), data, tasks=tasks, show=False) for f in folders]
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
        t.add_argument("--threads", type=int, default=2 if name == "train" else 1,
                       help="OpenMP threads of each train.py process")
        t.add_argument("--batch", type=int, default=8, help="pairs a step (a GPU: 64): fewer steps, higher lr")
    t.add_argument("--n", type=int, default=3, help="seeds")
    t.add_argument("--jobs", type=int, help="runs at a time (default: all of them; each logs to OUT/seedN.log)")
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
        seeds(os.path.abspath(a.data), os.path.abspath(a.out), a.n, a.flags, a.tasks, a.scale, a.threads, a.batch,
              a.jobs)
    elif a.command == "batch":
        write_batch(a.data, a.out, a.n)
        print(f"wrote {a.out}: python sample.py --batch {a.out} --out OUT, then python toy.py eval OUT --batch {a.out}")
    elif a.batch:
        evaluate_batch(a.batch, a.folder, grid=a.grid)
    else:
        torch.set_num_threads(2)
        evaluate_folder(a.folder, a.data, a.n)
