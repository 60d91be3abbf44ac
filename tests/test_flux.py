"""flux.py against the references: diffusers' FluxTransformer2DModel / AutoencoderKL on random weights (<= 1e-5),
the official key tables (tests/keys, docs/official.md §10.5) on the meta device, and clear errors on bad checkpoints."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import flux

diffusers = pytest.importorskip("diffusers")


def tiny_diffusers_flux(guidance: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                         pooled_projection_dim=12, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every tensor clearly non-trivial
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def flux_inputs(B=2, h=6, w=8, L_txt=5, ctx=24, vec=12):
    g = torch.Generator().manual_seed(1)
    img_ids = flux.image_ids(h, w)
    img_ids[:, 0] = 0.0
    return dict(img=torch.randn(B, (h // 2) * (w // 2), 16, generator=g), img_ids=img_ids,
                txt=torch.randn(B, L_txt, ctx, generator=g), txt_ids=flux.text_ids(L_txt),
                timesteps=torch.rand(B, generator=g), y=torch.randn(B, vec, generator=g),
                guidance=torch.tensor([3.5, 1.0])[:B])


def diffusers_forward(m, x):
    return m(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
             timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"],
             guidance=x["guidance"] if m.config.guidance_embeds else None, return_dict=False)[0]


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_matches_diffusers_both_formats(tmp_path, guidance):
    ref = tiny_diffusers_flux(guidance)
    ref.save_pretrained(tmp_path / "transformer")
    x = flux_inputs()
    with torch.no_grad():
        expected = diffusers_forward(ref, x)
        ours = flux.load_flux(str(tmp_path))  # a pipeline-style folder: finds transformer/, infers the config
        assert ours.config.guidance_embed == guidance and ours.config.axes_dim == (4, 6, 6)
        assert (ours(**x) - expected).abs().max() <= 1e-5
        flux.save_flux(ours, str(tmp_path / "bfl.safetensors"), "bfl")
        flux.save_flux(ours, str(tmp_path / "dif"), "diffusers")
        for path in ("bfl.safetensors", "dif"):  # our exporter's files read back, and by diffusers too
            again = flux.load_flux(str(tmp_path / path), config=ours.config)
            assert (again(**x) - expected).abs().max() <= 1e-5
        back = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "dif").eval()
        assert (diffusers_forward(back, x) - expected).abs().max() <= 1e-5
    bfl = load_file(tmp_path / "bfl.safetensors")
    assert "single_blocks.0.linear1.weight" in bfl and bfl["single_blocks.0.linear1.weight"].shape == (32 * 3 + 128, 32)


def test_bfl_file_with_prefix_and_nested_release_prefix(tmp_path):
    m = flux.Flux(flux.FLUX_CONFIGS["tiny"])
    sd = flux.flux_state_dict(m, "bfl")
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in sd.items()}, tmp_path / "comfy.safetensors")
    dif = flux.flux_state_dict(m, "diffusers")
    other = {"model.embed_tokens.weight": torch.zeros(3, 4), "denoise_tower.siglip_projector.0.weight": torch.zeros(2)}
    save_file({**{"denoise_tower.denoiser." + k: v.contiguous() for k, v in dif.items()}, **other},
              tmp_path / "model-00001-of-00001.safetensors")
    for path in ("comfy.safetensors", "."):
        again = flux.load_flux(str(tmp_path / path))
        assert again.config == m.config
        for k, v in m.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k


def tiny_diffusers_vae():
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
                                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                layers_per_block=1, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                                scaling_factor=0.3611, shift_factor=0.1159, sample_size=32)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def test_autoencoder_matches_diffusers_both_formats(tmp_path):
    ref = tiny_diffusers_vae()
    ref.save_pretrained(tmp_path / "vae")
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z_ref = (ref.encode(x).latent_dist.mode() - 0.1159) * 0.3611
        y_ref = ref.decode(z_ref / 0.3611 + 0.1159).sample
        ae = flux.load_autoencoder(str(tmp_path))
        assert ae.config.ch_mult == (1, 2) and ae.config.num_res_blocks == 1
        assert (ae.encode(x) - z_ref).abs().max() <= 1e-5 and (ae.decode(z_ref) - y_ref).abs().max() <= 1e-5
        flux.save_autoencoder(ae, str(tmp_path / "ae.safetensors"), "bfl")
        flux.save_autoencoder(ae, str(tmp_path / "vae2"), "diffusers")
        for path in ("ae.safetensors", "vae2"):
            again = flux.load_autoencoder(str(tmp_path / path), config=ae.config)
            assert (again.encode(x) - z_ref).abs().max() <= 1e-5
        back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae2").eval()
        assert (back.decode(z_ref / 0.3611 + 0.1159).sample - y_ref).abs().max() <= 1e-5


def test_rope_rotates_adjacent_pairs_and_is_the_identity_on_text():
    ids = torch.cat([flux.text_ids(3), flux.image_ids(4, 6, index=1)])[None]  # (1, L, 3)
    pe = flux.rope(ids, (4, 14, 14), 10_000)
    x = torch.randn(2, 3, ids.shape[1], 32)
    out = flux.apply_rope(x, pe)
    assert torch.equal(out[:, :, :3], x[:, :, :3])  # text ids are zero: the identity
    angle = ids[0, 5, 0].item() * 1.0  # axis 0 pair 0 has frequency 1
    x0, x1 = x[..., 5, 0], x[..., 5, 1]
    assert torch.allclose(out[..., 5, 0], x0 * math.cos(angle) - x1 * math.sin(angle), atol=1e-6)
    assert torch.allclose(out[..., 5, 1], x0 * math.sin(angle) + x1 * math.cos(angle), atol=1e-6)


def test_pack_unpack_ids_match_diffusers():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 6, 8)
    assert torch.equal(flux.pack(z), FluxPipeline._pack_latents(z, 2, 16, 6, 8))
    assert torch.equal(flux.unpack(flux.pack(z), 6, 8), z)
    assert torch.equal(flux.image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    ref_ids = flux.image_ids(6, 8, index=1)
    assert (ref_ids[:, 0] == 1).all() and torch.equal(ref_ids[:, 1:], flux.image_ids(6, 8)[:, 1:])


@pytest.mark.parametrize("preset,fmt,tsv", [("flux-dev", "bfl", "flux1-dev.bfl.tsv"),
                                            ("flux-schnell", "bfl", "flux1-schnell.bfl.tsv"),
                                            ("flux-dev", "diffusers", "flux1-dev.diffusers.tsv")])
def test_full_size_keys_on_meta(preset, fmt, tsv, official_keys):
    with torch.device("meta"):
        m = flux.Flux(flux.FLUX_CONFIGS[preset])
    ours = {k: tuple(v.shape) for k, v in flux.flux_state_dict(m, fmt).items()}
    assert ours == official_keys(tsv)
    if preset == "flux-dev":
        assert sum(p.numel() for p in m.parameters()) == 11_901_408_320


@pytest.mark.parametrize("fmt,tsv", [("bfl", "ae.bfl.tsv"), ("diffusers", "vae.diffusers.tsv")])
def test_full_size_autoencoder_keys_on_meta(fmt, tsv, official_keys):
    with torch.device("meta"):
        ae = flux.AutoEncoder(flux.AE_CONFIGS["flux"])
    assert {k: tuple(v.shape) for k, v in flux.autoencoder_state_dict(ae, fmt).items()} == official_keys(tsv)
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683


def test_infers_flex_like_architecture(tmp_path):
    """Any FLUX-architecture file loads without naming a preset (here: 1 double block, head dim 64, no guidance)."""
    c = flux.FluxConfig(vec_in_dim=8, context_in_dim=16, hidden_size=128, num_heads=2, depth=1, depth_single_blocks=3,
                        axes_dim=(8, 28, 28), guidance_embed=False, in_channels=128)
    flux.save_flux(flux.Flux(c), str(tmp_path / "f.safetensors"))
    assert flux.load_flux(str(tmp_path / "f.safetensors")).config == c


def test_bad_checkpoints_give_clear_errors(tmp_path):
    m = flux.Flux(flux.FLUX_CONFIGS["tiny"])
    sd = {k: v.contiguous() for k, v in flux.flux_state_dict(m).items()}
    save_file({k: v for k, v in sd.items() if k != "txt_in.bias"}, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing \(1\): txt_in.bias"):
        flux.load_flux(str(tmp_path / "missing.safetensors"), config=m.config)
    save_file({**sd, "txt_in.weight": torch.zeros(64, 7)}, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"wrong shape \(1\): txt_in.weight: \[64, 7\]"):
        flux.load_flux(str(tmp_path / "shape.safetensors"), config=m.config)
    save_file({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \(1\): extra.weight"):
        flux.load_flux(str(tmp_path / "extra.safetensors"))
    save_file({"foo": torch.zeros(1)}, tmp_path / "unknown.safetensors")
    with pytest.raises(ValueError, match="no FLUX transformer weights"):
        flux.load_flux(str(tmp_path / "unknown.safetensors"))
    save_file(sd, tmp_path / "whole.safetensors")  # damaged files: torn, a float stored as int32, NaN weights
    (tmp_path / "torn.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-1000])
    with pytest.raises(ValueError, match="torn.safetensors is not a readable safetensors file"):
        flux.load_flux(str(tmp_path / "torn.safetensors"))
    save_file({**sd, "txt_in.weight": sd["txt_in.weight"].to(torch.int32)}, tmp_path / "int.safetensors")
    with pytest.raises(ValueError, match="txt_in.weight is stored as I32, not a floating-point type"):
        flux.load_flux(str(tmp_path / "int.safetensors"))
    save_file({**sd, "img_in.bias": torch.full_like(sd["img_in.bias"], float("nan"))}, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="img_in.bias holds NaN or infinite values"):
        flux.load_flux(str(tmp_path / "nan.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        flux.load_flux(str(tmp_path / "junk.safetensors"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        flux.load_autoencoder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        flux.load_flux(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="pass `guidance`"):
        x = flux_inputs(ctx=32, vec=16)
        m(**{**x, "img": torch.randn(2, 12, 64), "guidance": None})


def test_load_dtype_device_and_eval_mode(tmp_path):
    m = flux.Flux(flux.FLUX_CONFIGS["tiny"])
    flux.save_flux(m, str(tmp_path / "f.safetensors"))
    bf = flux.load_flux(str(tmp_path / "f.safetensors"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in bf.parameters())
    assert not bf.training
