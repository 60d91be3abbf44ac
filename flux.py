"""FLUX.1 in plain PyTorch: the MMDiT denoiser, its autoencoder, and the official weights in and out.

UniWorld-V1 generates with FLUX.1-dev (Lin et al. 2025, paper §3.1). This file is the whole of FLUX that UniWorld needs:
  1. the MMDiT: 19 double-stream blocks (separate img/txt weights, joint attention) then 38 single-stream blocks,
     conditioned by a vector (timestep + guidance + pooled CLIP) through adaLN modulation;
  2. the autoencoder (8x down, 16 latent channels) and the 2x2 "packing" of latents into 64-channel tokens;
  3. loading of the BFL single files and the diffusers folders (also nested, as in the UniWorld-V1 release),
     straight from safetensors onto a meta-built model, and export back to both layouts.
Module names follow BFL's flux (github.com/black-forest-labs/flux), except one: the single block's fused `linear1`
is kept as two layers, `qkv` and `mlp_in`, because UniWorld's stage 2 trains the first and not the second.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class FluxConfig:
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL width; UniWorld's projectors map into it
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, int, int] = (16, 56, 56)  # RoPE widths of the (index, row, col) id axes; sum = head dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled; schnell has no guidance embedder


FLUX_CONFIGS = {
    "flux-dev": FluxConfig(),
    "flux-schnell": FluxConfig(guidance_embed=False),
    "tiny": FluxConfig(vec_in_dim=16, context_in_dim=32, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                       axes_dim=(4, 14, 14)),
}


@dataclass
class AutoEncoderConfig:
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32  # BFL hard-codes 32; a free knob only so tiny test models stay tiny


AE_CONFIGS = {"flux": AutoEncoderConfig(),  # tiny: 8x down like FLUX's, so masks.py's latent grid fits
              "tiny": AutoEncoderConfig(ch=8, ch_mult=(1, 1, 1, 1), num_res_blocks=1, norm_groups=4)}

# ----------------------------------------------------------------------------------------------------------------
# Embeddings, RoPE and attention


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (or a raw guidance scale), cos first (BFL layers.py). Scaled by 1000 in fp32:
    BFL and diffusers scale in the input dtype, which in bf16 rounds 0.7 * 1000 to 700 (docs/official.md §11.1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """The 3-axis RoPE angles of ids (B, L, 3) as (cos, sin) pairs in fp32: (B, 1, L, head_dim/2, 2)."""
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # (d/2,)
        angles.append(ids[..., i, None].double() * omega)  # (B, L, d/2): axis i has its own frequency ladder
    angles = torch.cat(angles, dim=-1).unsqueeze(1)  # (B, 1, L, head_dim/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of x (B, H, L, D) by the RoPE angles, in fp32 (BFL math.py)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, D/2) each
    cos, sin = pe.unbind(-1)  # (B, 1, L, D/2) each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, mask: Tensor | None = None) -> Tensor:
    """Joint attention with RoPE on q and k: (B, H, L, D) -> (B, L, H*D); `mask` (B, 1, 1, L) is False on padding."""
    x = F.scaled_dot_product_attention(apply_rope(q, pe), apply_rope(k, pe), v, attn_mask=mask)
    return x.transpose(1, 2).flatten(2)


def layer_norm(x: Tensor) -> Tensor:
    """The parameter-free LayerNorm in front of every modulation (eps 1e-6)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# MMDiT building blocks (BFL modules/layers.py)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear; embeds the timestep, the guidance scale and the pooled text vector."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], eps=1e-6).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (FLUX's QK-norm), which keeps attention logits bounded."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) laid out [q | k | v], head-major inside each -> three (B, H, L, D)."""
    B, L, _ = qkv.shape
    return qkv.view(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class SelfAttention(nn.Module):
    """The q/k/v projection, QK-norm and output projection of one stream of a double block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, D) -> q, k, v (B, H, L, D/H), q and k RMS-normed."""
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        return *self.norm(q, k, v), v


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, D)
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """adaLN: vec -> one (shift, scale, gate) triple, or two for a double block (attention, then MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.multiplier == 6 else None


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, mixed only by one joint attention over [txt; img]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.img_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, num_heads, qkv_bias)
        self.txt_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + img_mod1.scale) * layer_norm(img) + img_mod1.shift)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + txt_mod1.scale) * layer_norm(txt) + txt_mod1.shift)

        q, k, v = torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe, mask)  # (B, L_txt + L_img, D): text first, as BFL
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * layer_norm(img) + img_mod2.shift)
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * layer_norm(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img]: attention and MLP run in parallel from one modulated input (BFL's linear1/2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        mlp_hidden = int(dim * mlp_ratio)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # official linear1[:3*dim]
        self.mlp_in = nn.Linear(dim, mlp_hidden, bias=qkv_bias)  # official linear1[3*dim:]
        self.linear2 = nn.Linear(dim + mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, mask: Tensor | None = None) -> Tensor:
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * layer_norm(x) + mod.shift
        q, k, v = split_heads(self.qkv(x_mod), self.num_heads)
        q, k = self.norm(q, k, v)
        mlp = F.gelu(self.mlp_in(x_mod), approximate="tanh")
        return x + mod.gate * self.linear2(torch.cat((attention(q, k, v, pe, mask), mlp), dim=2))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear((1 + scale) * layer_norm(x) + shift)


class Flux(nn.Module):
    """The FLUX.1 MMDiT. Predicts the rectified-flow velocity (noise - data) of packed image tokens."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        c = self.config = config
        head_dim = c.hidden_size // c.num_heads
        if c.hidden_size % c.num_heads or sum(c.axes_dim) != head_dim or any(d % 2 for d in c.axes_dim):
            raise ValueError(f"axes_dim {c.axes_dim} must be even widths summing to the head dim {head_dim}")
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else None
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        args = (c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(*args) for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(*args) for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, txt_mask: Tensor | None = None) -> Tensor:
        """img (B, L_img, in), txt (B, L_txt, ctx), ids (B, L, 3) or (L, 3), timesteps (B,) in [0, 1], y (B, vec),
        guidance (B,) the raw scale (dev only), txt_mask (B, L_txt) False on padding (None: no padding).
        Returns (B, L_img, out)."""
        B = img.shape[0]
        img_ids, txt_ids = (ids.expand(B, -1, -1) if ids.ndim == 2 else ids for ids in (img_ids, txt_ids))
        vec = self.time_in(timestep_embedding(timesteps).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (dev): pass `guidance`, e.g. 3.5")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(img.dtype))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = rope(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)  # once per forward
        mask = None
        if txt_mask is not None:  # keys: the text tokens that are not padding, then every image token
            mask = torch.cat((txt_mask, txt_mask.new_ones(B, img.shape[1])), dim=1)[:, None, None, :]
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe, mask)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe, mask)
        return self.final_layer(x[:, txt.shape[1] :], vec)


# ----------------------------------------------------------------------------------------------------------------
# Autoencoder (BFL autoencoder.py): frozen in UniWorld, it maps pixels in [-1, 1] to 16-channel latents at 1/8 size


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1 conv projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = group_norm(c, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(c: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        g, chans = c.norm_groups, [c.ch * m for m in (1, *c.ch_mult)]
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(c.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(chans[i] if j == 0 else chans[i + 1], chans[i + 1], g)
                                        for j in range(c.num_res_blocks))
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(chans[i + 1])
            self.down.append(level)
        self.mid = mid_block(chans[-1], g)
        self.norm_out = group_norm(chans[-1], g)
        self.conv_out = nn.Conv2d(chans[-1], 2 * c.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        g, chans = c.norm_groups, [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, chans[-1], 3, padding=1)
        self.mid = mid_block(chans[-1], g)
        self.up = nn.ModuleList()  # indexed like the encoder: up[0] is the finest level, run last
        for i in range(len(c.ch_mult)):
            level = nn.Module()
            c_in = chans[i + 1] if i + 1 < len(chans) else chans[-1]
            level.block = nn.ModuleList(ResnetBlock(c_in if j == 0 else chans[i], chans[i], g)
                                        for j in range(c.num_res_blocks + 1))
            if i != 0:
                level.upsample = Upsample(chans[i])
            self.up.append(level)
        self.norm_out = group_norm(chans[0], g)
        self.conv_out = nn.Conv2d(chans[0], c.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """The FLUX VAE. `encode` returns the normalised posterior mean, `decode` inverts the normalisation."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.factor = 2 ** (len(config.ch_mult) - 1)  # pixels per latent pixel: 8 for FLUX

    def encode(self, x: Tensor) -> Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, z, H/8, W/8)
        mean = self.encoder(x)[:, : self.config.z_channels]
        return self.config.scale_factor * (mean - self.config.shift_factor)

    def decode(self, z: Tensor) -> Tensor:  # (B, z, H/8, W/8) -> (B, 3, H, W), roughly in [-1, 1]
        return self.decoder(z / self.config.scale_factor + self.config.shift_factor)


class PixelUnshuffle(nn.Module):
    """A weightless autoencoder for pixel-space models: (B, 3, H, W) <-> (B, 3f², H/f, W/f) by pixel (un)shuffle."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor  # pixels per latent pixel, as AutoEncoder.factor

    def encode(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.factor)

    def decode(self, z: Tensor) -> Tensor:
        return F.pixel_shuffle(z, self.factor)


# ----------------------------------------------------------------------------------------------------------------
# Packing latents into tokens, position ids, and the resolution-dependent schedule shift


def pack(z: Tensor) -> Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens of 2x2 patches, row-major; channel index c*4 + 2*ph + pw."""
    B, C, h, w = z.shape
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latents, h and w in latent pixels."""
    B, L, D = x.shape
    return x.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


def image_ids(h: int, w: int, index: int = 0, device=None) -> Tensor:
    """Position ids (h/2 * w/2, 3) = [index, row, col] of packed tokens; index 1 marks Kontext-style references."""
    rows, cols = torch.meshgrid(torch.arange(h // 2, device=device), torch.arange(w // 2, device=device), indexing="ij")
    return torch.stack([torch.full_like(rows, index), rows, cols], dim=-1).flatten(0, 1).float()


def text_ids(length: int, device=None) -> Tensor:
    """Text tokens have all-zero ids, so RoPE is the identity on them (BFL sampling.py `prepare`)."""
    return torch.zeros(length, 3, device=device)


def time_shift(mu: float, t: Tensor) -> Tensor:
    """Shift t in [0, 1] toward noise by e^mu: e^mu / (e^mu + 1/t - 1); keeps 0 and 1 fixed (BFL sampling.py)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def resolution_mu(image_seq_len: int, base_len: int = 256, max_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """mu of the shift, linear in the packed image token count: 256 tokens -> 0.5, 4096 -> 1.15 (FLUX.1-dev)."""
    return base_shift + (max_shift - base_shift) * (image_seq_len - base_len) / (max_len - base_len)


# ----------------------------------------------------------------------------------------------------------------
# Official weights (docs/official.md §10.3-10.4). A layout maps each of our keys to the pieces of official tensors it
# is made of, each (official key, (first row, last row)) or None for a whole tensor. Loading reads the pieces straight
# from the safetensors files, so a checkpoint is never held twice; export runs the layout backwards.

Pieces = list[tuple[str, tuple[int, int] | None]]
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # safetensors' floating-point types


def _flux_layout(c: FluxConfig, fmt: str) -> dict[str, Pieces]:
    h, mlp = c.hidden_size, int(c.hidden_size * c.mlp_ratio)
    table: dict[str, Pieces] = {}
    for key in _meta(Flux, c).state_dict():
        p = key.split(".")
        if fmt == "diffusers":
            table[key] = _diffusers_flux_pieces(p, h)
        elif p[0] == "single_blocks" and p[2] in ("qkv", "mlp_in"):  # BFL's linear1 = [qkv; mlp_in]
            rows = (0, 3 * h) if p[2] == "qkv" else (3 * h, 3 * h + mlp)
            table[key] = [(f"single_blocks.{p[1]}.linear1.{p[3]}", rows)]
        else:  # otherwise BFL's names are ours
            table[key] = [(key, None)]
    return table


def _diffusers_flux_pieces(p: list[str], h: int) -> Pieces:
    """Where one of our FLUX tensors (its key split at the dots) lives in diffusers' FluxTransformer2DModel."""
    last = p[-1] if p[-1] != "scale" else "weight"
    top = {"img_in": "x_embedder", "txt_in": "context_embedder", "time_in": "time_text_embed.timestep_embedder",
           "vector_in": "time_text_embed.text_embedder", "guidance_in": "time_text_embed.guidance_embedder"}
    if p[0] in top:  # the MLP embedders' in_layer and out_layer are linear_1 and linear_2
        layer = {"in_layer": ".linear_1", "out_layer": ".linear_2"}.get(p[1], "")
        return [(f"{top[p[0]]}{layer}.{last}", None)]
    if p[0] == "final_layer":  # diffusers chunks (scale, shift), BFL (shift, scale): the halves swap
        n = "norm_out.linear." + last
        return [(f"proj_out.{last}", None)] if p[1] == "linear" else [(n, (h, 2 * h)), (n, (0, h))]
    double = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
              "img_attn.qkv": "attn.to_q attn.to_k attn.to_v",  # several names: our fused qkv is theirs stacked
              "txt_attn.qkv": "attn.add_q_proj attn.add_k_proj attn.add_v_proj",
              "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
              "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
              "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
              "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
              "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
    single = {"qkv": "attn.to_q attn.to_k attn.to_v", "mlp_in": "proj_mlp", "linear2": "proj_out",
              "modulation.lin": "norm.linear", "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
    block, names = ("transformer_blocks", double) if p[0] == "double_blocks" else ("single_transformer_blocks", single)
    return [(f"{block}.{p[1]}.{n}.{last}", None) for n in names[".".join(p[2:-1])].split()]


def _ae_layout(c: AutoEncoderConfig, fmt: str) -> dict[str, Pieces]:
    """Our (= BFL's) autoencoder keys -> diffusers' AutoencoderKL keys (convert_ldm_vae_checkpoint, run backwards)."""
    table = {}
    for key in _meta(AutoEncoder, c).state_dict():
        p = key.split(".")
        if fmt == "bfl":
            name = ".".join(p[:-1])
        elif p[1] == "mid":  # encoder.mid.block_1.norm1.weight -> encoder.mid_block.resnets.0.norm1.weight
            sub = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[p[2]]
            rest = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}.get(p[3], p[3])
            name = f"{p[0]}.mid_block.{sub}.{rest}"
        elif p[1] in ("down", "up"):  # the decoder's up levels are numbered the other way round in diffusers
            i = int(p[2]) if p[1] == "down" else len(c.ch_mult) - 1 - int(p[2])
            name = f"{p[0]}.{p[1]}_blocks.{i}." + (f"{p[3]}rs.0.conv" if p[3] in ("downsample", "upsample") else
                                                   f"resnets.{p[4]}.{p[5].replace('nin_shortcut', 'conv_shortcut')}")
        else:
            name = f"{p[0]}.{p[1].replace('norm_out', 'conv_norm_out')}"
        table[key] = [(f"{name}.{p[-1]}", None)]
    return table


def _meta(cls, config) -> nn.Module:
    with torch.device("meta"):
        return cls(config)


class Checkpoint:
    """The tensors of a safetensors file, or of a folder of shards, under a key prefix. Each read opens its file alone,
    so at most one tensor's pages are mapped at a time; opening a file checks its header against its size, so a
    truncated file is an error here, not NaN weights later."""

    PREFIXES = ("", "model.diffusion_model.", "denoise_tower.denoiser.", "first_stage_model.", "vae.")

    def __init__(self, path: str, subfolder: str = "", prefix: str = ""):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: pass a .safetensors file or a folder that holds them")
        folder = os.path.join(path, subfolder) if os.path.isdir(os.path.join(path, subfolder)) else path
        files = [path] if not os.path.isdir(folder) else sorted(
            os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in the folder {folder}")
        self.path, self.folder, self.entries = path, os.path.dirname(files[0]), {}  # name -> (file, dtype, shape)
        for f in files:
            try:
                with safe_open(f, "pt") as st:
                    self.entries.update({k: (f, st.get_slice(k).get_dtype(), tuple(st.get_slice(k).get_shape()))
                                         for k in st.keys()})
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{f} is not a readable safetensors file ({e}): download it again, or convert "
                                 f".bin/.pt weights first") from e
        self.use(prefix)

    def use(self, prefix: str, fmt: str | None = None) -> "Checkpoint":
        self.prefix, self.format = prefix, fmt
        self.keys = {k[len(prefix) :] for k in self.entries if k.startswith(prefix)}
        return self

    def find(self, what: str, markers: dict[str, str]) -> "Checkpoint":
        """Settle the layout of `what` (format -> a key only it has), under any of the official prefixes."""
        for p, fmt in ((p, fmt) for p in self.PREFIXES for fmt in markers):
            if p + markers[fmt] in self.entries:
                return self.use(p, fmt)
        raise ValueError(f"{self.path}: no {what} weights found in BFL or diffusers layout (looked for "
                         f"{sorted(markers.values())}, optionally under {self.PREFIXES[1:]})")

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[self.prefix + key][2]

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES.get(self.entries[self.prefix + key][1], torch.float32)  # not a float: read() says so

    def read(self, key: str, rows: tuple[int, int] | None = None, out: Tensor | None = None) -> Tensor:
        """The tensor, or its rows [a, b) (get_slice reads only those), copied from the file's pages into a new
        tensor or into the front of `out` (flat; its dtype): one copy, no temporaries. Never NaN, never a non-float."""
        f, kind, _ = self.entries[self.prefix + key]
        if kind not in DTYPES:
            raise ValueError(f"{f}: {self.prefix + key} is stored as {kind}, not a floating-point type; this file "
                             f"was not written as model weights")
        with safe_open(f, "pt") as st:
            view = st.get_slice(self.prefix + key)
            view = view[rows[0] : rows[1]] if rows else view[:]  # the file's pages, mapped
            t = torch.empty(view.shape, dtype=view.dtype) if out is None else out[: view.numel()].view(view.shape)
            t.copy_(view)
        if not torch.isfinite(t.sum(dtype=torch.float64)):  # one reduction, no copy: never use NaN or inf weights
            raise ValueError(f"{f}: {self.prefix + key} holds NaN or infinite values; the file is damaged")
        return t

    def config(self) -> dict:
        """The config.json beside the weights (a release's: its denoiser_config), for what shapes cannot tell."""
        for f in (os.path.join(self.folder, "config.json"), os.path.join(os.path.dirname(self.folder), "config.json")):
            if os.path.isfile(f):
                with open(f) as fh:
                    c = json.load(fh)
                return c["denoise_tower"].get("denoiser_config", {}) if "denoise_tower" in c else c
        return {}


def _infer_flux_config(ck: Checkpoint) -> FluxConfig:
    """FLUX architecture from the tensor shapes alone: dev, schnell, Flex.1 (8 double blocks), tiny test files."""
    name = lambda bfl, dif: dif if ck.format == "diffusers" else bfl
    shape = lambda bfl, dif: ck.shape(name(bfl, dif))
    count = lambda bfl, dif: len({k.split(".")[1] for k in ck.keys if k.startswith(name(bfl, dif) + ".")})
    hidden, in_channels = shape("img_in.weight", "x_embedder.weight")
    depth, single = count("double_blocks", "transformer_blocks"), count("single_blocks", "single_transformer_blocks")
    if depth:
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight")[0]
        mlp = shape("double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.net.0.proj.weight")[0]
        bias = name("double_blocks.0.img_attn.qkv.bias", "transformer_blocks.0.attn.to_q.bias")
    else:
        head_dim = shape("single_blocks.0.norm.query_norm.scale", "single_transformer_blocks.0.attn.norm_q.weight")[0]
        mlp = shape("single_blocks.0.linear1.weight", "single_transformer_blocks.0.proj_mlp.weight")[0]
        mlp -= 3 * hidden if ck.format == "bfl" else 0  # linear1 = [qkv; mlp_in]
        bias = name("single_blocks.0.linear1.bias", "single_transformer_blocks.0.attn.to_q.bias")
    extra = ck.config()
    axes = extra.get("axes_dims_rope") or ((16, 56, 56) if head_dim == 128 else
                                           (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16))
    return FluxConfig(
        in_channels=in_channels, out_channels=shape("final_layer.linear.weight", "proj_out.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight", "time_text_embed.text_embedder.linear_1.weight")[1],
        context_in_dim=shape("txt_in.weight", "context_embedder.weight")[1], hidden_size=hidden,
        mlp_ratio=mlp / hidden, num_heads=hidden // head_dim, depth=depth, depth_single_blocks=single,
        axes_dim=tuple(axes), theta=extra.get("rope_theta", 10_000), qkv_bias=bias in ck.keys,
        guidance_embed=name("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")
        in ck.keys)


def _infer_ae_config(ck: Checkpoint) -> AutoEncoderConfig:
    """The diffusers config.json beside the weights, else FLUX's autoencoder (BFL's ae.safetensors is only ever it)."""
    c = ck.config()
    if not c:
        return AutoEncoderConfig()
    ch = c["block_out_channels"]
    return AutoEncoderConfig(c["in_channels"], ch[0], c["out_channels"], tuple(x // ch[0] for x in ch),
                             c["layers_per_block"], c["latent_channels"], c.get("scaling_factor", 0.3611),
                             c.get("shift_factor", 0.1159), c.get("norm_num_groups", 32))


def _load(cls, ck: Checkpoint, config, layout, dtype, device) -> nn.Module:
    """Build on meta, check every key and shape of the file against the layout table, then read tensor by tensor."""
    model = _meta(cls, config)
    table = layout(config, ck.format)
    used = {src for pieces in table.values() for src, _ in pieces}
    missing, unexpected, wrong = sorted(used - ck.keys), sorted(ck.keys - used), []
    for key, t in model.state_dict().items():
        pieces = [p for p in table[key] if p[0] in ck.keys]
        if len(pieces) == len(table[key]):
            got = (sum((r[1] - r[0]) if r else ck.shape(s)[0] for s, r in pieces), *ck.shape(pieces[0][0])[1:])
            if math.prod(got) != t.numel() or got[0] != t.shape[0]:  # 1x1 convs may be stored as linears
                wrong.append(f"{pieces[0][0]}: {list(got)} in the file, {list(t.shape)} expected")
    if missing or unexpected or wrong:
        show = lambda xs: ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        raise ValueError(f"weights do not match {cls.__name__}({config}):" + "".join(
            f"\n  {what} ({len(xs)}): {show(xs)}" for what, xs in
            (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if xs)
            + "\n  (pass config=None to infer the architecture from the file)")
    state = {}
    for key, t in model.state_dict().items():
        w, i = torch.empty(t.numel(), dtype=dtype or ck.dtype(table[key][0][0])), 0
        for src, rows in table[key]:  # one official tensor, or several (diffusers' q, k and v): each into its rows
            i += ck.read(src, rows, out=w[i:]).numel()
        state[key] = w.reshape(t.shape).to(device or "cpu")
    model.load_state_dict(state, assign=True)
    return model.eval()


def load_flux(path: str, config: FluxConfig | None = None, dtype=None, device=None) -> Flux:
    """A Flux from a BFL file (flux1-dev.safetensors), a diffusers folder, or the UniWorld-V1 release folder."""
    ck = Checkpoint(path, "transformer").find("FLUX transformer", {"bfl": "img_in.weight",
                                                                   "diffusers": "x_embedder.weight"})
    return _load(Flux, ck, config or _infer_flux_config(ck), _flux_layout, dtype, device)


def load_autoencoder(path: str, config: AutoEncoderConfig | None = None, dtype=None,
                     device=None) -> AutoEncoder | PixelUnshuffle:
    """An AutoEncoder from BFL's ae.safetensors or a diffusers `vae/` folder; a PixelUnshuffle where vae/ names it."""
    config_json = os.path.join(path, "vae", "config.json")
    if os.path.isfile(config_json):
        with open(config_json) as f:
            c = json.load(f)
        if c.get("_class_name") == "PixelUnshuffle":
            return PixelUnshuffle(c["factor"])
    ck = Checkpoint(path, "vae").find("FLUX autoencoder", {"bfl": "decoder.up.0.block.0.conv1.weight",
                                                           "diffusers": "decoder.up_blocks.0.resnets.0.conv1.weight"})
    return _load(AutoEncoder, ck, config or _infer_ae_config(ck), _ae_layout, dtype, device)


def _to_official(model: nn.Module, layout, fmt: str) -> dict[str, Tensor]:
    """The model's weights under the official names of `fmt`, by running its layout backwards (meta tensors too)."""
    if fmt not in ("bfl", "diffusers"):
        raise ValueError(f"unknown weight format {fmt!r}: use 'bfl' or 'diffusers'")
    state, parts = model.state_dict(), {}  # official key -> [(its first row, a view of our tensor)]
    for key, pieces in layout(model.config, fmt).items():
        sizes = [rows[1] - rows[0] if rows else len(state[key]) // len(pieces) for _, rows in pieces]
        for (src, rows), t in zip(pieces, state[key].split(sizes), strict=True):
            parts.setdefault(src, []).append((rows[0] if rows else 0, t))
    return {src: ps[0][1] if len(ps) == 1 else torch.cat([t for _, t in sorted(ps, key=lambda p: p[0])])
            for src, ps in parts.items()}


def flux_state_dict(model: Flux, fmt: str = "bfl") -> dict[str, Tensor]:
    """The model's weights under the official BFL or diffusers names (views of its tensors where possible)."""
    return _to_official(model, _flux_layout, fmt)


def autoencoder_state_dict(model: AutoEncoder, fmt: str = "bfl") -> dict[str, Tensor]:
    out = _to_official(model, _ae_layout, fmt)
    if fmt == "diffusers":  # diffusers' mid-block attention uses Linear layers where BFL has 1x1 convs
        out = {k: t.flatten(1) if ".attentions." in k and t.ndim == 4 else t for k, t in out.items()}
    return out


def save_flux(model: Flux, path: str, fmt: str = "bfl") -> None:
    """Write a BFL single file (path = *.safetensors) or a diffusers `transformer/` folder (path = folder)."""
    _save(path, flux_state_dict(model, fmt), diffusers_config(model.config) if fmt == "diffusers" else None)


def diffusers_config(c: FluxConfig) -> dict:
    """The config.json of diffusers' FluxTransformer2DModel for this architecture."""
    if c.mlp_ratio != 4.0 or not c.qkv_bias:
        raise ValueError("diffusers' FluxTransformer2DModel supports only mlp_ratio 4 with qkv bias; save as 'bfl'")
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "num_layers": c.depth, "num_single_layers": c.depth_single_blocks,
            "attention_head_dim": c.hidden_size // c.num_heads, "num_attention_heads": c.num_heads,
            "joint_attention_dim": c.context_in_dim, "pooled_projection_dim": c.vec_in_dim,
            "guidance_embeds": c.guidance_embed, "axes_dims_rope": list(c.axes_dim),
            **({"rope_theta": c.theta} if c.theta != 10_000 else {})}  # not a diffusers field: FLUX.1's is 10,000


def save_autoencoder(model: AutoEncoder | PixelUnshuffle, path: str, fmt: str = "bfl") -> None:
    """Write BFL's ae.safetensors (path = file) or a diffusers `vae/` folder (a PixelUnshuffle: config.json alone)."""
    if isinstance(model, PixelUnshuffle):
        return _save(path, {}, {"_class_name": "PixelUnshuffle", "factor": model.factor})
    sd = autoencoder_state_dict(model, fmt)
    if fmt == "bfl":
        return _save(path, sd, None)
    c, n = model.config, len(model.config.ch_mult)
    _save(path, sd, {
        "_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [c.ch * m for m in c.ch_mult], "layers_per_block": c.num_res_blocks,
        "latent_channels": c.z_channels, "norm_num_groups": c.norm_groups, "scaling_factor": c.scale_factor,
        "shift_factor": c.shift_factor, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
        "mid_block_add_attention": True, "sample_size": 1024})


def _save(path: str, sd: dict[str, Tensor], config: dict | None) -> None:
    """One safetensors file (config None), or a diffusers model folder: config.json and the weights, if any."""
    sd = {k: t.contiguous() for k, t in sd.items()}
    if config is None:
        return save_file(sd, path)
    os.makedirs(path, exist_ok=True)
    if sd:
        save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
