"""UniWorld-V1 (Lin et al. 2025, paper §3.1): a frozen VLM and a frozen SigLIP condition FLUX through two connectors.

    instruction + reference image(s) --> Qwen2.5-VL (frozen) --> last hidden state of every token (L, 3584)
                                                                   | denoise_projector: 3584 -> 12288 -> SiLU -> 4096
    reference image(s) --> SigLIP (frozen) --> (1024, 1152) each  |
                             | siglip_projector: 1152 -> 12288 -> SiLU -> 4096 (FLUX Redux's shape)
                             +--> inserted before that image's <|vision_end|> in the VLM stream
    FLUX text stream = [VLM tokens with SigLIP blocks] (+ T5 at inference), ids all zero; pooled = CLIP
    FLUX image stream = packed noisy VAE latents of the target only: no reference latents (the paper's point)

Training is rectified flow on the target's latents, weighted per latent pixel by the edit mask (paper §3.5, masks.py).
Stage 1 trains the denoise_projector alone; stage 2 adds the siglip_projector and FLUX's image-branch attention and
modulation in all 57 blocks (paper §3.2); stage 0, not the paper's, trains the denoiser from scratch (small worlds).
"""

import json
import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import flux
from encoders import VLM_PIXELS, ClipPooled, SiglipEncoder, T5Encoder, VLMEncoder, load_vlm

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# The frozen side: instruction and reference images -> per-sample features (cacheable, since nothing here trains)


@dataclass
class Encoders:
    """The frozen encoders. `siglip` is None in stage 1 (official: no SigLIP tokens); `ae` maps pixels to latents."""

    vlm: VLMEncoder
    siglip: SiglipEncoder | None = None
    ae: flux.AutoEncoder | None = None
    clip: ClipPooled | None = None
    t5: T5Encoder | None = None

    @torch.no_grad()
    def features(self, instructions: list[str], images: list[list], train: bool = True) -> list[dict]:
        """One dict per sample: `vlm` (L, D) hidden states without padding, `vision_end` (n_img,) the position of
        each image's <|vision_end|> in them, and `siglip` (n_img, T, C), or None without images (or SigLIP)."""
        hidden, mask, ids = self.vlm(instructions, images, train)  # (B, L, D), left-padded
        flat = [im for ims in images for im in ims]
        sig = self.siglip(flat) if self.siglip is not None and flat else None  # (sum n_img, T, C)
        out, k = [], 0
        for b, ims in enumerate(images):
            keep = mask[b].bool()
            vision_end = (ids[b, keep] == self.vlm.vision_end_id).nonzero()[:, 0]
            assert len(vision_end) == len(ims), "one <|vision_end|> per reference image"
            out.append({"vlm": hidden[b, keep], "vision_end": vision_end,
                        "siglip": sig[k : k + len(ims)] if sig is not None and ims else None})
            k += len(ims)
        return out

    @torch.no_grad()
    def encode(self, batch: dict, device) -> dict:
        """A data.py batch + 'features' (VLM hidden states and SigLIP tokens) and 'latents' (the autoencoder's, fp32
        as official), everything moved to `device`. A batch from the encoder cache already has both."""
        if "features" not in batch:
            batch = {**batch, "features": self.features(batch["instruction"], batch["references"]),
                     "latents": self.ae.encode(batch["pixels"].to(self.vlm.model.device)).float()}
        return to(batch, device)

    @torch.no_grad()
    def pooled(self, prompts: list[str], dim: int = 768) -> Tensor:
        """The pooled vector y (B, dim): CLIP-L of the prompts ("" in training, docs/official.md §2.5), else zeros."""
        if self.clip is None:
            self.clip = ClipPooled(dim=dim)  # warns once that the pooled vector is zeros
        return self.clip(prompts)


def to(x, device):
    """Tensors in nested dicts and lists -> device; anything else as it is."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to(v, device) for k, v in x.items()}
    return [to(v, device) for v in x] if isinstance(x, list) else x


# ----------------------------------------------------------------------------------------------------------------
# The trained side: connectors, condition stream, rectified-flow loss


def connector(d_in: int, d_out: int) -> nn.Sequential:
    """Linear -> SiLU -> Linear, 3x wide (official "mlp2x_gelu", which is in fact SiLU)."""
    return nn.Sequential(nn.Linear(d_in, 3 * d_out), nn.SiLU(), nn.Linear(3 * d_out, d_out))


class UniWorld(nn.Module):
    """The official `denoise_tower`: the FLUX denoiser and the two connectors into its text stream."""

    def __init__(self, denoiser: flux.Flux, vlm_dim: int = 3584, siglip_dim: int = 1152):
        super().__init__()
        ctx = denoiser.config.context_in_dim
        self.denoiser = denoiser
        self.denoise_projector = connector(vlm_dim, ctx)
        self.siglip_projector = connector(siglip_dim, ctx)

    def text_stream(self, features: list[dict], t5: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Per-sample features -> FLUX text tokens (B, L, ctx) and their padding mask (B, L), False on padding (None
        when no sample is padded). Paper §3.1, official `_insert_img_to_vlm` (docs/official.md §2.3). A sample's stream:
            ... <|vision_start|> [Qwen image tokens] [SigLIP tokens of that image] <|vision_end|> ... [T5 at inference]
        Text ids are all zero, so FLUX sees the text tokens as a set: the order matters to nobody but a reader. Streams
        are left-padded with zeros; the mask hides the padding, so a sample's output does not depend on its batch."""
        # each connector runs once over the whole batch's tokens, then the streams are laid out per sample
        vlm = self.denoise_projector(torch.cat([f["vlm"] for f in features])).split([len(f["vlm"]) for f in features])
        refs = [f["siglip"] for f in features if f.get("siglip") is not None]  # each (n_img, T, siglip_dim)
        siglip = iter(self.siglip_projector(torch.cat(refs)) if refs else [])  # one (T, ctx) block per image
        streams = []
        for i, f in enumerate(features):
            pieces, start = [], 0
            if f.get("siglip") is not None:
                for end in f["vision_end"].tolist():  # ... Qwen image tokens, SigLIP block, <|vision_end|> ...
                    pieces += [vlm[i][start:end], next(siglip)]
                    start = end
            pieces.append(vlm[i][start:])
            if t5 is not None:
                pieces.append(t5[i].to(vlm[i].dtype))
            streams.append(torch.cat(pieces))  # (L_i, ctx)
        length = max(len(s) for s in streams)
        txt = torch.stack([F.pad(s, (0, 0, length - len(s), 0)) for s in streams])  # (B, L, ctx), official: pad left
        if all(len(s) == length for s in streams):
            return txt, None
        mask = torch.stack([torch.arange(length, device=txt.device) >= length - len(s) for s in streams])
        return txt, mask  # (B, L)

    def velocity(self, x: Tensor, sigma: Tensor, txt: Tensor, y: Tensor, guidance: float,
                 txt_mask: Tensor | None = None) -> Tensor:
        """FLUX's velocity prediction for latents x (B, C, h, w) at noise level sigma (B,) -> (B, C, h, w)."""
        B, _, h, w = x.shape
        g = torch.full((B,), guidance, device=x.device, dtype=x.dtype)
        v = self.denoiser(flux.pack(x), flux.image_ids(h, w, device=x.device), txt,
                          flux.text_ids(txt.shape[1], device=x.device), sigma.to(x.dtype), y, g, txt_mask)
        return flux.unpack(v, h, w)

    def loss(self, batch: dict, generator: torch.Generator | None = None, sigma: Tensor | None = None,
             noise: Tensor | None = None, mu: float | None = None) -> Tensor:
        """Rectified flow on the target latents, weighted per latent pixel (paper §3.1, §3.5; docs/official.md §4).
        batch: `latents` (B, C, h, w), `features` (B dicts), `pooled` (B, vec), optional `weights` (B, 1, h, w) from
        masks.py. sigma (B,) and noise (B, C, h, w) come from `generator` unless given; `mu` overrides the shift."""
        x0 = batch["latents"]
        B, _, h, w = x0.shape
        if sigma is None:
            sigma = sample_sigmas(B, h * w // 4, generator, x0.device, mu)  # (B,)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s = sigma.view(B, 1, 1, 1).to(x0.dtype)
        x_t = (1 - s) * x0 + s * noise
        txt, txt_mask = self.text_stream(batch["features"])
        pred = self.velocity(x_t, sigma, txt, batch["pooled"], guidance=1.0, txt_mask=txt_mask)
        loss = weighted_mse(pred, noise - x0, batch.get("weights"))
        first = self.siglip_projector[0]
        if first.weight.requires_grad and all(f.get("siglip") is None for f in batch["features"]):
            # official: without references a dummy zero SigLIP input still runs through the connector, so every
            # trainable tensor gets a (zero) gradient on every rank, as distributed gradient reduction needs
            loss = loss + 0 * self.siglip_projector(first.weight.new_zeros(1, first.in_features)).sum()
        return loss


def sample_sigmas(batch: int, image_seq_len: int, generator=None, device=None, mu: float | None = None) -> Tensor:
    """sigma = sigmoid(N(0, 1)), then FLUX's resolution shift, mu from the token count (docs/official.md §4.2)."""
    sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    return flux.time_shift(flux.resolution_mu(image_seq_len) if mu is None else mu, sigma)


def weighted_mse(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """mean(w * (pred - target)^2); w (B, 1, h, w) broadcasts over the C latent channels (official: the mask weights
    each latent pixel, before 2x2 packing)."""
    err = (pred.float() - target.float()).pow(2)  # (B, C, h, w)
    return err.mean() if weights is None else (err * weights.float()).mean()


# ----------------------------------------------------------------------------------------------------------------
# Training stages: which parameters learn (paper §3.2; docs/official.md §4.4, §4.5)

STAGES = {
    0: r"denoiser\.|denoise_projector\.|siglip_projector\.",  # not the paper's: FLUX's pretraining, from scratch
    1: r"denoise_projector\.",
    2: r"denoise_projector\.|siglip_projector\.|denoiser\.double_blocks\.\d+\.img_(attn|mod)\."
       r"|denoiser\.single_blocks\.\d+\.(qkv|norm|modulation)\.",  # image branch: attention + modulation
}


def set_stage(model: UniWorld, stage: int) -> list[str]:
    """Make exactly the stage's parameters trainable and freeze the rest; returns the trainable names."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}: use 1 or 2 (0 = pretraining the whole denoiser from scratch)")
    for name, p in model.named_parameters():
        p.requires_grad_(re.match(STAGES[stage], name) is not None)
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------------
# Official weights: the LanguageBind/UniWorld-V1 release layout, the Redux initialisation of the SigLIP connector


def load_uniworld(path: str, dtype=None, device=None, with_vlm: bool = True,
                  vlm_pixels: int = VLM_PIXELS) -> tuple[UniWorld, VLMEncoder | None]:
    """The release folder (model-*.safetensors + index): denoise_tower.* -> UniWorld; visual/model/lm_head -> VLM."""
    denoiser = flux.load_flux(path, dtype=dtype, device=device)  # finds the denoise_tower.denoiser. prefix
    st = flux.Checkpoint(path, prefix="denoise_tower.")
    needed = [f"{c}.{i}.{p}" for c in ("denoise_projector", "siglip_projector") for i in (0, 2)
              for p in ("weight", "bias")]
    if missing := [k for k in needed if k not in st.keys]:
        raise ValueError(f"{path}: not a UniWorld-V1 checkpoint, missing denoise_tower.{{{', '.join(missing)}}}")
    skipped = sorted(k for k in st.keys if k.startswith("vae_projector."))
    if skipped:  # built but unused in the release (it serves joint_ref_feature_as_condition, which is off)
        log.info("skipping the unused denoise_tower.vae_projector (%d tensors)", len(skipped))
    with torch.device("meta"):
        model = UniWorld(denoiser, st.shape("denoise_projector.0.weight")[1], st.shape("siglip_projector.0.weight")[1])
    state = {k: st.read(k).to(device=device or "cpu", dtype=dtype) for k in needed}
    load_strict(model, {**state, **{f"denoiser.{k}": v for k, v in denoiser.state_dict().items()}}, path, assign=True)
    return model.eval(), (load_vlm(path, pixels=vlm_pixels, dtype=dtype) if with_vlm else None)


def load_siglip_projector(model: UniWorld, path: str) -> None:
    """The SigLIP connector from FLUX Redux (redux_up/down) or flux-redux-siglipv2-512.bin (docs/official.md §10.2)."""
    if path.endswith(".safetensors"):
        st, names = flux.Checkpoint(path), {"0": "redux_up", "2": "redux_down"}
        if "redux_up.weight" not in st.keys:  # a UniWorld release
            st, names = flux.Checkpoint(path, prefix="denoise_tower.siglip_projector."), {"0": "0", "2": "2"}
        state = {f"{i}.{p}": st.read(f"{n}.{p}") for i, n in names.items() for p in ("weight", "bias")
                 if f"{n}.{p}" in st.keys}
    else:  # the official .bin: a pickle, so only ever opened with weights_only
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError for anything but plain tensors, EOFError for a torn file
            raise ValueError(f"{path}: not a weights file that loads safely ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]})") from e
        state = {k.removeprefix("module.").removeprefix("denoise_tower.siglip_projector."): v for k, v in raw.items()}
    if sorted(state) != ["0.bias", "0.weight", "2.bias", "2.weight"]:
        raise ValueError(f"{path}: expected redux_up/redux_down or denoise_tower.siglip_projector.{{0,2}} weights, "
                         f"found {sorted(state)[:6]}")
    load_strict(model.siglip_projector, state, path)


def load_strict(module: nn.Module, state: dict[str, Tensor], path: str, assign: bool = False) -> None:
    """load_state_dict, with a wrong shape or a non-float tensor reported as one ValueError naming the file."""
    for k, v in state.items():
        if not v.is_floating_point():
            raise ValueError(f"{path}: {k} is stored as {v.dtype}, not a floating-point type")
    try:
        module.load_state_dict(state, assign=assign, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: {' '.join(str(e).split())[:300]}") from e


def load_task_head(path: str) -> nn.Sequential:
    """The official task router (task_head_final.pt, docs/official.md §1.5): Linear(3584, 10240) -> SiLU ->
    Dropout(0.3) -> Linear(10240, 2), keys 0.* and 3.*; a pickle, so opened with weights_only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        (hidden, dim), (out, _) = state["0.weight"].shape, state["3.weight"].shape
    except Exception as e:  # a refused pickle, a torn file, other keys
        raise ValueError(f"{path}: not a task head (expected the tensors 0.weight, 0.bias, 3.weight, 3.bias of "
                         f"task_head_final.pt): {type(e).__name__}: {str(e).splitlines()[0]}") from e
    head = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(0.3), nn.Linear(hidden, out))
    load_strict(head, state, path)
    return head.eval()


@torch.no_grad()
def wants_image(head: nn.Sequential, vlm: VLMEncoder, prompt: str, images: list) -> bool:
    """The official routing: the head on Qwen's last hidden state at the inference prompt's last "assistant" token;
    logit 0 < logit 1 means generate an image, otherwise answer in text (app.py, univa/serve/cli.py)."""
    hidden, _, ids = vlm([prompt], [images], train=False)  # (1, L, D)
    where = (ids[0] == vlm.assistant_id).nonzero()
    if len(where) == 0:
        raise ValueError("the VLM's tokenizer has no 'assistant' token: this task head cannot route its prompts")
    logits = head(hidden[0, where[-1, 0]].to(head[0].weight))
    return bool(logits[0] < logits[1])


def release_state_dict(model: UniWorld, vlm: VLMEncoder | None = None) -> dict[str, Tensor]:
    """Our weights under the release names: Qwen in the legacy layout, FLUX in diffusers' (denoise_tower.denoiser.)."""
    out = {}
    if vlm is not None:  # transformers 5 names -> the transformers 4.50 names of the release
        for k, v in vlm.model.state_dict().items():
            out[re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", k))] = v
    out.update({f"denoise_tower.denoiser.{k}": v for k, v in flux.flux_state_dict(model.denoiser, "diffusers").items()})
    for name in ("denoise_projector", "siglip_projector"):
        out.update({f"denoise_tower.{name}.{k}": v for k, v in getattr(model, name).state_dict().items()})
    c = model.denoiser.config  # the release also holds the unused vae_projector (64 -> 3072 -> 4096): zeros here
    out.update({f"denoise_tower.vae_projector.{k}": torch.zeros(shape) for k, shape in (
        ("0.weight", (c.hidden_size, c.in_channels)), ("0.bias", (c.hidden_size,)),
        ("2.weight", (c.context_in_dim, c.hidden_size)), ("2.bias", (c.context_in_dim,)))})
    return out


def save_release(model: UniWorld, folder: str, vlm: VLMEncoder | None = None, shard_bytes: int = 5 * 2**30) -> None:
    """Write the release layout: model-0000i-of-0000n.safetensors shards, their index, the config and tokenizer."""
    os.makedirs(folder, exist_ok=True)
    shards, size, seen = [{}], 0, set()
    for k, v in release_state_dict(model, vlm).items():
        if size and size + v.nbytes > shard_bytes:
            shards.append({})
            size = 0
        v = v.detach().contiguous()
        shards[-1][k] = v.clone() if v.data_ptr() in seen else v  # tied weights are written twice
        seen.add(v.data_ptr())
        size += v.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    config = {**(vlm.model.config.to_dict() if vlm is not None else {}), "model_type": "univa_qwen2p5vl",
              "architectures": ["UnivaQwen2p5VLForConditionalGeneration"]}
    c = model.denoiser.config
    config["denoise_tower"] = {"denoiser_type": "flux", "denoise_projector_type": "mlp2x_gelu",
                               "input_hidden_size": model.denoise_projector[0].in_features,
                               "output_hidden_size": c.context_in_dim, "denoiser_config": flux.diffusers_config(c)}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    if vlm is not None:
        vlm.tokenizer.save_pretrained(folder)
        vlm.image_processor.save_pretrained(folder)
