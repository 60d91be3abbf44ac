"""The toy world: dataset format and ground truth, held-out split, structured encoders, metrics on known inputs."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import flux
import toy


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("toy"))
    toy.make_dataset(root, n_train=36, n_test=12, seed=3)
    return root


def test_dataset_is_in_the_official_format(dataset):
    for split, n in (("train", 36), ("test", 12)):
        lines = open(os.path.join(dataset, f"{split}.txt")).read().split()
        assert len(lines) == len(toy.TASKS)
        total = 0
        for line in lines:
            image_root, path, need_weight = line.split(",")
            assert need_weight in ("0", "1") and os.path.isabs(path)
            for r in json.load(open(path)):
                human, gpt = r["conversations"]
                assert (human["from"], gpt["from"], gpt["value"]) == ("human", "gpt", "<gen_image>")
                assert human["value"].count("<image>") == len(r["image"]) - 1  # one marker per reference
                for p in r["image"]:
                    img = Image.open(os.path.join(image_root, p))
                    assert img.format == "PNG" and img.size == (toy.SIZE, toy.SIZE)
                total += 1
        assert total == n


def test_ground_truth_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = toy.make_sample(rng, "recolor")
        ref, tgt = s["refs"][0], s["target"]
        kind, color = s["text"].split()[2:4]
        changed = (ref != tgt).any(-1)
        assert (tgt[changed] == toy.COLORS[color]).all() and changed.any()  # only the named shape, all of it
        s = toy.make_sample(rng, "remove")
        changed = (s["refs"][0] != s["target"]).any(-1)
        assert (s["target"][changed] == s["target"][0, 0]).all()  # the removed shape becomes background
        assert len(np.unique(s["target"].reshape(-1, 3), axis=0)) == 2  # one shape of the two is left
        s = toy.make_sample(rng, "segment")
        assert set(np.unique(s["target"])) <= {0, 255} and (s["target"] == 255).any()
        changed = (s["refs"][0] != s["refs"][0][0, 0]).any(-1)
        assert not (s["target"][~changed] == 255).any()  # the mask lies inside the shapes


def test_edge_map_of_a_square():
    s = toy.Shape("square", "red", 1, 1, 15.5, 15.5, 4.0)
    e = toy.edge_map(toy.draw("black", [s])).mean(-1) > 0
    m = toy.shape_mask(s)
    assert e.sum() == 4 * (m.any(0).sum() - 1) and (e <= m).all()  # the inner boundary ring of the square


def test_dataset_is_deterministic_and_held_out_pairs_are_not_trained_on(dataset, tmp_path):
    toy.make_dataset(str(tmp_path), n_train=36, n_test=12, seed=3)
    for split in ("train", "test"):
        a, b = toy.load_records(dataset, split), toy.load_records(str(tmp_path), split)
        assert [r["text"] for r in a] == [r["text"] for r in b]
        assert all((x["target"] == y["target"]).all() for x, y in zip(a, b, strict=True))
    key = lambda r: (r["text"], r["target"].tobytes(), *(x.tobytes() for x in r["refs"]))
    held_out = {key(r) for r in toy.load_records(dataset, "test")}
    assert not held_out & {key(r) for r in toy.load_records(dataset, "train")}


def test_toy_siglip_keeps_patch_content_and_rope_phase():
    siglip = toy.toy_siglip()
    img = np.zeros((toy.SIZE, toy.SIZE, 3), np.uint8)
    img[4:8, 8:12] = (255, 0, 0)  # the patch at row 1, column 2 of the 8x8 grid
    tokens = siglip([Image.fromarray(img)])[0]  # (64, 128)
    assert tokens.shape == (64, 128)
    red = tokens[:, :48].std(-1)
    assert red.argmax() == 1 * 8 + 2 and red.max() > 10 * red[0]  # only that token sees the red pixels
    c = toy.toy_flux_config()
    rows = toy.rope_sincos(8, c.axes_dim[1], c.theta)
    w = 1 / c.theta ** (torch.arange(0, c.axes_dim[1], 2) / c.axes_dim[1])
    assert torch.allclose(rows[3, 0::2], torch.cos(3 * w), atol=1e-6)  # the RoPE frequencies of the row axis


def test_pixel_autoencoder_round_trip_and_token_grid():
    x = torch.rand(2, 3, toy.SIZE, toy.SIZE) * 2 - 1
    z = toy.PixelAE().encode(x)
    assert z.shape == (2, 12, 16, 16) and torch.equal(toy.PixelAE().decode(z), x)
    assert flux.pack(z).shape == (2, 64, toy.toy_flux_config().in_channels)  # one token per SigLIP token


def test_metrics_on_known_outputs():
    rng = np.random.default_rng(1)
    records = [toy.make_sample(rng, t) for t in toy.TASKS for _ in range(3)]
    perfect = toy.evaluate(records, [r["target"] for r in records], show=False)
    for task, row in perfect.items():
        assert row["success"] == 1.0 and row["psnr"] == float("inf"), task
    assert perfect["segment"]["iou"] == 1.0 and perfect["recolor"]["keep"] == 1.0
    same = toy.evaluate(records, [r["refs"][0] if r["refs"] else r["target"] for r in records], show=False)
    for task in ("recolor", "remove", "add"):
        assert same[task]["success"] == 0.0 and same[task]["keep"] == 1.0
        assert same[task]["psnr"] == same[task]["base_psnr"] < 40
    blank = [np.zeros_like(r["target"]) for r in records]
    assert toy.evaluate(records, blank, show=False)["segment"]["iou"] == 0.0


def test_psnr_and_palette_classification():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert abs(toy.psnr(a, b) - 10 * np.log10(255**2 / (255**2 / 48))) < 1e-9
    noisy = np.clip(np.array(toy.COLORS["blue"]) + 30, 0, 255).astype(np.uint8)[None, None]
    assert toy.classify(noisy)[0, 0] == list(toy.COLORS).index("blue")


def test_features_through_the_real_condition_stream_and_sampler(dataset):
    """Cached toy features go through model.UniWorld and sample.py's sampler: one 32x32 image per record."""
    import model as M

    records = toy.load_records(dataset, "test")[:3]
    feats = toy.encode_records(toy.toy_vlm(), toy.toy_siglip(), records)
    assert [len(f["siglip"]) for f in feats] == [len(r["refs"]) for r in records]  # t2i: no SigLIP block
    assert all(f["siglip"].shape == (1, 64, 128) for f in feats if len(f["siglip"]))  # one token per patch
    torch.manual_seed(0)
    uw = M.UniWorld(flux.Flux(toy.toy_flux_config()), vlm_dim=64, siglip_dim=128).eval()
    out = toy.generate(uw, feats, steps=2)
    assert out.shape == (3, 3, toy.SIZE, toy.SIZE) and torch.isfinite(out).all()
