"""Sample from UniWorld-V1 (Lin et al. 2025): edit, text to image, perception, several references, understanding.

Generation is FLUX.1-dev's sampler (BFL sampling.py): start from Gaussian latents at sigma = 1 and take Euler steps
of the rectified-flow ODE to sigma = 0 over a schedule shifted toward noise for large images. The condition is
UniWorld's text stream (model.py: frozen VLM + SigLIP tokens through the connectors, + T5 of the prompt), built as the
official inference builds it (univa/serve/cli.py, app.py: 28 steps, guidance 3.5, joint T5, seed 42).
The examples run the built-in toy model; add the weight flags of the last example for the real UniWorld-V1.

Edit: the output follows the reference's aspect ratio (the closest of the official 11 ratios) at about --area pixels:
    python sample.py --edit --image cat.png --prompt "Put a red hat on the cat." --out hat.png
Text to image (--height/--width, or a square of --area pixels; 1024x1024 by default):
    python sample.py --t2i --prompt "A lighthouse on a cliff at dawn, oil painting." --num-images 4 --seed 7
Perception is an edit whose instruction names the task (phrasings of the official training data):
    python sample.py --edit --image street.png --prompt "Generate a Canny edge map for this image."
    python sample.py --edit --image street.png --prompt "Estimate the depth map of this image."
    python sample.py --edit --image street.png --prompt "Segment the bus from the background."
    python sample.py --edit --image street.png --prompt "Please detect the bus accurately."
Several references (repeat --image; the output size averages theirs):
    python sample.py --edit --image person.png --image shirt.png --prompt "Dress the person in this shirt."
Understanding: the frozen Qwen2.5-VL answers in text (with or without images):
    python sample.py --ask "What is unusual about this picture?" --image cat.png
Options: --steps 28, --guidance 3.5 (FLUX's guidance embedding), --cfg 4 --negative "blurry" (true classifier-free
guidance, beyond the official), --no-joint-t5 (pooled = CLIP("") and no T5, as in training), --offload (each model on
the GPU only while it runs), --device, --dtype (bf16 on CUDA, fp32 on the CPU).

Weights: local folders never touch the network; hub ids download through huggingface_hub (FLUX.1-dev is gated:
accept its licence on huggingface.co, then `hf auth login`). --flux needs vae/, text_encoder/, tokenizer/ and, for the
joint T5, text_encoder_2/ and tokenizer_2/. With --weights alone, --flux and --siglip default to these hub ids:
    python sample.py --weights LanguageBind/UniWorld-V1 --flux black-forest-labs/FLUX.1-dev \\
        --siglip google/siglip2-so400m-patch16-512 --edit --image cat.png --prompt "Make it snow."
With no weight arguments it runs the built-in toy model of assets/toy/ (toy.py: 32x32 scenes of flat shapes):
    python sample.py --edit                                         # edits its bundled example
    python sample.py --edit --image my32.png --prompt "segment the red circle at the top left"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
from contextlib import contextmanager
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
TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")  # release layout + vae/ + siglip/
RATIOS = [(16, 9), (9, 16), (7, 5), (5, 7), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (1, 1)]  # (w, h)

# ----------------------------------------------------------------------------------------------------------------
# The sampler (also train.py's validation)


def get_schedule(steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """steps + 1 noise levels from 1 to 0 (BFL `get_schedule`): linspace shifted by mu(image tokens), 256 -> 0.5,
    4096 -> 1.15; schnell (no guidance embedding) is unshifted."""
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (flux.time_shift(flux.resolution_mu(image_seq_len), sigmas) if shift else sigmas).tolist()


def denoise(model: UniWorld, x: Tensor, sigmas: list[float], txt: Tensor, y: Tensor, guidance: float,
            negative: tuple[Tensor, Tensor] | None = None, cfg: float = 1.0, progress: bool = True) -> Tensor:
    """Euler steps x <- x + (sigma_next - sigma) * v from noise to data; the state x (B, C, h, w) stays fp32.

    With `negative` = (txt, y) of a negative instruction, v = v_neg + cfg * (v - v_neg) (true CFG, off officially)."""
    dtype = next(model.parameters()).dtype
    for sigma, sigma_next in tqdm(list(zip(sigmas[:-1], sigmas[1:], strict=True)), desc="denoising",
                                  disable=not progress):
        s = torch.full((len(x),), sigma, device=x.device)
        v = model.velocity(x.to(dtype), s, txt, y, guidance).float()
        if negative is not None:  # a separate pass: the text streams differ in length and there is no attention mask
            v_neg = model.velocity(x.to(dtype), s, *negative, guidance).float()
            v = v_neg + cfg * (v - v_neg)
        x = x + (sigma_next - sigma) * v
    return x


@torch.no_grad()
def generate(model: UniWorld, encoders: Encoders, instructions: list[str], images: list[list[Image.Image]],
             height: int, width: int, seeds: list[int], steps: int = 28, guidance: float = 3.5, cfg: float = 1.0,
             negative: str = "", device=None, offload: bool = False, progress: bool = True) -> list[Image.Image]:
    """One image per (instruction, reference images, seed). With a T5 in `encoders` this is the official inference
    ("joint T5": T5 of the instruction appended, pooled = CLIP(instruction)); without, pooled = CLIP("") as in training.
    `offload`: every model waits on the CPU and visits `device` only while it runs."""
    check_size(height, width)
    if not len(instructions) == len(images) == len(seeds):
        raise ValueError(f"give one instruction, image list and seed per sample: got {len(instructions)}, "
                         f"{len(images)}, {len(seeds)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype, ae = next(model.parameters()).dtype, encoders.ae
    if ae is None:
        raise ValueError("generation needs the FLUX autoencoder: encoders.ae is None")
    down = ae.factor  # pixels per latent pixel: 8 for FLUX's VAE
    h, w, channels = height // down, width // down, model.denoiser.config.in_channels // 4  # latent grid, 16 channels

    def condition(texts: list[str]) -> tuple[list[dict], Tensor | None, Tensor]:
        """Per-sample VLM/SigLIP features, T5 tokens (or None) and the pooled vector of the instructions."""
        with on(device, encoders.vlm, encoders.siglip, offload=offload):
            feats = encoders.features(texts, images, train=False)
        feats = [{**f, "vlm": f["vlm"].to(device, dtype),
                  "siglip": None if f["siglip"] is None else f["siglip"].to(device, dtype)} for f in feats]
        with on(device, encoders.t5, encoders.clip, offload=offload):
            t5 = None if encoders.t5 is None else encoders.t5(texts).to(device, dtype)
            pooled = encoders.pooled(texts if t5 is not None else [""] * len(texts), model.denoiser.config.vec_in_dim)
        return feats, t5, pooled.to(device, dtype)  # pooled (B, vec)

    feats, t5, y = condition(instructions)
    neg = condition([negative] * len(instructions)) if cfg != 1 else None
    # BFL: the noise of each image from a CPU generator seeded with its seed, so a seed means the same image anywhere
    x = torch.cat([torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(s)) for s in seeds])
    sigmas = get_schedule(steps, (h // 2) * (w // 2), shift=model.denoiser.config.guidance_embed)
    with on(device, model, offload=offload):
        txt = model.text_stream(feats, t5)  # (B, L, ctx)
        uncond = None if neg is None else (model.text_stream(neg[0], neg[1]), neg[2])
        x = denoise(model, x.to(device), sigmas, txt, y, guidance, uncond, cfg, progress)
    with on(device, ae, offload=offload):
        ae_dtype = next(ae.parameters(), x).dtype  # the toy world's pixel AE has no parameters
        return [to_pil(ae.decode(x[i : i + 1].to(ae_dtype))) for i in range(len(x))]


@contextmanager
def on(device, *modules, offload: bool = False):
    """Model-level offload: with `offload`, move the modules to `device` for the block and back to the CPU after."""
    modules = [m for m in modules if isinstance(m, torch.nn.Module)] if offload else []  # not None, not a stand-in
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


# ----------------------------------------------------------------------------------------------------------------
# Output size


def dynamic_resize(height: float, width: float, area: int = 1024 * 1024) -> tuple[int, int]:
    """Official anyres 'any_11ratio' (univa/utils/anyres_util.py): the closest of 11 ratios w:h, in blocks of 32 px,
    scaled by round(sqrt(area / block area)). At 1024²: 4:3 -> 864x1152, 3:2 -> 832x1248, 16:9 -> 864x1536."""
    rw, rh = min(RATIOS, key=lambda r: abs(r[0] / r[1] - width / height))
    scale = max(1, round(math.sqrt(area / (32 * rh * 32 * rw))))  # max: the official gives 0 below half a block
    return 32 * rh * scale, 32 * rw * scale


def check_size(height: int, width: int) -> None:
    """FLUX's latents are 1/8 of the pixels and are packed in 2x2 patches: sizes are positive multiples of 16."""
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise ValueError(f"height and width must be positive multiples of 16, got {height}x{width} (h x w)")


def output_size(args, refs: list[Image.Image]) -> tuple[int, int]:
    """--height/--width, else the references' mean size (any_11ratio at --area), else a square of --area (t2i)."""
    if args.height is not None or args.width is not None:
        if args.height is None or args.width is None or args.area is not None:
            raise ValueError("give --height and --width together, without --area (or neither, to use --area)")
        size = args.height, args.width
    else:
        area = 1024 * 1024 if args.area is None else args.area
        if area < 1:
            raise ValueError(f"--area must be a positive number of pixels, got {area}")
        mean = lambda sizes: sum(sizes) / len(sizes)  # official: two references' sizes are averaged
        h, w = (mean([r.height for r in refs]), mean([r.width for r in refs])) if refs else (1, 1)  # t2i: 1:1
        size = dynamic_resize(h, w, area)
    check_size(*size)
    return size


# ----------------------------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message):  # argparse prints its usage block first; a single line reads better in a log
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


parser = Parser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
mode = parser.add_mutually_exclusive_group(required=True)
mode.add_argument("--edit", action="store_true", help="edit (or perceive) the --image reference(s) per --prompt")
mode.add_argument("--t2i", action="store_true", help="generate from --prompt alone")
mode.add_argument("--ask", metavar="QUESTION", help="understanding: print the VLM's answer about the --image(s)")
parser.add_argument("--prompt", help="the instruction (edit, perception) or the description (t2i)")
parser.add_argument("--image", action="append", default=[], help="a reference image; repeat for several")
parser.add_argument("--out", default="out.png", help="output path; out_0.png, out_1.png, ... for several images")
parser.add_argument("--height", type=int, help="output height (multiple of 16); needs --width")
parser.add_argument("--width", type=int, help="output width (multiple of 16); needs --height")
parser.add_argument("--area", type=int, help="pixel anchor of the any_11ratio size (default 1048576 = 1024²)")
parser.add_argument("--steps", type=int, help="Euler steps (official 28; the toy model: 20)")
parser.add_argument("--guidance", type=float, help="FLUX.1-dev's distilled guidance (official 3.5; the toy: 1)")
parser.add_argument("--cfg", type=float, default=1.0, help="true CFG scale with --negative (1 = off, as official)")
parser.add_argument("--negative", default="", help="the negative instruction of --cfg")
parser.add_argument("--seed", type=int, default=42, help="image i uses seed + i (official cli: 42)")
parser.add_argument("--num-images", type=int, default=1)
parser.add_argument("--joint-t5", action=argparse.BooleanOptionalAction, default=None,
                    help="append T5(prompt) and pool CLIP(prompt): official inference; default on if T5 is there")
parser.add_argument("--weights", help=f"UniWorld-V1 release folder or hub id ({RELEASE_ID})")
parser.add_argument("--flux", help=f"FLUX.1-dev folder or hub id for vae/, CLIP and T5 (default {FLUX_ID})")
parser.add_argument("--siglip", help=f"SigLIP folder or hub id (default {SIGLIP_ID})")
parser.add_argument("--vlm-pixels", type=int, help="Qwen pixels per reference image (official 448*448)")
parser.add_argument("--max-new-tokens", type=int, default=128, help="length of an --ask answer")
parser.add_argument("--device", help="cuda if available, else cpu")
parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="bf16 on CUDA, fp32 on the CPU")
parser.add_argument("--offload", action="store_true", help="keep models on the CPU, each on the GPU while it runs")


def read_image(path: str) -> Image.Image:
    """A reference image as RGB; a missing, unreadable or non-image file is an error that names it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # PIL: a corrupt PNG chunk is a SyntaxError
        raise ValueError(f"cannot read the image {path!r}: {e}") from e


def toy_defaults(args) -> None:
    """No weights given: the toy model of assets/toy/, its sampling settings (32x32, 20 steps, guidance 1) and its
    bundled example: `python sample.py --edit` edits assets/toy/examples/edit.png as its toy.json says."""
    toy_json = os.path.join(TOY, "toy.json")
    defaults = {"steps": 28, "guidance": 3.5}  # the official inference
    if args.weights is None and not (args.flux or args.siglip) and os.path.isfile(toy_json):
        with open(toy_json) as f:
            meta = json.load(f)
        example = meta["examples"]["t2i" if args.t2i else "edit"]
        if args.prompt is None and not args.image and args.ask is None:
            args.prompt = example["prompt"]
        if args.edit and not args.image:
            args.image = [os.path.join(TOY, p) for p in example["images"]]
        if args.height is None and args.width is None and args.area is None:
            args.height = args.width = meta["size"]
        defaults = {"steps": meta["steps"], "guidance": meta["guidance"]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def check_args(args) -> None:
    """The combinations argparse cannot express."""
    if args.ask is not None and args.prompt is not None:
        raise ValueError("--ask takes its question as its value; drop --prompt")
    if args.ask is None and not args.prompt:
        raise ValueError("--edit and --t2i need --prompt")
    if args.edit and not args.image:
        raise ValueError("--edit needs at least one --image")
    if args.t2i and args.image:
        raise ValueError("--t2i takes no --image; use --edit to condition on images")
    if "<image>" in (args.prompt or args.ask):
        raise ValueError("remove <image> from the text: at inference the images follow the instruction")
    if args.steps < 1 or args.num_images < 1:
        raise ValueError(f"--steps and --num-images must be at least 1, got {args.steps} and {args.num_images}")
    if os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise ValueError(f"--out {args.out!r}: use an image extension such as .png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ValueError(f"--out {args.out!r}: the folder does not exist")


def locate(path_or_id: str, what: str, patterns: list[str] | None = None) -> str:
    """A local folder as is (no network), or a hub id, downloaded (or found in the cache) by huggingface_hub."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id) or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{what}: no folder {path_or_id!r}; pass a local folder or a hub id (org/name)")
    try:
        return snapshot_download(path_or_id, allow_patterns=patterns)
    except (OSError, ValueError) as e:  # gated, offline, missing: huggingface_hub's errors are OSError / ValueError
        raise FileNotFoundError(
            f"{what}: cannot download {path_or_id} ({type(e).__name__}: {' '.join(str(e).split())[:160]}...). For a "
            f"gated repo (FLUX.1-dev) accept its licence on huggingface.co and run `hf auth login` (or "
            f"`huggingface-cli login`); offline, pass a local folder") from e


def weight_folders(args) -> tuple[str, str | None, str | None]:
    """The (release, FLUX, SigLIP) folders, local or downloaded; --ask needs only the release (its Qwen). With no
    weight arguments, the toy model of assets/toy/ (a release folder with vae/, text_encoder/, ... and siglip/)."""
    if args.weights is None:
        if args.flux or args.siglip:
            raise ValueError("--flux and --siglip need --weights (the UniWorld-V1 release) too")
        if not os.path.isdir(TOY):
            raise FileNotFoundError(f"no weights: pass --weights {RELEASE_ID} (or its folder), --flux and --siglip; "
                                    f"the built-in toy model (assets/toy/) is not there yet")
        args.weights, args.flux, args.siglip = TOY, TOY, os.path.join(TOY, "siglip")
    weights = locate(args.weights, "--weights")
    if args.ask is not None or os.path.isfile(os.path.join(weights, "toy.json")):  # the toy holds all its parts
        return weights, None, None
    folder = locate(args.flux or FLUX_ID, "--flux", FLUX_PARTS[:3] if args.joint_t5 is False else FLUX_PARTS)
    if args.joint_t5 and not os.path.isdir(os.path.join(folder, "text_encoder_2")):
        raise FileNotFoundError(f"--joint-t5 needs T5: no text_encoder_2/ in {folder}")
    return weights, folder, locate(args.siglip or SIGLIP_ID, "--siglip")


def load(args, folders: tuple[str, str | None, str | None], device, dtype) -> tuple[UniWorld | None, Encoders]:
    """UniWorld + Qwen from the release, SigLIP, and VAE + CLIP (+ T5 for the joint T5) from the FLUX folder."""
    from encoders import VLM_PIXELS, load_clip, load_siglip, load_t5, load_vlm  # here: transformers is slow to import
    from model import Encoders, load_uniworld

    (weights, folder, siglip), where = folders, "cpu" if args.offload else device
    if os.path.isfile(os.path.join(weights, "toy.json")):  # the toy world (toy.py): pixel space, its own config
        from toy import load_toy

        model, encoders, _ = load_toy(weights, where, dtype)
        return (model if args.ask is None else None), encoders
    pixels = args.vlm_pixels or VLM_PIXELS
    if args.ask is not None:
        return None, Encoders(vlm=load_vlm(weights, pixels=pixels, dtype=dtype).to(where))
    has = lambda part: os.path.isdir(os.path.join(folder, part))
    model, vlm = load_uniworld(weights, dtype=dtype, device=where, vlm_pixels=pixels)
    encoders = Encoders(
        vlm=vlm.to(where), siglip=load_siglip(siglip, dtype=dtype).to(where),
        ae=flux.load_autoencoder(folder, dtype=dtype, device=where),
        clip=load_clip(folder, dtype=dtype).to(where) if has("text_encoder") else None,  # None: zeros, with a warning
        t5=load_t5(folder, max_length=256, dtype=dtype).to(where)
        if has("text_encoder_2") and args.joint_t5 is not False else None)
    return model, encoders


def pick_device(args) -> tuple[torch.device, torch.dtype]:
    """--device (cuda if there is one) and --dtype (bf16 on CUDA, fp32 on the CPU)."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but PyTorch sees no CUDA GPU")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return device, dtypes[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]


def peak_memory(device: torch.device) -> str:
    """What --offload is for: peak GPU memory on CUDA, peak resident memory of the process on the CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"  # ru_maxrss is in KiB (Linux)


def main(argv: list[str] | None = None) -> None:
    args = parser.parse_args(argv)
    try:  # user errors (arguments, images, sizes, weights) end here as one line and exit code 2
        toy_defaults(args)
        check_args(args)
        refs = [read_image(p) for p in args.image]
        height, width = output_size(args, refs) if args.ask is None else (0, 0)
        device, dtype = pick_device(args)
        folders = weight_folders(args)  # before loading anything: a wrong path fails at once
        model, encoders = load(args, folders, device, dtype)
    except (OSError, ValueError) as e:
        parser.error(str(e))

    if args.ask is not None:
        with on(device, encoders.vlm, offload=args.offload):
            print(encoders.vlm.answer(args.ask, refs, max_new_tokens=args.max_new_tokens))
    else:
        n, seeds = args.num_images, [args.seed + i for i in range(args.num_images)]
        print(f"{'edit' if args.edit else 't2i'}: {height}x{width} (h x w), {args.steps} steps, guidance "
              f"{args.guidance}, seeds {seeds}, joint T5 {encoders.t5 is not None}, {dtype} on {device}")
        images = generate(model, encoders, [args.prompt] * n, [refs] * n, height, width, seeds, steps=args.steps,
                          guidance=args.guidance, cfg=args.cfg, negative=args.negative, device=device,
                          offload=args.offload)
        stem, ext = os.path.splitext(args.out)
        for i, image in enumerate(images):
            path = args.out if n == 1 else f"{stem}_{i}{ext}"
            image.save(path)
            print(f"saved {path}")
    print(f"peak memory: {peak_memory(device)}")


if __name__ == "__main__":
    main()
