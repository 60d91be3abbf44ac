"""Sample from UniWorld-V1 (Lin et al. 2025): edit, text to image, perception, understanding, JSONL batches on GPUs.

Generation is FLUX.1-dev's sampler (BFL sampling.py): Gaussian latents at sigma = 1, Euler steps of the rectified-flow
ODE to sigma = 0 over a schedule shifted toward noise for large images, conditioned on UniWorld's text stream (model.py)
as the official inference builds it (docs/official.md §8: 28 steps, guidance 3.5, joint T5, seed 42).

    python sample.py --edit --image cat.png --prompt "Put a red hat on the cat." --out hat.png
    python sample.py --t2i --prompt "A lighthouse on a cliff at dawn, oil painting." --num-images 4 --seed 7
    python sample.py --edit --image person.png --image shirt.png --prompt "Dress the person in this shirt."
    python sample.py --ask "What is unusual about this picture?" --image cat.png     # Qwen2.5-VL answers in text
    python sample.py --prompt "..." [--image x.png]   # no mode: the weights' task head decides, as the official app
    python sample.py --batch prompts.jsonl --out outputs/   # many rows; torchrun --nproc_per_node 8 shards them

Weights: --weights is a release-layout folder or hub id; --flux (vae/, CLIP, T5) and --siglip default to its vae/ and
siglip/, else to the hub ids (FLUX.1-dev is gated: accept its licence, then `hf auth login`). Its sample.json may set
defaults, the examples that `--edit`/`--t2i` run alone, and notes on modes it cannot serve. With no --weights:
    python sample.py --edit                 # the bundled toy model (assets/toy, 32x32 shapes) edits its example
    python sample.py --edit --image my32.png --prompt "segment the red circle at the top left"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from contextlib import contextmanager
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from huggingface_hub import snapshot_download
from PIL import Image
from torch import Tensor
from tqdm import tqdm

import flux

if TYPE_CHECKING:  # model.py imports transformers, which takes seconds: the CLI imports it only after checking args
    from model import Encoders, UniWorld

RELEASE_ID, FLUX_ID = "LanguageBind/UniWorld-V1", "black-forest-labs/FLUX.1-dev"
SIGLIP_ID = "google/siglip2-so400m-patch16-512"
FLUX_PARTS = ["vae/*", "text_encoder/*", "tokenizer/*", "text_encoder_2/*", "tokenizer_2/*"]  # not transformer/
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")  # the default weights
OFFICIAL = {"steps": 28, "guidance": 3.5, "area": 1024 * 1024, "vlm_pixels": 448 * 448}  # univa/serve/cli.py
MAX_SIDE, MAX_STEPS, MAX_IMAGES = 4096, 1000, 64  # FLUX.1 is trained up to ~2 MP; beyond these, a typo
Cond = tuple[Tensor, Tensor | None, Tensor]  # the text condition: txt (B, L, ctx), its padding mask (B, L), pooled y

# ----------------------------------------------------------------------------------------------------------------
# The sampler (also train.py's validation)


def get_schedule(steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """steps + 1 noise levels from 1 to 0 (BFL `get_schedule`), shifted by mu(image tokens) except for schnell."""
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (flux.time_shift(flux.resolution_mu(image_seq_len), sigmas) if shift else sigmas).tolist()


def denoise(model: UniWorld, x: Tensor, sigmas: list[float], cond: Cond, guidance: float, negative: Cond | None = None,
            cfg: float = 1.0, progress: bool = True) -> Tensor:
    """Euler steps x <- x + (sigma_next - sigma) * v from noise to data, the state x (B, C, h, w) in fp32; with the
    condition of a `negative` instruction, true CFG v = v_neg + cfg * (v - v_neg) (off officially)."""
    dtype = next(model.parameters()).dtype
    for sigma, sigma_next in tqdm(list(pairwise(sigmas)), desc="denoising", disable=not progress):
        s = torch.full((len(x),), sigma, device=x.device)
        v = model.velocity(x.to(dtype), s, cond[0], cond[2], guidance, cond[1]).float()
        if negative is not None:  # a separate pass: the two text streams differ in length
            v_neg = model.velocity(x.to(dtype), s, negative[0], negative[2], guidance, negative[1]).float()
            v = v_neg + cfg * (v - v_neg)
        x = x + (sigma_next - sigma) * v
    return x


@torch.no_grad()
def generate(model: UniWorld, encoders: Encoders, instructions: list[str], images: list[list[Image.Image]],
             height: int, width: int, seeds: list[int], steps: int = 28, guidance: float = 3.5, cfg: float = 1.0,
             negative: str = "", device=None, offload: bool = False, progress: bool = True) -> list[Image.Image]:
    """One image per (instruction, reference images, seed), independent of its batch-mates. With a T5 in `encoders`,
    the official inference (joint T5: T5(instruction) appended, pooled = CLIP(instruction)); without, pooled = CLIP("")
    as in training. `offload`: every model waits on the CPU and visits `device` only while it runs."""
    check_size(height, width)
    if not len(instructions) == len(images) == len(seeds):
        raise ValueError(f"give one instruction, image list and seed per sample: got {len(instructions)}, "
                         f"{len(images)}, {len(seeds)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype, ae = next(model.parameters()).dtype, encoders.ae
    h, w, channels = height // ae.factor, width // ae.factor, model.denoiser.config.in_channels // 4  # latent grid

    def condition(texts: list[str]) -> Cond:
        with on(device, encoders.vlm, encoders.siglip, offload=offload):
            feats = encoders.features(texts, images, train=False)
        with on(device, encoders.t5, encoders.clip, offload=offload):
            t5 = None if encoders.t5 is None else encoders.t5(texts).to(device, dtype)
            pooled = encoders.pooled(texts if t5 is not None else [""] * len(texts), model.denoiser.config.vec_in_dim)
        with on(device, model, offload=offload):
            feats = [{k: v.to(device, dtype) if k in ("vlm", "siglip") and v is not None else v for k, v in f.items()}
                     for f in feats]
            return *model.text_stream(feats, t5), pooled.to(device, dtype)

    cond = condition(instructions)
    neg = condition([negative] * len(instructions)) if cfg != 1 else None
    # BFL: the noise of each image from a CPU generator seeded with its seed, so a seed means the same image anywhere
    x = torch.cat([torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])
    sigmas = get_schedule(steps, (h // 2) * (w // 2), shift=model.denoiser.config.guidance_embed)
    with on(device, model, offload=offload):
        x = denoise(model, x.to(device), sigmas, cond, guidance, neg, cfg, progress)
    with on(device, ae, offload=offload):
        ae_dtype = next(ae.parameters(), x).dtype  # a weightless autoencoder takes the state's dtype
        return [to_pil(ae.decode(x[i : i + 1].to(ae_dtype))) for i in range(len(x))]


@contextmanager
def on(device, *modules, offload: bool = False):
    """Model-level offload: with `offload`, move the modules to `device` for the block and back to the CPU after."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)] if offload else []  # not None
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")


def to_pil(x: Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> an RGB image, as BFL converts (clamp, 127.5 * (x + 1), truncate)."""
    return Image.fromarray((127.5 * (x[0].float().clamp(-1, 1) + 1)).to(torch.uint8).permute(1, 2, 0).cpu().numpy())


def save_image(image: Image.Image, path: str) -> None:
    """Written under a temporary name, then renamed: a killed run never leaves a half-written image."""
    tmp = f"{path}.tmp{os.getpid()}"
    image.save(tmp, format=Image.registered_extensions()[os.path.splitext(path)[1].lower()])
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Weights: a release-layout folder (with, optionally, vae/ + text encoders, siglip/, task_head_final.pt, sample.json)


def locate(path_or_id: str, what: str, patterns: list[str] | None = None) -> str:
    """A local folder as is (no network), or a hub id, downloaded (or found in the cache) by huggingface_hub."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{what}: no folder {path_or_id!r}; pass a local folder or a hub id (org/name)")
    try:
        return snapshot_download(path_or_id, allow_patterns=patterns)
    except (OSError, ValueError) as e:  # gated, offline, missing: huggingface_hub's errors are OSError / ValueError
        reason = " ".join(str(e).split())[:160]
        raise FileNotFoundError(f"{what}: cannot download {path_or_id} ({type(e).__name__}: {reason}...). For a gated "
                                "repo (FLUX.1-dev) accept its licence on huggingface.co and run `hf auth login`; "
                                "offline, pass a local folder") from e


def defaults_of(weights: str) -> dict:
    """The official settings, overridden by the weights folder's sample.json if it has one."""
    path = os.path.join(weights, "sample.json")
    if not os.path.isfile(path):
        return dict(OFFICIAL, examples={}, notes={})
    try:
        with open(path) as f:
            return {**OFFICIAL, "examples": {}, "notes": {}, **json.load(f)}
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def load(args, weights: str, defaults: dict, device, dtype) -> tuple[UniWorld | None, Encoders, torch.nn.Module | None]:
    """UniWorld + Qwen from the release, SigLIP, VAE + CLIP (+ T5: joint T5) from the FLUX folder, the task head."""
    from encoders import load_clip, load_siglip, load_t5, load_vlm  # here: transformers is slow to import
    from model import Encoders, load_task_head, load_uniworld

    where, pixels = "cpu" if args.offload else device, args.vlm_pixels or defaults["vlm_pixels"]
    if args.ask is not None:
        return None, Encoders(vlm=load_vlm(weights, pixels=pixels, dtype=dtype).to(where)), None
    own = lambda part: os.path.isdir(os.path.join(weights, part))
    folder = args.flux or (weights if own("vae") else FLUX_ID)
    folder = locate(folder, "--flux", FLUX_PARTS[:3] if args.joint_t5 is False else FLUX_PARTS)
    siglip = locate(args.siglip or (os.path.join(weights, "siglip") if own("siglip") else SIGLIP_ID), "--siglip")
    with open(os.path.join(weights, "config.json")) as f:
        if json.load(f).get("joint_ref_feature"):
            raise ValueError(f"{weights} conditions on reference latents (joint_ref_feature), which sample.py does "
                             f"not run; load it with the code that trained it")
    has = lambda part: os.path.isdir(os.path.join(folder, part))
    joint_t5 = has("text_encoder_2") and args.joint_t5 is not False
    model, vlm = load_uniworld(weights, dtype=dtype, device=where, vlm_pixels=pixels)
    encoders = Encoders(vlm=vlm.to(where), siglip=load_siglip(siglip, dtype=dtype).to(where),
                        ae=flux.load_autoencoder(folder, dtype=dtype, device=where),
                        clip=load_clip(folder, dtype=dtype).to(where) if has("text_encoder") else None,  # None: zeros
                        t5=load_t5(folder, max_length=256, dtype=dtype).to(where) if joint_t5 else None)
    head = os.path.join(weights, "task_head_final.pt")
    return model, encoders, load_task_head(head).to(where) if os.path.isfile(head) else None


def pick_device(args) -> tuple[torch.device, torch.dtype]:
    """--device (cuda if there is one; LOCAL_RANK's under torchrun), and its dtype: bf16 on CUDA, fp32 on the CPU."""
    try:
        device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                              else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but PyTorch sees no CUDA GPU")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Batches of rows (--batch FILE.jsonl): each row as it would be alone, the images sharded over torchrun's ranks


def read_rows(path: str, args, defaults: dict) -> tuple[list[dict], int]:
    """The JSONL rows -> jobs (one per output image); a bad row is reported with its line number and skipped. A row:
    {"prompt": str, "images": [paths relative to the file], "seed": int or "seeds": [int, ...], "num_images": n,
    "height"/"width" or "area", "steps", "guidance", "resize": side of the saved square (GenEval: 512), "name": output
    stem, "{i}" (or "{i:04d}") for the image index (default: the line number)}."""
    jobs, bad = [], 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "<image>" in row["prompt"]:
                raise ValueError('a row is a JSON object with a "prompt" string (no <image> marker)')
            refs = [read_image(os.path.join(os.path.dirname(path), p)) for p in row.get("images", [])]
            seeds = row.get("seeds") or [row.get("seed", args.seed) + i for i in range(row.get("num_images", 1))]
            steps, guidance = row.get("steps", args.steps), row.get("guidance", args.guidance)
            check_numbers(steps, len(seeds), min(seeds), guidance, 1.0)
            size = output_size(row.get("height"), row.get("width"), row.get("area", args.area), refs, defaults["area"])
            if row.get("resize") is not None and not (type(row["resize"]) is int and 16 <= row["resize"] <= MAX_SIDE):
                raise ValueError(f'"resize" is the side of the saved square, 16 to {MAX_SIDE} pixels')
            name = str(row.get("name", f"{n:06d}"))
            names = [name.format(i=i) if "{i" in name else name + (f"_{i}" if len(seeds) > 1 else "")
                     for i in range(len(seeds))]
            if any(os.path.isabs(s) or ".." in s.split("/") for s in names):
                raise ValueError(f"the output name {name!r} must stay inside --out")
        except (ValueError, TypeError, KeyError, OSError) as e:
            print(f"{path}:{n}: skipped: {' '.join(str(e).split())}", flush=True)
            bad += 1
            continue
        jobs += [{"line": n, "prompt": row["prompt"], "refs": refs, "images": row.get("images", []), "seed": s,
                  "size": size, "steps": steps, "guidance": guidance, "resize": row.get("resize"),
                  "file": os.path.join(args.out, f"{stem}.png")} for s, stem in zip(seeds, names, strict=True)]
    return jobs, bad


def run_batch(args, model: UniWorld, encoders: Encoders, defaults: dict, device) -> None:
    """This rank's images, grouped by (size, steps, guidance) and run --batch-size at a time; files that exist are
    kept (a rerun resumes); results.jsonl records row -> file, seed, seconds."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # no process group needed
    jobs, bad = read_rows(args.batch, args, defaults)
    mine = [j for j in jobs[rank::world] if not os.path.isfile(j["file"])]
    groups = {}
    for j in mine:
        groups.setdefault((j["size"], j["steps"], j["guidance"]), []).append(j)
    done = len(jobs[rank::world]) - len(mine)
    bar = tqdm(total=len(mine) + done, initial=done, desc=f"rank {rank}", unit="img", smoothing=0, disable=rank != 0)
    for (size, steps, guidance), group in groups.items():
        for chunk in (group[i : i + args.batch_size] for i in range(0, len(group), args.batch_size)):
            t0 = time.perf_counter()
            images = generate(model, encoders, [j["prompt"] for j in chunk], [j["refs"] for j in chunk], *size,
                              [j["seed"] for j in chunk], steps=steps, guidance=guidance, cfg=args.cfg,
                              negative=args.negative, device=device, offload=args.offload, progress=False)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for j, image in zip(chunk, images, strict=True):
                os.makedirs(os.path.dirname(j["file"]), exist_ok=True)
                save_image(image.resize((j["resize"],) * 2, Image.LANCZOS) if j["resize"] else image, j["file"])
                record = {k: j[k] for k in ("line", "prompt", "images", "seed", "steps", "guidance")}  # row -> file
                with open(os.path.join(args.out, "results.jsonl"), "a") as f:  # one write per line: ranks interleave
                    f.write(json.dumps({**record, "file": os.path.relpath(j["file"], args.out), "height": size[0],
                                        "width": size[1], "seconds": round(seconds, 3)}) + "\n")
            bar.update(len(chunk))
    bar.close()
    print(f"rank {rank}: {len(mine)} images written, {done} there already, {bad} bad rows skipped (of "
          f"{len({j['line'] for j in jobs}) + bad} rows in {args.batch})")


# ----------------------------------------------------------------------------------------------------------------
# Command line: what argparse cannot check (images, sizes, numbers) is checked before any model loads


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one-line errors: argparse prints its usage block first, which reads worse in a log
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


parser = Parser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
mode = parser.add_mutually_exclusive_group()
mode.add_argument("--edit", action="store_true", help="edit (or perceive) the --image reference(s) per --prompt")
mode.add_argument("--t2i", action="store_true", help="generate from --prompt alone")
mode.add_argument("--ask", metavar="QUESTION", help="understanding: print the VLM's answer about the --image(s)")
mode.add_argument("--batch", metavar="FILE.jsonl", help="generate every row of a JSONL file into the folder --out")
parser.add_argument("--prompt", help="the instruction (edit, perception) or the description (t2i)")
parser.add_argument("--image", action="append", default=[], help="a reference image; repeat for several")
parser.add_argument("--out", help="output path (out.png; out_0.png, ... for several images); with --batch a folder")
parser.add_argument("--height", type=int, help="output height (multiple of 16); needs --width")
parser.add_argument("--width", type=int, help="output width (multiple of 16); needs --height")
parser.add_argument("--area", type=int, help="pixel anchor of the any_11ratio size (official 1048576 = 1024²)")
parser.add_argument("--steps", type=int, help="Euler steps (official 28)")
parser.add_argument("--guidance", type=float, help="FLUX.1-dev's distilled guidance (official 3.5)")
parser.add_argument("--cfg", type=float, default=1.0, help="true CFG scale with --negative (1 = off, as official)")
parser.add_argument("--negative", default="", help="the negative instruction of --cfg")
parser.add_argument("--seed", type=int, default=42, help="image i uses seed + i (official cli: 42)")
parser.add_argument("--num-images", type=int, default=1)
parser.add_argument("--batch-size", type=int, default=4, help="--batch: images generated together")
parser.add_argument("--no-joint-t5", dest="joint_t5", action="store_false", default=None,
                    help="pooled CLIP(\"\") and no T5, as in training (default: the official joint T5 if T5 is there)")
parser.add_argument("--weights", help=f"release folder or hub id ({RELEASE_ID}); default: the bundled model")
parser.add_argument("--flux", help=f"FLUX.1-dev folder or hub id for vae/, CLIP and T5 (default {FLUX_ID})")
parser.add_argument("--siglip", help=f"SigLIP folder or hub id (default {SIGLIP_ID})")
parser.add_argument("--vlm-pixels", type=int, help="Qwen pixels per reference image (official 448*448)")
parser.add_argument("--max-new-tokens", type=int, default=128, help="length of an --ask answer")
parser.add_argument("--device", help="cuda if available, else cpu")
parser.add_argument("--offload", action="store_true", help="keep models on the CPU, each on the GPU while it runs")


def read_image(path: str) -> Image.Image:
    """A reference image as RGB; a missing, unreadable or non-image file, or one Qwen refuses, is an error naming it."""
    from encoders import qwen_input_size  # transformers: imported only once the arguments are checked

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
        qwen_input_size(*image.size, training=False)  # what the VLM cannot take (aspect ratio), said before loading
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # a bad PNG chunk: SyntaxError
        raise ValueError(f"cannot use the image {path!r}: {e}") from e
    return image


def check_size(height: int, width: int) -> None:
    """FLUX's latents are 1/8 of the pixels and are packed in 2x2 patches: sizes are positive multiples of 16."""
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or height % 16 or width % 16:
        raise ValueError(f"the sides must be multiples of 16 from 16 to {MAX_SIDE}, got {height}x{width} (h x w)")


def output_size(height, width, area, refs: list[Image.Image], default_area: int) -> tuple[int, int]:
    """height x width, else the references' mean size (official) as any_11ratio at `area` pixels, else 1:1 (t2i)."""
    from data import dynamic_resize  # the official size policy lives with the data

    if height is not None or width is not None:
        if height is None or width is None or area is not None:
            raise ValueError("give --height and --width together, without --area (or neither, to use --area)")
        size = height, width
    else:
        area = default_area if area is None else area
        if not 16 * 16 <= area <= MAX_SIDE**2:
            raise ValueError(f"--area must be a number of pixels from 256 to {MAX_SIDE**2}, got {area}")
        h, w = (sum(r.height for r in refs) / len(refs), sum(r.width for r in refs) / len(refs)) if refs else (1, 1)
        size = dynamic_resize(h, w, area)
    check_size(*size)
    return size


def check_numbers(steps, num_images, seed, guidance, cfg) -> None:
    """Range checks before anything is allocated."""
    if not (1 <= steps <= MAX_STEPS and 1 <= num_images <= MAX_IMAGES):
        raise ValueError(f"steps must be 1 to {MAX_STEPS} and images 1 to {MAX_IMAGES}, got {steps} and {num_images}")
    if not 0 <= seed < 2**63 - MAX_IMAGES:
        raise ValueError(f"seeds are integers from 0 to 2**63, got {seed}")
    if not all(math.isfinite(v) and 0 <= v <= 100 for v in (guidance, cfg)):
        raise ValueError(f"guidance and cfg must be finite numbers from 0 to 100, got {guidance} and {cfg}")


def check_args(args, defaults: dict) -> None:
    """Fill the weights' defaults (and examples), then check what argparse cannot express."""
    example = defaults["examples"].get("edit" if args.edit else "t2i" if args.t2i else "")
    if example and not args.image:  # `python sample.py --edit`: the weights' own example (image, and prompt)
        args.prompt = example["prompt"] if args.prompt is None else args.prompt
        args.image = [os.path.join(args.weights, p) for p in example["images"]]
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.guidance = defaults["guidance"] if args.guidance is None else args.guidance
    note = defaults["notes"].get("ask" if args.ask is not None else "batch" if args.batch else "generate")
    if note:
        raise ValueError(note)
    if args.batch:
        if args.out is None or os.path.isfile(args.out) or args.prompt or args.image:
            raise ValueError("--batch FILE writes into the folder --out DIR; prompts and images come from the file")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        return check_numbers(args.steps, 1, args.seed, args.guidance, args.cfg)
    if args.ask is not None and args.prompt is not None:
        raise ValueError("--ask takes its question as its value; drop --prompt")
    if args.ask is None and not args.prompt:
        raise ValueError("--edit and --t2i need --prompt (a prompt with no mode is routed)")
    if args.edit and not args.image:
        raise ValueError("--edit needs at least one --image")
    if args.t2i and args.image:
        raise ValueError("--t2i takes no --image; use --edit to condition on images")
    if "<image>" in (args.prompt or args.ask):
        raise ValueError("remove <image> from the text: at inference the images follow the instruction")
    check_numbers(args.steps, args.num_images, args.seed, args.guidance, args.cfg)
    args.out = args.out or "out.png"
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions() or os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r}: give an image file name such as out.png")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {args.out!r}: the folder {folder} does not exist or is not writable")


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    try:  # user errors (arguments, images, sizes, weights) end here as one line and exit code 2
        if (args.flux or args.siglip) and not args.weights:
            raise ValueError("--flux and --siglip need --weights (the UniWorld-V1 release) too")
        args.weights = locate(args.weights or BUNDLED, "--weights")  # before loading anything: fails at once
        defaults = defaults_of(args.weights)
        check_args(args, defaults)
        refs = [read_image(p) for p in args.image]
        if args.ask is None and not args.batch:  # also for a routed prompt: it may generate
            height, width = output_size(args.height, args.width, args.area, refs, defaults["area"])
        device, dtype = pick_device(args)
        model, encoders, head = load(args, args.weights, defaults, device, dtype)
        if not (args.edit or args.t2i or args.ask is not None or args.batch):  # a prompt and no mode: route it
            from model import wants_image

            image = head is None or wants_image(head, encoders.vlm, args.prompt, refs)
            print(f"task head: {'generate an image' if image else 'answer in text'}" if head is not None else
                  f"no task head in {args.weights}: generating an image (--ask for a text answer)")
            args.ask, args.prompt = (None, args.prompt) if image else (args.prompt, None)
    except (OSError, ValueError) as e:
        parser.error(str(e))

    if args.batch:
        run_batch(args, model, encoders, defaults, device)
    elif args.ask is not None:
        with on(device, encoders.vlm, offload=args.offload):
            print(encoders.vlm.answer(args.ask, refs, max_new_tokens=args.max_new_tokens))
    else:
        n, seeds = args.num_images, [args.seed + i for i in range(args.num_images)]
        print(f"{'edit' if refs else 't2i'}: {height}x{width} (h x w), {args.steps} steps, guidance {args.guidance}, "
              f"seeds {seeds}, joint T5 {encoders.t5 is not None}, {dtype} on {device}")
        images = generate(model, encoders, [args.prompt] * n, [refs] * n, height, width, seeds, steps=args.steps,
                          guidance=args.guidance, cfg=args.cfg, negative=args.negative, device=device,
                          offload=args.offload)
        stem, ext = os.path.splitext(args.out)
        for i, image in enumerate(images):
            path = args.out if n == 1 else f"{stem}_{i}{ext}"
            save_image(image, path)
            print(f"saved {path}")
    peak = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}" if device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS")  # ru_maxrss: KiB (Linux)
    print(f"peak memory: {peak}")  # what --offload is for


if __name__ == "__main__":
    main()
