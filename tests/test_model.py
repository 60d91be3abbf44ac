"""model.py: the condition stream token by token, the weighted rectified-flow loss, the stages (also at full size on
the meta device), and the release layout round trip."""


import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import flux
import model as M
from encoders import tiny_siglip, tiny_vlm


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    enc = M.Encoders(vlm=tiny_vlm(seed=0), siglip=tiny_siglip(seed=0))
    uw = M.UniWorld(flux.Flux(flux.FLUX_CONFIGS["tiny"]), vlm_dim=64, siglip_dim=32)
    return enc, uw


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(48, 64, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_condition_stream_layout(world):
    enc, uw = world
    instr = ["Make the car red.\n<image>", "Blend these <image> and <image> into one picture"]
    feats = enc.features(instr, [images(1), images(2, seed=1)])
    with torch.no_grad():
        txt, mask = uw.text_stream(feats)
    lengths = []
    for b, f in enumerate(feats):
        n_img, T = f["siglip"].shape[:2]
        assert n_img == b + 1 and T == 16 and len(f["vision_end"]) == n_img
        with torch.no_grad():
            vlm, sig = uw.denoise_projector(f["vlm"]), uw.siglip_projector(f["siglip"])
        # hand-built: each image's SigLIP block sits right before that image's <|vision_end|>
        expected, start = [], 0
        for j, end in enumerate(f["vision_end"].tolist()):
            expected += [vlm[start:end], sig[j]]
            start = end
        expected = torch.cat(expected + [vlm[start:]])
        lengths.append(len(expected))
        row = txt[b, txt.shape[1] - len(expected) :]
        assert torch.equal(row, expected)
        assert (txt[b, : txt.shape[1] - len(expected)] == 0).all()  # left padding with zeros
        assert mask[b].tolist() == [False] * (txt.shape[1] - len(expected)) + [True] * len(expected)
        # the token after each inserted block is the projected <|vision_end|> hidden state
        for j, end in enumerate(f["vision_end"].tolist()):
            pos = txt.shape[1] - len(expected) + end + (j + 1) * T
            assert torch.equal(txt[b, pos], vlm[end])
    assert txt.shape == (2, max(lengths), 32) and lengths[0] != lengths[1]


def test_a_sample_without_images_has_no_siglip_block_whatever_its_batch(world):
    """Text to image next to an edit: `siglip` is None (as alone), and its row is its projected VLM tokens only."""
    enc, uw = world
    feats = enc.features(["A red car", "Make it blue <image>"], [[], images(1)])
    assert feats[0]["siglip"] is None and enc.features(["A red car"], [[]])[0]["siglip"] is None
    assert feats[1]["siglip"].shape[0] == 1
    with torch.no_grad():
        (txt, _), vlm = uw.text_stream(feats), uw.denoise_projector(feats[0]["vlm"])
    assert torch.equal(txt[0, txt.shape[1] - len(vlm) :], vlm) and (txt[0, : txt.shape[1] - len(vlm)] == 0).all()


def test_text_ids_are_zero_so_token_order_does_not_matter(world):
    enc, uw = world
    feats = enc.features(["Make it blue <image>"], [images(1)])
    with torch.no_grad():
        txt, mask = uw.text_stream(feats)
        assert mask is None  # one sample: nothing padded
        x, sigma, y = torch.randn(1, 16, 8, 8), torch.tensor([0.5]), torch.randn(1, 16)
        v = uw.velocity(x, sigma, txt, y, guidance=1.0)
        v_perm = uw.velocity(x, sigma, txt[:, torch.randperm(txt.shape[1])], y, guidance=1.0)
    assert torch.allclose(v, v_perm, atol=1e-5)


def test_a_batch_changes_nothing(world):
    """Batch invariance: prompts of different lengths and image counts, batched (their text streams left-padded to
    the longest) give each sample the velocity and the loss it has alone; without the padding mask they would not."""
    enc, uw = world
    instr = ["A red car", "Make it blue <image>", "Blend these <image> and <image> into one picture"]
    feats = enc.features(instr, [[], images(1), images(2, seed=1)])
    g = torch.Generator().manual_seed(0)
    x, sigma, y = torch.randn(3, 16, 8, 8, generator=g), torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, 16, generator=g)
    with torch.no_grad():
        txt, mask = uw.text_stream(feats)
        assert len(set(mask.sum(1).tolist())) == 3  # three lengths: two samples padded
        v = uw.velocity(x, sigma, txt, y, 3.5, mask)
        unmasked = uw.velocity(x, sigma, txt, y, 3.5)
        for i, f in enumerate(feats):
            txt_i, mask_i = uw.text_stream([f])
            assert mask_i is None and torch.equal(txt_i[0], txt[i, txt.shape[1] - len(txt_i[0]) :])
            alone = uw.velocity(x[i : i + 1], sigma[i : i + 1], txt_i, y[i : i + 1], 3.5)
            assert (v[i] - alone[0]).abs().max() <= 1e-5
            if i < 2:  # padded: attending to the padding changes the output
                assert (unmasked[i] - alone[0]).abs().max() > 1e-3
        batch = {"latents": torch.randn(3, 16, 8, 8, generator=g), "features": feats, "pooled": y,
                 "weights": 1 + torch.rand(3, 1, 8, 8, generator=g)}
        noise = torch.randn(3, 16, 8, 8, generator=g)
        batched = uw.loss(batch, sigma=sigma, noise=noise)
        alone = [uw.loss({k: v[i : i + 1] for k, v in batch.items()}, sigma=sigma[i : i + 1], noise=noise[i : i + 1])
                 for i in range(3)]
    assert batched.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-5)  # equal sizes: the mean


def test_weighted_mse_matches_hand_computation():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 1.0]]]]).repeat(1, 2, 1, 1)  # (2, 2, 2, 2)
    target = torch.zeros_like(pred)
    weights = torch.tensor([[[[1.0, 3.0], [1.0, 1.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])  # (2, 1, 2, 2)
    # per channel: sample 1 -> 1 + 3*4 + 9 + 16 = 38; sample 2 -> 2*1 = 2; 2 channels, 16 values in all
    expected = 2 * (38 + 2) / 16
    assert M.weighted_mse(pred, target, weights).item() == pytest.approx(expected)
    assert M.weighted_mse(pred, target).item() == pytest.approx((1 + 4 + 9 + 16 + 1) / 8)


def test_sigmas_are_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    s256, s4096 = M.sample_sigmas(20000, 256, g), M.sample_sigmas(20000, 4096, torch.Generator().manual_seed(0))
    assert 0 < s256.min() and s256.max() < 1
    assert s256.median().item() == pytest.approx(torch.sigmoid(torch.tensor(0.5)).item(), abs=0.02)  # shift e^0.5
    assert (s4096 > s256).all()  # larger images are pushed toward noise


def test_loss_is_finite_and_falls_on_a_repeated_batch(world):
    enc, uw = world
    uw = M.UniWorld(flux.Flux(flux.FLUX_CONFIGS["tiny"]), vlm_dim=64, siglip_dim=32)
    feats = enc.features(["Make it red <image>", "Remove the dog <image>"], [images(1), images(1, seed=2)])
    batch = {"latents": torch.randn(2, 16, 8, 8), "features": feats, "pooled": enc.pooled(["", ""], dim=16),
             "weights": torch.ones(2, 1, 8, 8).index_fill_(2, torch.tensor([2, 3]), 3.0)}
    M.set_stage(uw, 0)
    opt = torch.optim.AdamW([p for p in uw.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(30):
        loss = uw.loss(batch, generator=torch.Generator().manual_seed(0))  # same noise and sigma each step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda x: x == x and x < float("inf"), losses))
    assert losses[-1] < 0.5 * losses[0]


def test_stages_train_exactly_their_parameters(world):
    _, uw = world
    assert M.set_stage(uw, 1) == [n for n, _ in uw.named_parameters() if n.startswith("denoise_projector.")]
    names = set(M.set_stage(uw, 2))
    expected = {n for n, _ in uw.named_parameters() if n.startswith(("denoise_projector.", "siglip_projector."))}
    for i in range(2):
        expected |= {n for n, _ in uw.named_parameters()
                     if n.startswith((f"denoiser.double_blocks.{i}.img_attn.", f"denoiser.double_blocks.{i}.img_mod."))}
        for part in ("qkv", "norm", "modulation"):
            expected |= {n for n, _ in uw.named_parameters() if n.startswith(f"denoiser.single_blocks.{i}.{part}.")}
    assert names == expected
    frozen = {n for n, p in uw.named_parameters() if not p.requires_grad}
    assert "denoiser.single_blocks.0.mlp_in.weight" in frozen
    assert "denoiser.double_blocks.0.txt_attn.qkv.weight" in frozen
    assert "denoiser.single_blocks.0.linear2.weight" in frozen and "denoiser.final_layer.linear.weight" in frozen
    with pytest.raises(ValueError, match="unknown stage"):
        M.set_stage(uw, 3)


def test_full_size_trainable_counts_on_meta():
    with torch.device("meta"):
        uw = M.UniWorld(flux.Flux(flux.FLUX_CONFIGS["flux-dev"]), vlm_dim=3584, siglip_dim=1152)
    count = lambda: sum(p.numel() for p in uw.parameters() if p.requires_grad)
    M.set_stage(uw, 1)
    assert count() == 94_388_224
    M.set_stage(uw, 2)
    assert count() == 4_104_933_632


def test_full_size_release_keys_on_meta(official_keys):
    """Our export of the denoise tower has exactly the release's denoise_tower.* names and shapes."""
    with torch.device("meta"):
        uw = M.UniWorld(flux.Flux(flux.FLUX_CONFIGS["flux-dev"]), vlm_dim=3584, siglip_dim=1152)
        ours = {k: tuple(v.shape) for k, v in M.release_state_dict(uw).items()}
    assert ours == {k: v for k, v in official_keys("uniworld-v1.tsv").items() if k.startswith("denoise_tower.")}


def test_release_round_trip(world, tmp_path):
    enc, uw = world
    M.save_release(uw, str(tmp_path), vlm=enc.vlm, shard_bytes=200_000)  # several shards, as in the release
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    st = flux.Checkpoint(str(tmp_path))
    assert any(k.startswith("visual.") for k in st.keys) and any(k.startswith("model.layers.") for k in st.keys)
    assert "denoise_tower.denoiser.transformer_blocks.0.attn.to_q.weight" in st.keys
    loaded, vlm = M.load_uniworld(str(tmp_path), vlm_pixels=enc.vlm.pixels)
    feats = enc.features(["Make it blue <image>"], [images(1)])
    feats2 = M.Encoders(vlm=vlm, siglip=enc.siglip).features(["Make it blue <image>"], [images(1)])
    assert torch.allclose(feats[0]["vlm"], feats2[0]["vlm"], atol=1e-6)
    with torch.no_grad():
        (txt, _), (txt2, _) = uw.text_stream(feats), loaded.text_stream(feats)
        x, s, y = torch.randn(1, 16, 8, 8), torch.tensor([0.3]), torch.randn(1, 16)
        assert torch.equal(txt, txt2)
        assert torch.equal(uw.velocity(x, s, txt, y, 3.5), loaded.velocity(x, s, txt, y, 3.5))


def test_bad_release_and_redux_files(world, tmp_path):
    _, uw = world
    sd = {k: v.contiguous() for k, v in M.release_state_dict(uw).items() if "siglip_projector.2" not in k}
    save_file(sd, tmp_path / "model-00001-of-00001.safetensors")
    with pytest.raises(ValueError, match=r"missing denoise_tower.\{siglip_projector.2.weight"):
        M.load_uniworld(str(tmp_path), with_vlm=False)
    redux = {"redux_up.weight": torch.randn(96, 32), "redux_up.bias": torch.randn(96),
             "redux_down.weight": torch.randn(32, 96), "redux_down.bias": torch.randn(32)}
    save_file(redux, tmp_path / "flux1-redux-dev.safetensors")
    M.load_siglip_projector(uw, str(tmp_path / "flux1-redux-dev.safetensors"))
    assert torch.equal(uw.siglip_projector[2].weight, redux["redux_down.weight"])
    torch.save({f"denoise_tower.siglip_projector.{k.replace('redux_up', '0').replace('redux_down', '2')}": -v
                for k, v in redux.items()}, tmp_path / "flux-redux-siglipv2-512.bin")
    M.load_siglip_projector(uw, str(tmp_path / "flux-redux-siglipv2-512.bin"))
    assert torch.equal(uw.siglip_projector[0].bias, -redux["redux_up.bias"])
    save_file({"foo": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="expected redux_up"):
        M.load_siglip_projector(uw, str(tmp_path / "other.safetensors"))
    save_file({**redux, "redux_up.weight": torch.randn(96, 33)}, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"shape.safetensors: .*size mismatch for 0.weight"):
        M.load_siglip_projector(uw, str(tmp_path / "shape.safetensors"))
    torch.save({"0.weight": Payload(str(tmp_path / "pwned"))}, tmp_path / "evil.bin")  # a pickle that runs code
    with pytest.raises(ValueError, match="evil.bin: not a weights file that loads safely"):
        M.load_siglip_projector(uw, str(tmp_path / "evil.bin"))
    assert not (tmp_path / "pwned").exists()
    sd = {k: v.contiguous() for k, v in M.release_state_dict(uw).items()}  # a connector tensor of the wrong shape
    sd["denoise_tower.denoise_projector.2.weight"] = torch.zeros(32, 7)
    save_file(sd, tmp_path / "model-00001-of-00001.safetensors")
    with pytest.raises(ValueError, match="size mismatch for denoise_projector.2.weight"):
        M.load_uniworld(str(tmp_path), with_vlm=False)


class Payload:
    """What a malicious .bin carries: unpickling it would call os.system."""

    def __init__(self, path="pwned"):
        self.path = path

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.path}",)
