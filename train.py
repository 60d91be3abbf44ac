"""Train UniWorld-V1's denoise tower (paper §3.2, official train_denoiser.py): stage 1 or 2, FSDP2, one process per GPU.

Stage 1 trains the denoise_projector (Qwen2.5-VL -> FLUX text stream); stage 2 starts from a stage-1 run and also
trains the siglip_projector (from FLUX Redux) and FLUX's image-branch attention and modulation. The VLM, SigLIP and
the VAE stay frozen; --cache computes their outputs once and trains from disk.

1 GPU (or the CPU; no torchrun needed):
    python train.py --stage 1 --data data.txt --out runs/s1 --flux FLUX.1-dev --vlm Qwen/Qwen2.5-VL-7B-Instruct
1 node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train.py --stage 1 --data data.txt --out runs/s1 --flux FLUX.1-dev
N nodes (the same command on every node; --out on a disk that all nodes share):
    torchrun --nnodes=N --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HEAD_HOST:29500 --rdzv_id=s1 \\
        train.py --stage 1 --data data.txt --out runs/s1 --flux FLUX.1-dev
Stage 2 from the stage-1 run (its EMA projector) and Redux for the SigLIP projector:
    torchrun --standalone --nproc_per_node=8 train.py --stage 2 --init runs/s1 --redux flux-redux-siglipv2-512.bin \\
        --data data.txt --out runs/s2 --flux FLUX.1-dev --siglip google/siglip2-so400m-patch16-512
Resume: the same command plus --resume. Every TrainConfig field is a flag (--lr 1e-4, --no-init_ema); --model tiny
trains random tiny models (tests). Under --out: train_config.json, metrics.jsonl, checkpoints/step-N/, val/step-N.png;
at the end raw/ and ema/ in the release layout (sample.py --weights). Other programs add presets: main(argv, presets).
"""

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from PIL import Image, ImageOps
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import flux
import model as M
from data import Batches, EditData, TooMuchBadData, build_cache, check_bad
from ema import ShardedEMA
from encoders import QWEN_ID, SIGLIP_ID, load_clip, load_siglip, load_vlm, tiny_siglip, tiny_vlm
from sample import generate, to_pil

log = logging.getLogger("train")


@dataclass
class TrainConfig:
    stage: int = 1  # 1: denoise_projector; 2: + siglip_projector + FLUX image branch; 0: a preset's own pretraining
    data: str = ""  # data.txt: one `image_root,json_path,need_weight` line per dataset (data.py)
    out: str = ""  # the run folder
    overwrite: bool = False  # start afresh in an --out that holds a run (its checkpoints and metrics are deleted)
    # models
    model: str = "flux"  # "flux": the weights below; "tiny": random, seeded (tests); or a preset of train.main's caller
    flux: str = ""  # FLUX.1-dev folder: transformer/ + vae/ (+ text_encoder/ for the pooled CLIP(""))
    vlm: str = QWEN_ID
    siglip: str = SIGLIP_ID  # stage 2 only: stage 1 has no SigLIP tokens (official)
    redux: str = ""  # stage 2: flux-redux-siglipv2-512.bin or a Redux .safetensors -> siglip_projector
    init: str = ""  # an earlier run of this script: start from what it trained (stage 2 <- stage 1)
    init_ema: bool = True  # take --init's EMA weights (the official recommendation)
    # data
    resolution: int = 512  # the square side, or the area anchor with --buckets (official 512)
    buckets: bool = False  # any_11ratio aspect buckets; official default squashes to resolution²
    batch_size: int = 1  # per rank (official 1 at 512²)
    workers: int = 4  # data loader processes per rank
    weighting: str = "log"  # edit-region loss weighting (masks.py, official "log")
    shift: float = None  # mu of the noise-level shift (None: FLUX's rule from the image token count, official)
    max_bad: float = 0.05  # stop when more of the data than this is bad
    cache: str = ""  # folder for the frozen encoders' outputs: computed once, then trained from
    # optimisation (None: the stage's official value, STAGE_DEFAULTS)
    steps: int = 20_000  # the released model: 20k stage-2 steps
    lr: float = None
    warmup: int = None  # linear warm-up steps
    decay: int = 0  # then a linear decay to zero over the last this many steps (0: none, official)
    grad_ckpt: bool = None  # activation checkpointing of every FLUX block
    compile: bool = False  # torch.compile the FLUX denoiser (official: compile_flux false)
    precision: str = "auto"  # "bf16" compute over fp32 weights, or "fp32"; auto: bf16 on CUDA, fp32 on the CPU
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    qk_norm_lr: float = 1.0  # lr multiplier of FLUX's q/k RMSNorm scales (1 = official)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 203  # official
    # observability and checkpoints
    log_every: int = 10
    val_every: int = 1000  # official: validation every 1000 steps, 28 steps, guidance 4.0
    val_samples: int = 4  # the first good samples of the data are the fixed validation prompts
    val_steps: int = 28
    val_guidance: float = 4.0
    ckpt_every: int = 2000  # official
    keep: int = 3  # checkpoints kept
    resume: bool = False  # continue from the newest intact checkpoint under --out


STAGE_DEFAULTS = {  # docs/official.md §4.4-4.7: AdamW (0.9, 0.99), wd 0; stage 2 lr 5e-6 is the released run's
    0: dict(lr=1e-4, warmup=0, grad_ckpt=False),  # a preset's pretraining of the whole denoiser from scratch
    1: dict(lr=1e-3, warmup=0, grad_ckpt=False),
    2: dict(lr=5e-6, warmup=5000, grad_ckpt=True),
}


def parse_args(argv=None, models=None) -> TrainConfig:
    """TrainConfig from --key value flags (booleans: --flag / --no-flag); None fields get the stage's defaults."""
    choices = {"stage": list(STAGE_DEFAULTS), "model": sorted(models or MODELS), "precision": ["auto", "bf16", "fp32"]}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default, choices=choices.get(f.name))
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    for key, value in STAGE_DEFAULTS[cfg.stage].items():
        setattr(cfg, key, value if getattr(cfg, key) is None else getattr(cfg, key))
    if not cfg.data or not cfg.out:
        p.error("--data data.txt and --out RUN_FOLDER are required")
    for name in ("steps", "batch_size", "log_every", "val_every", "ckpt_every", "keep"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.max_bad <= 1 or not cfg.lr > 0:
        p.error(f"--max_bad must be a fraction from 0 to 1 and --lr positive, got {cfg.max_bad} and {cfg.lr}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Models: built whole on every rank (same seed, so identical), then sharded


def flux_models(cfg: TrainConfig, device) -> tuple[M.UniWorld, M.Encoders]:
    """FLUX.1-dev (transformer, VAE in fp32 as official, CLIP-L), Qwen2.5-VL and SigLIP from folders or hub ids."""
    if not cfg.flux:
        raise ValueError("--flux: pass the FLUX.1-dev folder (transformer/, vae/, text_encoder/), or --model tiny")
    half = torch.bfloat16 if device.type == "cuda" else torch.float32  # frozen encoders: bf16 on GPUs (official)
    vlm = load_vlm(cfg.vlm, dtype=half)
    siglip = load_siglip(cfg.siglip, dtype=half) if cfg.stage != 1 else None
    has_clip = os.path.isdir(os.path.join(cfg.flux, "text_encoder"))
    encoders = M.Encoders(vlm=vlm, siglip=siglip, ae=flux.load_autoencoder(cfg.flux, dtype=torch.float32),
                          clip=load_clip(cfg.flux, dtype=half) if has_clip else None)  # None: zeros, warned
    torch.manual_seed(cfg.seed)  # the connectors' random init, identical on every rank; fp32 master weights
    model = M.UniWorld(flux.load_flux(cfg.flux, dtype=torch.float32), vlm.model.config.text_config.hidden_size,
                       siglip.model.config.hidden_size if siglip is not None else 1152)
    return model, encoders


def tiny_models(cfg: TrainConfig, device) -> tuple[M.UniWorld, M.Encoders]:
    """Random models with the real interfaces at tiny size, from cfg.seed: no downloads (tests, CI)."""
    torch.manual_seed(cfg.seed)
    encoders = M.Encoders(vlm=tiny_vlm(cfg.seed), siglip=tiny_siglip(cfg.seed) if cfg.stage != 1 else None,
                          ae=flux.AutoEncoder(flux.AE_CONFIGS["tiny"]))
    return M.UniWorld(flux.Flux(flux.FLUX_CONFIGS["tiny"]), vlm_dim=64, siglip_dim=32), encoders


MODELS = {"flux": flux_models, "tiny": tiny_models}  # a preset: (cfg, device) -> (UniWorld, Encoders)


def init_from_run(model: M.UniWorld, run: str, ema: bool = True) -> None:
    """What an earlier run's stage trained, from its release export (paper §3.2: stage 2 starts from stage 1's)."""
    folder, config = os.path.join(run, "ema" if ema else "raw"), os.path.join(run, "train_config.json")
    if not (os.path.isfile(config) and os.path.isdir(folder)):
        raise FileNotFoundError(f"--init {run}: expected a finished train.py run (train_config.json and {folder}/)")
    with open(config) as f:
        stage = json.load(f)["stage"]
    names = [n for n, _ in model.named_parameters() if re.match(M.STAGES[stage], n)]
    st = flux.Checkpoint(folder, prefix="denoise_tower.")
    state = {n: st.read(n) for n in names if not n.startswith("denoiser.")}
    if len(state) < len(names):  # that stage trained FLUX too: its weights are in diffusers layout
        denoiser = flux.load_flux(folder, config=model.denoiser.config).state_dict()
        state.update({n: denoiser[n.removeprefix("denoiser.")] for n in names if n.startswith("denoiser.")})
    model.load_state_dict(state, strict=False)
    log.info("initialised %d tensors from %s (what its stage %d trained)", len(state), folder, stage)


def shard(model: M.UniWorld, cfg: TrainConfig, device) -> None:
    """FSDP2: each FLUX block its own unit (wrapped for activation checkpointing first, stage 2), then the root.
    A world of one in fp32 has nothing to shard or cast: it trains the plain module, without FSDP2's hooks."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    sharded = dist.get_world_size() > 1 or bf16
    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if sharded else None
    # bf16 compute, fp32 weights and gradient reduction. The root casts the batch; the blocks must not cast their
    # inputs, or the fp32 RoPE table would arrive in bf16 (RoPE is computed in fp32, docs/official.md §11.3)
    root_mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if bf16 else MixedPrecisionPolicy()
    block_mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False) if bf16 else root_mp
    for blocks in (model.denoiser.double_blocks, model.denoiser.single_blocks):
        for i, block in enumerate(blocks):
            if cfg.grad_ckpt:
                block = blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            if sharded:
                fully_shard(block, mesh=mesh, mp_policy=block_mp)
    if sharded:
        fully_shard(model, mesh=mesh, mp_policy=root_mp)  # connectors, embedders, last layer
        register_fsdp_forward_method(model, "loss")  # FSDP2 hooks only forward(); UniWorld trains through loss()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint into a temporary folder, checksummed, then one rename


def checkpoints(out: str) -> list[str]:
    """Complete checkpoints, oldest first; .tmp-* folders are torn writes and never count."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("step-")) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


def checksums(folder: str) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint but checksums.json, each rank hashing its share of them."""
    names = sorted(n for n in os.listdir(folder) if n != "checksums.json")
    mine = {}
    for name in names[dist.get_rank() :: dist.get_world_size()]:
        digest = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        mine[name] = digest.hexdigest()
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    return {k: v for share in shares for k, v in share.items()}


def intact(path: str) -> bool:
    """Whether a checkpoint's files are the ones its checksums.json lists, byte for byte (every rank agrees)."""
    try:
        with open(os.path.join(path, "checksums.json")) as f:
            expected = json.load(f)
    except (OSError, ValueError):
        return False
    return checksums(path) == expected


def save_checkpoint(cfg, step, model, opt, ema, batches, noise, counts, trainable) -> None:
    """Trainable tensors, optimizer and EMA shards; per-rank RNG states and sample counts; step and data position.
    A Ctrl-C while it writes takes effect once it is complete (inside dcp.save it would end in a wrapped traceback)."""
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        rank, folder = dist.get_rank(), os.path.join(cfg.out, "checkpoints")
        tmp, final = os.path.join(folder, f".tmp-step-{step:08d}"), os.path.join(folder, f"step-{step:08d}")
        if rank == 0 and os.path.isdir(folder):
            for torn in (n for n in os.listdir(folder) if n.startswith(".tmp-")):  # left by runs killed while writing
                shutil.rmtree(os.path.join(folder, torn))
        dist.barrier()
        msd, osd = get_state_dict(model, opt)  # sharded: each rank writes its own part
        dcp.save({"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd, "ema": ema.state_dict()},
                 checkpoint_id=tmp)  # frozen weights are rebuilt from --flux/--init and never saved
        rng = {"torch": torch.get_rng_state(), "noise": noise.get_state(), "counts": counts}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(tmp, f"rank{rank:05d}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, "data": batches.state_dict(), "world": dist.get_world_size(),
                           "fsdp": isinstance(model, FSDPModule)}, f)
        dist.barrier()
        sums = checksums(tmp)
        if rank == 0:
            with open(os.path.join(tmp, "checksums.json"), "w") as f:  # written last: it vouches for the others
                json.dump(sums, f, indent=1)
            os.replace(tmp, final)  # atomic: the checkpoint exists whole or not at all
            for old in checkpoints(cfg.out)[: -cfg.keep]:
                shutil.rmtree(old)
        dist.barrier()
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def load_checkpoint(path, model, opt, ema, batches, noise, trainable) -> tuple[int, dict]:
    """Restore a checkpoint in place (RNG states too, on the same number of ranks); -> (step, this rank's counts)."""
    with open(os.path.join(path, "state.json")) as f:
        meta = json.load(f)
    if meta["fsdp"] != isinstance(model, FSDPModule):  # the EMA's shards are laid out differently (ema.py)
        raise ValueError(f"{path} was written by {'an FSDP2' if meta['fsdp'] else 'a plain (one process, fp32)'} run; "
                         f"resume it {'under torchrun or in bf16' if meta['fsdp'] else 'with one process in fp32'}")
    msd, osd = get_state_dict(model, opt)  # a fresh optimizer gets zero state here, which dcp.load fills
    state = {"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd, "ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=path)  # reshards if the number of ranks changed
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    ema.load_state_dict(state["ema"])
    batches.load_state_dict(meta["data"])
    log.info("resumed from step %d (%s)", meta["step"], path)
    if meta["world"] != dist.get_world_size():
        log.warning("the checkpoint has %d ranks, this run %d: random streams restart from the seed, and the data "
                    "position counts batches of the old world size", meta["world"], dist.get_world_size())
        return meta["step"], {"skipped": 0, "seen": 0}
    rng = torch.load(os.path.join(path, f"rank{dist.get_rank():05d}.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    noise.set_state(rng["noise"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"], rng["counts"]


def export(cfg, model, ema, encoders) -> None:
    """The trained weights and their EMA in the release layout (model.save_release): --out/raw and --out/ema."""
    raw = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    averaged = ema.full_state_dict(model)  # both gathered one tensor at a time, kept on rank 0 only
    if dist.get_rank() == 0:
        for name, state in (("raw", raw), ("ema", averaged)):
            with torch.device("meta"):
                plain = M.UniWorld(flux.Flux(model.denoiser.config), model.denoise_projector[0].in_features,
                                   model.siglip_projector[0].in_features)
            plain.load_state_dict(state, assign=True)
            M.save_release(plain, os.path.join(cfg.out, name), vlm=encoders.vlm)
        log.info("exported %s/raw and %s/ema", cfg.out, cfg.out)


# ----------------------------------------------------------------------------------------------------------------
# Validation: fixed samples, fixed seeds, EMA weights


def validate(cfg, step, model, ema, encoders, samples) -> None:
    """A PNG grid under --out/val: a row per sample, generated | target | references (sample.generate)."""
    rows = []
    with ema.swap_into(model):
        if isinstance(model, FSDPModule):
            model.unshard()  # generate() calls text_stream/velocity, which FSDP2's forward hooks do not see
        for i, s in enumerate(samples):  # every rank generates all of them: the FLUX blocks all-gather together
            height, width = s["pixels"].shape[1:]
            instruction = s["instruction"].replace("<image>", " ").strip()  # inference prompt: images follow
            image = generate(model, encoders, [instruction], [s["references"]], height, width, seeds=[cfg.seed + i],
                             steps=cfg.val_steps, guidance=cfg.val_guidance, progress=False)[0]
            rows.append([image, to_pil(s["pixels"][None]), *s["references"]])
        if isinstance(model, FSDPModule):
            model.reshard()
    if dist.get_rank() == 0 and rows:
        cell = max(256, *(max(im.size) for row in rows for im in row))
        grid = Image.new("RGB", (cell * max(map(len, rows)), cell * len(rows)), "white")
        for r, row in enumerate(rows):
            for c, im in enumerate(row):
                grid.paste(ImageOps.contain(im, (cell, cell)), (c * cell, r * cell))
        os.makedirs(os.path.join(cfg.out, "val"), exist_ok=True)
        grid.save(os.path.join(cfg.out, "val", f"step-{step:08d}.png"))


# ----------------------------------------------------------------------------------------------------------------
# Training


def setup_distributed() -> torch.device:
    """torchrun's environment, or a world of one for plain `python train.py`; NCCL on GPUs, gloo on the CPU."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Constant after a linear warm-up over cfg.warmup steps (official constant_with_warmup; step counts from 1);
    with cfg.decay, linear towards zero over the last cfg.decay steps (the last step at lr / decay)."""
    warm = min(1.0, step / cfg.warmup) if cfg.warmup else 1.0
    cool = min(1.0, (cfg.steps - step + 1) / cfg.decay) if cfg.decay else 1.0
    return cfg.lr * min(warm, cool)


def prepare_out(cfg: TrainConfig) -> str | None:
    """The run folder: a run already there is continued (--resume) or replaced (--overwrite), never mixed into.
    -> the newest intact checkpoint to resume from (damaged ones set aside and said), None to start at step 0."""
    found = checkpoints(cfg.out)
    if not cfg.resume and not cfg.overwrite and (found or os.path.isfile(os.path.join(cfg.out, "metrics.jsonl"))):
        raise ValueError(f"--out {cfg.out} already holds a run: continue it with --resume, or pass another --out "
                         f"(or --overwrite to delete it)")
    dist.barrier()  # every rank has looked before anything is deleted or written
    if cfg.overwrite and not cfg.resume and dist.get_rank() == 0:  # metrics.jsonl: emptied by trim_metrics
        shutil.rmtree(os.path.join(cfg.out, "checkpoints"), ignore_errors=True)
    os.makedirs(cfg.out, exist_ok=True)
    for path in reversed(found if cfg.resume else []):  # newest first
        if intact(path):
            return path
        log.warning("%s is damaged (its files do not match its checksums.json): kept as damaged-*, trying the one "
                    "before", path)
        dist.barrier()
        if dist.get_rank() == 0:
            os.replace(path, tempfile.mkdtemp(prefix=f"damaged-{os.path.basename(path)}-", dir=os.path.dirname(path)))
    if cfg.resume and found:
        raise ValueError(f"--resume: no intact checkpoint under {cfg.out}/checkpoints; start afresh with --overwrite")
    if cfg.resume:
        log.warning("--resume: no checkpoint under %s, starting from step 0", cfg.out)
    return None


def trim_metrics(out: str, step: int) -> None:
    """Keep metrics.jsonl's history up to the step the run continues from (rank 0); a line torn by a kill goes."""
    path, kept = os.path.join(out, "metrics.jsonl"), []
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                log.warning("metrics.jsonl: dropped a torn line (%r)", line[:60])
    with open(path, "w") as f:
        f.writelines(kept)


def build(cfg: TrainConfig, device, models: dict) -> tuple[M.UniWorld, M.Encoders, set[str]]:
    """The preset's models; --init and --redux weights; the stage's trainable set; FSDP2; encoders on the device."""
    model, encoders = models[cfg.model](cfg, device)
    if cfg.init:
        init_from_run(model, cfg.init, cfg.init_ema)
    elif cfg.stage == 2:
        log.warning("stage 2 without --init: the denoise_projector starts random (official: from stage 1)")
    if cfg.redux:
        M.load_siglip_projector(model, cfg.redux)
    elif cfg.stage == 2 and cfg.model == "flux":
        raise ValueError("stage 2 initialises the siglip_projector from FLUX Redux: pass --redux "
                         "flux-redux-siglipv2-512.bin (UniWorld-V1 README) or a Redux .safetensors")
    trainable = set(M.set_stage(model, cfg.stage))
    shard(model, cfg, device)
    if cfg.compile:  # in place: parameter names stay as they are (checkpoints, EMA, export)
        model.denoiser.compile(dynamic=True)  # dynamic: text streams change length from batch to batch
    for part in (encoders.vlm, encoders.siglip, encoders.ae, encoders.clip):
        if part is not None:
            part.to(device).eval().requires_grad_(False)
    return model, encoders, trainable


def train(cfg: TrainConfig, device, models: dict) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    resume_from = prepare_out(cfg)
    if rank == 0:
        print("TrainConfig\n" + "\n".join(f"  {k} = {v!r}" for k, v in asdict(cfg).items()), flush=True)
        with open(os.path.join(cfg.out, "train_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)

    model, encoders, trainable = build(cfg, device, models)
    data = EditData(cfg.data, cfg.resolution, cfg.buckets, cfg.weighting, encoders.ae.factor, encoders.vlm.pixels)
    check_bad(data.bad_records, len(data.records) + data.bad_records, cfg.max_bad, "records", min_seen=0)
    pooled = encoders.pooled([""], model.denoiser.config.vec_in_dim).to(device)  # training: CLIP(""), official
    if cfg.cache:
        fingerprint = {k: getattr(cfg, k) for k in ("resolution", "buckets", "weighting", "model", "vlm")}
        fingerprint.update(data=os.path.abspath(cfg.data), siglip=cfg.siglip if cfg.stage != 1 else None,
                           seed=cfg.seed if cfg.model == "tiny" else None)  # tiny's encoders come from the seed
        build_cache(data, encoders, device, cfg.cache, fingerprint, cfg.batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    qk = {p for n, p in model.named_parameters() if n.endswith(("query_norm.scale", "key_norm.scale"))}
    groups = [{"params": [p for p in params if p not in qk], "lr_mult": 1.0},
              {"params": [p for p in params if p in qk], "lr_mult": cfg.qk_norm_lr}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=True)  # fused: one kernel for all tensors
    ema = ShardedEMA(model, cfg.ema_decay)
    batches = Batches(data, cfg.batch_size, rank, world, cfg.seed, cfg.workers)
    noise = torch.Generator(device).manual_seed(cfg.seed + rank)  # the loss's sigmas and noise (official seed + rank)
    torch.manual_seed(cfg.seed + rank)
    log.info("%d records (%d bad) in %d buckets; %d trainable tensors (%.2fM parameters) on %d ranks", len(data),
             data.bad_records, len(data.buckets), len(trainable), sum(p.numel() for p in params) / 1e6, world)
    start, counts = 0, {"skipped": 0, "seen": 0}  # this rank's bad samples and all samples drawn
    if resume_from:
        start, counts = load_checkpoint(resume_from, model, opt, ema, batches, noise, trainable)
    if rank == 0:
        trim_metrics(cfg.out, start)
    val_samples = data.first_samples(cfg.val_samples)  # fixed validation prompts

    stream, bar = iter(batches), tqdm(total=cfg.steps, initial=start, disable=rank != 0, dynamic_ncols=True)
    loss_sum, n, t0, step = torch.zeros((), dtype=torch.float64, device=device), 0, time.perf_counter(), start
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = encoders.encode(next(stream), device)
            B = len(batch["features"])
            counts = {"skipped": counts["skipped"] + batch["skipped"], "seen": counts["seen"] + B + batch["skipped"]}
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg) * group["lr_mult"]
            loss = model.loss({"latents": batch["latents"], "features": batch["features"],
                               "weights": batch["weights"], "pooled": pooled.expand(B, -1)}, noise, mu=cfg.shift)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model)
            loss_sum, n = loss_sum + loss.detach(), n + 1  # no .item() here: that would wait for the GPU every step
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                totals = torch.cat([loss_sum[None], loss_sum.new_tensor([counts["skipped"], counts["seen"]])])
                dist.all_reduce(totals)  # summed over ranks
                loss_avg, skipped, seen = totals.tolist()
                check_bad(int(skipped), int(seen), cfg.max_bad)
                grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm  # FSDP2: sharded
                dt = time.perf_counter() - t0
                record = {"step": step, "epoch": batches.epoch, "loss": loss_avg / (n * world), "lr": lr_at(step, cfg),
                          "grad_norm": grad_norm.item(), "steps_per_s": n / dt, "samples_per_s": n * B * world / dt,
                          "skipped": int(skipped), "bad_records": data.bad_records}
                if rank == 0:
                    with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}", skipped=int(skipped))
                loss_sum, n, t0 = torch.zeros_like(loss_sum), 0, time.perf_counter()
            if step % cfg.val_every == 0 or step == cfg.steps:
                validate(cfg, step, model, ema, encoders, val_samples)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(cfg, step, model, opt, ema, batches, noise, counts, trainable)
    except KeyboardInterrupt:  # Ctrl-C: main says where to continue from
        bar.close()
        last = checkpoints(cfg.out)
        raise KeyboardInterrupt(f"interrupted at step {step}; the last checkpoint is "
                                f"{os.path.basename(last[-1]) if last else 'none'}; continue with --resume") from None
    bar.close()
    export(cfg, model, ema, encoders)


def main(argv=None, presets: dict | None = None) -> None:
    """Train; `presets` adds models to --model (name -> (cfg, device) -> (UniWorld, Encoders))."""
    models = {**MODELS, **(presets or {})}
    cfg = parse_args(argv, models)
    device = setup_distributed()
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"[rank {dist.get_rank()}] %(levelname)s %(name)s: %(message)s")
    try:
        train(cfg, device, models)
    except (ValueError, OSError, TooMuchBadData) as e:  # the user's to fix: one line, no traceback
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, the shell's exit code for SIGINT
        print(f"train.py: {e or 'interrupted'}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
